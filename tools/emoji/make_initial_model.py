#!/usr/bin/env python3
"""Write the untrained emoji model that `diffctl train full` turns into the embedded default model.

A diffusers folder of a small pixel-space Stable Diffusion model, with diffusers' and transformers'
own random initialisation:

* ``unet/``: a ``UNet2DConditionModel`` on 32x32 RGB images (3 channels in and out, no VAE),
  three blocks, cross-attention on the text encoder;
* ``text_encoder/``: a small ``CLIPTextModel`` with a 16-token context;
* ``tokenizer/``: a word-level ``tokenizer.json`` (lower-cased words of the training captions;
  others map to ``<|unk|>``), loaded as ``PreTrainedTokenizerFast``;
* ``scheduler/``: DDPM's linear beta schedule (the one for pixel-space images), v-prediction (an
  undertrained epsilon model's x0 estimates at high noise are its error times 1/sqrt(alphā), about
  150, and sampling diverges; v keeps them bounded);
* ``model_index.json`` listing the VAE as ``[null, null]``: diffusers loads the pipeline with
  ``vae=None`` and returns the images themselves with ``output_type="latent"``; diffctl reads it as
  pixel space.

Usage::

    python tools/emoji/make_initial_model.py --data target/emoji-dataset --out target/emoji-init
    python tools/emoji/make_initial_model.py --tiny --out tests/fixtures/models/pixel-tiny

``--tiny`` writes the same layout at test size, its vocabulary from a few captions, with every
weight drawn at random (the zero-initialised output layers too, so that a test sees them) and a
parity case ``generation.safetensors`` beside it: diffusers' pipeline with ``vae=None`` sampling
with DDIM and classifier-free guidance from stored noise.

Needs torch, diffusers and transformers (``../shared/bench/oracle_env.sh`` makes that environment).
"""

import argparse
import json
import os
import re

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
CONTEXT = 16


TINY_CAPTIONS = ["red apple", "smiling cat with heart eyes", "flag: Åland Islands", "1st place medal"]


def captions(data):
    with open(os.path.join(data, "metadata.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def vocabulary(texts):
    """The specials, then every word of the captions (as the tokenizer splits them), sorted."""
    words = set()
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]+", text.lower()))
    return SPECIALS + sorted(words)


def tokenizer(vocab):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # <bos> words <eos>, as CLIP's tokenizer frames a prompt.
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        model_max_length=CONTEXT,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="the dataset folder (build_dataset.py --out)")
    ap.add_argument("--tiny", action="store_true", help="a test-size model with a parity case")
    ap.add_argument("--out", required=True, help="the model folder to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    if not args.tiny and not args.data:
        ap.error("--data is required (unless --tiny)")
    vocab = vocabulary(TINY_CAPTIONS if args.tiny else captions(args.data))
    width, channels, layers = (16, (16, 16, 16), 1) if args.tiny else (128, (32, 64, 128), 3)
    tokenizer(vocab).save_pretrained(os.path.join(args.out, "tokenizer"))

    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    text.save_pretrained(os.path.join(args.out, "text_encoder"))

    unet = UNet2DConditionModel(
        sample_size=16 if args.tiny else 32,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=4,
        norm_num_groups=4 if args.tiny else 32,
    )
    if args.tiny:
        with torch.no_grad():
            for p in unet.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
    unet.save_pretrained(os.path.join(args.out, "unet"))

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="v_prediction",
        # diffusers' SD pipelines turn clipping off whatever the config says; the fixture asks for
        # it so that a test sees diffctl do the same.
        clip_sample=args.tiny,
        # They leave dynamic thresholding as configured: the fixture turns it on (a cap of 1.5 and a
        # low quantile, so that the rescaling acts) for the parity test. The emoji model does without:
        # clipping a v-prediction model's x0 estimate while keeping its noise estimate made its
        # samples worse.
        thresholding=args.tiny,
        dynamic_thresholding_ratio=0.9 if args.tiny else 0.995,
        sample_max_value=1.5 if args.tiny else 1.0,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler.save_pretrained(os.path.join(args.out, "scheduler"))

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    }
    with open(os.path.join(args.out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    if args.tiny:
        write_parity_case(args.out)
    params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text.parameters())
    print(f"wrote {args.out}: UNet {params[0] / 1e6:.2f} M parameters, text encoder {params[1] / 1e6:.2f} M, "
          f"vocabulary {len(vocab)} words")


def write_parity_case(folder):
    """diffusers' pipeline on the folder just written (vae=None, so in pixel space), from stored
    noise: the final images ("latents") for a prompt and a negative prompt, with guidance."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(folder, vae=None, safety_checker=None)
    latents = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = pipe(
        prompt=TINY_CAPTIONS[1],
        negative_prompt=TINY_CAPTIONS[0],
        num_inference_steps=4,
        guidance_scale=3.0,
        latents=latents,
        output_type="latent",
    ).images
    pipe.scheduler.register_to_config(thresholding=False)
    plain = pipe(prompt=TINY_CAPTIONS[1], negative_prompt=TINY_CAPTIONS[0], num_inference_steps=4,
                 guidance_scale=3.0, latents=latents, output_type="latent").images
    assert (plain - out).abs().max() > 1e-3, "the fixture's thresholding must change the result"
    save_file({"latents": latents.contiguous(), "expected": out.contiguous()},
              os.path.join(folder, "..", "pixel-tiny-generation.safetensors"))


if __name__ == "__main__":
    main()
