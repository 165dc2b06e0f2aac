"""PyTorch f32 (eager) timings of what ../shared/bench/perf_peers.py does not time, for `cargo bench --bench sd15`:
the time one ControlNet adds to a UNet step, and a whole generation. Same conventions as perf_peers.py: threads
set for torch, the same seeded inputs, WARMUP untimed runs then RUNS timed runs, and for each measurement a line
`RESULT name: min X s, median Y s, runs ..., peak rss Z GB` (peak RSS of the process, ru_maxrss).

python torch_extra.py controlnet DIR CNDIR   UNet (DIR/unet) step at batch 2 (4x64x64 latents, timestep 500,
                                             2x77xD context), each run a plain step then a step with the
                                             ControlNet CNDIR (its forward on a 2x3x512x512 control image in
                                             [0, 1], scale 1.0, then the UNet with its residuals), as the bench's
                                             own measurement pairs them; RESULT lines `plain step`, `step with
                                             controlnet` and `controlnet added` (per-run with - plain)
python torch_extra.py generate DIR           StableDiffusionPipeline from DIR (its scheduler: PNDM), --size (512),
                                             --steps steps, guidance 7.5, fixed generator, output_type "np";
                                             the whole call timed, load excluded, no warm-up; RESULT `generate`;
                                             --prompt TEXT (any prompt is padded to 77 tokens)
python torch_extra.py train DIR --kind lora|controlnet
                                             training steps as diffusers' train_text_to_image_lora.py (PEFT LoRA
                                             --rank 16, alpha = rank, gaussian init, on to_k/to_q/to_v/to_out.0)
                                             and train_controlnet.py (ControlNetModel.from_unet) step, batch 1
                                             at the model's native size: VAE encode (sampled) and text encode
                                             without gradients, noise, uniform timesteps, add_noise, the
                                             prediction's MSE against the noise (or v), backward, clip_grad_norm_
                                             1.0, AdamW (lr 1e-4, weight decay 1e-2), zero_grad; one image (and
                                             condition image) of seeded noise; RESULT `train lora` / `train
                                             controlnet`, every step (warm-up included) printed
Common flags: --runs N (default 5), --threads N (default 2); controlnet and train: --warmup N (default 1).
"""
import argparse, resource, statistics, time


def inputs(context_dim):
    """perf_peers.py's inputs() (latents, timesteps, context), the context width taken from the UNet."""
    import torch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, context_dim, generator=g)
    return x, t, ctx


def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB, as perf_peers.py


def result(name, ts):
    print(f"RESULT {name}: min {min(ts):.2f} s, median {statistics.median(ts):.2f} s, "
          f"runs {' '.join('%.2f' % v for v in ts)}, peak rss {rss_gb():.2f} GB", flush=True)


def timed(fn):
    t0 = time.time(); fn(); return time.time() - t0


def cmd_controlnet(a):
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    torch.set_num_threads(a.threads)
    unet = UNet2DConditionModel.from_pretrained(f"{a.dir}/unet").eval()
    controlnet = ControlNetModel.from_pretrained(a.cndir).eval()
    x, t, ctx = inputs(unet.config.cross_attention_dim)
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    print("torch", torch.__version__, "threads", torch.get_num_threads(), flush=True)

    def with_controlnet():
        down, mid = controlnet(x, t, ctx, controlnet_cond=image, conditioning_scale=1.0, return_dict=False)
        unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    plain, with_ = [], []
    with torch.no_grad():
        for i in range(a.warmup + a.runs):
            p, w = timed(lambda: unet(x, t, ctx)), timed(with_controlnet)
            what = f"warm-up {i}" if i < a.warmup else f"run {i - a.warmup}"
            print(f"unet b2 {what}: plain {p:.2f} s, with controlnet {w:.2f} s", flush=True)
            if i >= a.warmup:
                plain.append(p); with_.append(w)
    result("plain step", plain)
    result("step with controlnet", with_)
    result("controlnet added", [w - p for w, p in zip(with_, plain)])


def cmd_generate(a):
    import torch
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.dir, safety_checker=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    print("torch", torch.__version__, "threads", torch.get_num_threads(), "scheduler",
          type(pipe.scheduler).__name__, flush=True)
    ts = []
    with torch.no_grad():
        for i in range(a.runs):
            ts.append(timed(lambda: pipe(a.prompt, height=a.size, width=a.size, num_inference_steps=a.steps,
                                         guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                                         output_type="np")))
            print(f"generate run {i}: {ts[-1]:.2f} s", flush=True)
    result("generate", ts)


def cmd_train(a):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(f"{a.dir}/vae")
    text_encoder = CLIPTextModel.from_pretrained(f"{a.dir}/text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(f"{a.dir}/tokenizer")
    unet = UNet2DConditionModel.from_pretrained(f"{a.dir}/unet")
    scheduler = DDPMScheduler.from_pretrained(f"{a.dir}/scheduler")
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    if a.kind == "lora":
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        unet.train()
        trained = unet
    else:
        controlnet = ControlNetModel.from_unet(unet)
        controlnet.train()
        params = list(controlnet.parameters())
        trained = controlnet
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    condition = torch.rand(1, 3, size, size, generator=g)
    ids = tokenizer(["a photograph of an astronaut riding a horse on the moon, detailed, 8k"], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    print("torch", torch.__version__, "threads", torch.get_num_threads(), "size", size, "trained parameters",
          sum(p.numel() for p in params), flush=True)

    def step():
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            context = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,)).long()
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        if a.kind == "lora":
            pred = unet(noisy, t, context, return_dict=False)[0]
        else:
            down, mid = controlnet(noisy, t, context, controlnet_cond=condition, return_dict=False)
            pred = unet(noisy, t, context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    ts = []
    for i in range(a.warmup + a.runs):
        t0 = time.time()
        loss = step()
        s = time.time() - t0
        what = f"warm-up {i}" if i < a.warmup else f"run {i - a.warmup}"
        print(f"train {a.kind} step {what}: {s:.2f} s, loss {loss:.4f}", flush=True)
        if i >= a.warmup:
            ts.append(s)
    result(f"train {a.kind}", ts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--runs", type=int, default=5)
        q.add_argument("--threads", type=int, default=2)
        return q
    q = common(sp.add_parser("controlnet")); q.add_argument("dir"); q.add_argument("cndir")
    q.add_argument("--warmup", type=int, default=1)
    q = common(sp.add_parser("generate")); q.add_argument("dir")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--size", type=int, default=512, help="image height and width")
    q.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    q = common(sp.add_parser("train")); q.add_argument("dir")
    q.add_argument("--kind", choices=["lora", "controlnet"], required=True)
    q.add_argument("--rank", type=int, default=16)
    q.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    {"controlnet": cmd_controlnet, "generate": cmd_generate, "train": cmd_train}[a.cmd](a)


if __name__ == "__main__":
    main()
