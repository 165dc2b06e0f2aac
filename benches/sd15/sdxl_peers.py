"""CPU peer timings at SDXL size for `cargo bench --bench sd15 -- --family sdxl`: one SDXL UNet step (batch 2 = CFG,
4x128x128 latents, 2x77x2048 context, pooled 2x1280 text embeddings, time ids (1024, 1024, 0, 0, 1024, 1024),
timestep 500) and a VAE decode at 1024x1024, on the random SDXL-size weights the bench makes (diffusers layout).
The same subcommands, flags and output lines as ../shared/bench/perf_peers.py (which times SD1.5 and whose UNet
wrapper has no added conditioning): every timing 2 threads, the same seeded inputs, WARMUP untimed runs then RUNS
timed runs, `RESULT name: min X s, median Y s, runs ..., peak rss Z GB`.

python sdxl_peers.py torch DIR --mode eager|bf16 [--vae]   PyTorch eager f32, or autocast bf16
python sdxl_peers.py ov-convert DIR OVDIR                  UNet and VAE decoder -> OpenVINO IR (f32 weights kept)
python sdxl_peers.py ov-time OVDIR --precision f32|default [--what unet|vae]
Common flags: --runs N (default 5), --vae-runs N (default 3), --warmup N (default 1), --threads N (default 2).
"""
import argparse, os, resource, statistics, time

import numpy as np

SIZE = 1024


def inputs():
    import torch
    g = torch.Generator().manual_seed(0)
    latent = SIZE // 8
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, 2048, generator=g)
    pooled = torch.randn(2, 1280, generator=g)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)
    z = torch.randn(1, 4, latent, latent, generator=g)
    return x, t, ctx, pooled, time_ids, z


def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB, as perf_peers.py


def bench(name, fn, warmup, runs):
    for i in range(warmup):
        t0 = time.time(); fn(); print(f"{name} warm-up {i}: {time.time() - t0:.2f} s", flush=True)
    ts = []
    for i in range(runs):
        t0 = time.time(); fn(); ts.append(time.time() - t0)
        print(f"{name} run {i}: {ts[-1]:.2f} s", flush=True)
    print(f"RESULT {name}: min {min(ts):.2f} s, median {statistics.median(ts):.2f} s, "
          f"runs {' '.join('%.2f' % v for v in ts)}, peak rss {rss_gb():.2f} GB", flush=True)


def unet_module(unet):
    """The UNet with its added conditioning as positional inputs, returning a plain tensor (for tracing)."""
    import torch

    class W(torch.nn.Module):
        def __init__(self, u):
            super().__init__(); self.u = u

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.u(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
    return W(unet).eval()


def decoder_module(vae):
    import torch

    class W(torch.nn.Module):
        def __init__(self, v):
            super().__init__(); self.v = v

        def forward(self, z):
            return self.v.decode(z, return_dict=False)[0]
    return W(vae).eval()


def cmd_torch(a):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.set_num_threads(a.threads)
    unet = unet_module(UNet2DConditionModel.from_pretrained(f"{a.dir}/unet"))
    x, t, ctx, pooled, time_ids, z = inputs()
    print("torch", torch.__version__, "mode", a.mode, "threads", torch.get_num_threads(), flush=True)

    def under_mode(f):
        if a.mode == "eager":
            return f

        def g():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return f()
        return g

    with torch.no_grad():
        bench(f"torch-{a.mode} unet b2", under_mode(lambda: unet(x, t, ctx, pooled, time_ids)), a.warmup, a.runs)
        if a.vae:
            del unet
            decoder = decoder_module(AutoencoderKL.from_pretrained(f"{a.dir}/vae"))
            bench(f"torch-{a.mode} vae decode {SIZE}", under_mode(lambda: decoder(z)), a.warmup, a.vae_runs)


def cmd_ov_convert(a):
    import openvino as ov
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    x, t, ctx, pooled, time_ids, z = inputs()
    with torch.no_grad():
        unet = unet_module(UNet2DConditionModel.from_pretrained(f"{a.dir}/unet"))
        t0 = time.time()
        m = ov.convert_model(unet, example_input=(x, t, ctx, pooled, time_ids))
        ov.save_model(m, f"{a.out}/unet.xml", compress_to_fp16=False)
        print(f"unet converted in {time.time() - t0:.1f} s, peak rss {rss_gb():.2f} GB", flush=True)
        del m, unet
        decoder = decoder_module(AutoencoderKL.from_pretrained(f"{a.dir}/vae"))
        t0 = time.time()
        m = ov.convert_model(decoder, example_input=(z,))
        ov.save_model(m, f"{a.out}/vae_decoder.xml", compress_to_fp16=False)
        print(f"vae decoder converted in {time.time() - t0:.1f} s", flush=True)
    print(f"peak rss {rss_gb():.2f} GB")


def cmd_ov_time(a):
    import openvino as ov
    x, t, ctx, pooled, time_ids, z = [v.numpy() for v in inputs()]
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": a.threads, "PERFORMANCE_HINT": "LATENCY"}
    if a.precision != "default":
        cfg["INFERENCE_PRECISION_HINT"] = a.precision
    t0 = time.time()
    cm = core.compile_model(f"{a.ovdir}/{'unet' if a.what == 'unet' else 'vae_decoder'}.xml", "CPU", cfg)
    print(f"openvino {ov.get_version()} compile {time.time() - t0:.1f} s", flush=True)
    for p in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "NUM_STREAMS"):
        try:
            print(f"  {p} = {cm.get_property(p)}")
        except Exception as e:
            print(f"  {p}: {e}")
    print("  CPU:", core.get_property("CPU", "FULL_DEVICE_NAME"),
          "caps:", core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"), flush=True)
    req = cm.create_infer_request()
    feed = [x, t, ctx, pooled, time_ids] if a.what == "unet" else [z]
    prec = cm.get_property("INFERENCE_PRECISION_HINT")
    name = f"openvino-{a.precision}({prec}) {'unet' if a.what == 'unet' else 'vae decode'}"
    bench(name, lambda: req.infer(feed), a.warmup, a.runs if a.what == "unet" else a.vae_runs)
    out = req.get_output_tensor(0).data
    print("output", out.shape, "mean abs %.4g" % float(np.abs(out).mean()), "finite", bool(np.isfinite(out).all()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--runs", type=int, default=5)
        q.add_argument("--vae-runs", type=int, default=3)
        q.add_argument("--warmup", type=int, default=1)
        q.add_argument("--threads", type=int, default=2)
        return q
    q = common(sp.add_parser("torch")); q.add_argument("dir")
    q.add_argument("--mode", choices=["eager", "bf16"], default="eager")
    q.add_argument("--vae", action="store_true")
    q = common(sp.add_parser("ov-convert")); q.add_argument("dir"); q.add_argument("out")
    q = common(sp.add_parser("ov-time")); q.add_argument("ovdir")
    q.add_argument("--precision", default="default", help="f32, bf16, f16 or default (the plugin's choice)")
    q.add_argument("--what", choices=["unet", "vae"], default="unet")
    a = p.parse_args()
    {"torch": cmd_torch, "ov-convert": cmd_ov_convert, "ov-time": cmd_ov_time}[a.cmd](a)


if __name__ == "__main__":
    main()
