#!/usr/bin/env python3
"""Copy a trained emoji model folder into assets/emoji-model, the model diffctl embeds.

The weights are stored in float16 (half the size; diffctl and diffusers compute in float32 from
them), the configs and tokenizer copied, and the licence notices of the training data added.

Usage::

    python tools/emoji/package_model.py --model target/emoji-model --data target/emoji-dataset \
        [--out assets/emoji-model] [--notes "trained ..."]

Needs the safetensors and torch packages (the oracle environment).
"""

import argparse
import os
import shutil

from safetensors.torch import load_file, save_file

COPIED = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
]
WEIGHTS = ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"]
NOTICES = ["LICENSE-fluent-emoji.txt", "LICENSE-emojibase.txt", "NOTICE.txt"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the folder diffctl train full wrote")
    ap.add_argument("--data", required=True, help="the dataset folder (for its licence notices)")
    ap.add_argument("--out", default="assets/emoji-model")
    args = ap.parse_args()
    for name in COPIED:
        os.makedirs(os.path.dirname(os.path.join(args.out, name)) or args.out, exist_ok=True)
        shutil.copyfile(os.path.join(args.model, name), os.path.join(args.out, name))
    for name in WEIGHTS:
        tensors = {k: v.half().contiguous() for k, v in load_file(os.path.join(args.model, name)).items()}
        save_file(tensors, os.path.join(args.out, name), metadata={"format": "pt"})
    for name in NOTICES:
        shutil.copyfile(os.path.join(args.data, name), os.path.join(args.out, name))
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in COPIED + WEIGHTS + NOTICES)
    print(f"wrote {args.out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
