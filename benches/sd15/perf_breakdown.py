"""Where a diffctl forward pass spends its time, by operation type, from a `perf record` of one child.

    perf record -F 99 -e cpu-clock -e sched:sched_switch --filter "prev_pid == PID" \
        --call-graph dwarf,16384 -p PID -o unet.perf.data      # PID: a `sd15 --child unet-b2` process
    perf script -i unet.perf.data -F tid,time,event,ip,sym --no-inline | python3 perf_breakdown.py PID

Every cpu-clock sample is put in one category by the frames of its stack (attention, GroupNorm,
LayerNorm, conv2d, linear, copies, elementwise, load, ...). Rayon workers' stacks do not show which
operation started their work (gemm tasks, parallel loops), so a worker sample without a telling frame
takes the category of the main thread's last stack: its own last sample, or where it last blocked
(the sched_switch events of PID). Kernel time (mostly page faults of fresh allocations) is counted both
in its category and on its own line.
"""
import re
import sys
from collections import Counter

# (category, regex on one frame), first match over the whole stack in this order wins.
CATEGORIES = [
    ("load (weights, tokenizer)", r"::load\b|ModelFiles::open|MmapedSafetensors|read_json"),
    ("attention (QK^T, softmax, PV, head split/merge)", r"attention::scaled_dot_product|attention::split_heads|attention::merge_heads|kernels::attention"),
    ("GroupNorm", r"GroupNorm|group_norm"),
    ("LayerNorm", r"LayerNorm|layer_norm"),
    ("conv2d (3x3 im2col + gemm, 1x1)", r"conv2d|Conv2D|Im2Col|kernels::conv"),
    ("linear (matmul)", r"candle_nn::linear|Linear as candle_core::Module|LayerHandle>::forward"),
    ("cat / contiguous copies", r"Tensor::cat|copy_strided|copy2d|contiguous"),
    ("upsample", r"upsample"),
    ("activations (silu, gelu)", r"silu|gelu|Silu|Gelu|erff|geglu|Geglu"),
    ("elementwise (add, mul, broadcast)", r"binary_map|unary_map|affine|BinaryOp|broadcast"),
    ("matmul (caller not seen)", r"gemm|MatMul"),
]
COMPILED = [(name, re.compile(rx)) for name, rx in CATEGORIES]
HEADER = re.compile(r"^\s*(\d+)\s+([\d.]+):\s+(\S+):")


def categorize(frames):
    for name, rx in COMPILED:
        if any(rx.search(sym) for _, sym in frames):
            return name
    return None


def events(stream):
    tid = time = event = None
    frames = []
    for line in stream:
        m = HEADER.match(line)
        if m:
            if tid is not None:
                yield tid, time, event, frames
            tid, time, event, frames = int(m.group(1)), float(m.group(2)), m.group(3), []
        elif line.strip():
            ip, _, sym = line.strip().partition(" ")
            frames.append((ip, sym.strip()))
    if tid is not None:
        yield tid, time, event, frames


def main():
    main_tid = int(sys.argv[1])
    counts, kernel, leaves = Counter(), Counter(), {}
    main_context = None
    total = main_samples = 0
    for tid, _, event, frames in sorted(events(sys.stdin), key=lambda e: e[1]):
        mine = categorize(frames)
        if tid == main_tid and mine is not None:
            main_context = mine
        if not event.startswith("cpu-clock"):
            continue
        generic = mine in (None, "matmul (caller not seen)", "elementwise (add, mul, broadcast)")
        category = main_context if tid != main_tid and generic and main_context else (mine or "other")
        total += 1
        main_samples += tid == main_tid
        counts[category] += 1
        leaf = "kernel" if frames and frames[0][0].startswith("ffffffff") else (frames[0][1] if frames else "?")
        leaves.setdefault(category, Counter())[re.sub(r"::\{\{closure\}\}|::h[0-9a-f]{16}", "", leaf)[:90]] += 1
        if frames and frames[0][0].startswith("ffffffff"):
            kernel[category] += 1
    print(f"{total} cpu-clock samples")
    for name, n in counts.most_common():
        k = kernel[name]
        print(f"{100 * n / total:6.1f} %  {name}" + (f"   (of which in the kernel {100 * k / total:.1f} %)" if k else ""))
        for leaf, m in leaves[name].most_common(4):
            print(f"            {100 * m / total:5.1f} %  {leaf}")
    print(f"{100 * sum(kernel.values()) / total:6.1f} %  in the kernel (all categories; mostly page faults of fresh allocations)")
    print(f"{100 * main_samples / total:6.1f} %  on the main thread (serial code: the other threads idle)")


if __name__ == "__main__":
    main()
