#!/usr/bin/env python3
"""Sample clips from the video reference model (``dit_accel.zoo``, default ``digits_wan``) and save a PNG grid:
one row per prompt, one column per frame, prompts written on the left. Not cherry-picked: the first seed.

    python scripts/video_grid.py --out docs/samples_digits_wan.png
    python scripts/video_grid.py --weights-dir runs/digits_wan --device cuda --out grid.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _zoo_import import import_zoo  # noqa: E402

PROMPTS = ["the digit 0 bouncing", "the digit 1 bouncing", "the digit 2 bouncing", "the digit 7 bouncing",
           "the digits 3 and 8 bouncing", "the digits 4 and 5 bouncing", "the digits 6 and 9 bouncing",
           "a video of the digits one and two moving"]


def save_video_grid(frames: np.ndarray, prompts: list[str], path: str, scale: int = 2, left: int = 230) -> dict:
    """``frames`` ``[N, F, H, W, 3]`` uint8 -> PNG (rows = clips, columns = frames)."""
    from PIL import Image, ImageDraw, ImageFont

    n, f, h, w, _ = frames.shape
    size_h, size_w, pad = h * scale, w * scale, 2
    grid = Image.new("RGB", (left + f * (size_w + pad) + pad, n * (size_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r in range(n):
        y = pad + r * (size_h + pad)
        draw.text((4, y + size_h // 2 - 6), prompts[r], fill=(0, 0, 0), font=font)
        for c in range(f):
            im = Image.fromarray(frames[r, c]).resize((size_w, size_h), Image.NEAREST)
            grid.paste(im, (left + pad + c * (size_w + pad), y))
    grid.save(path, optimize=True)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "rows": n, "frames": f}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits_wan")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--prompts", default=None, help="'|'-separated prompts (default: a fixed set of 8)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)
    prompts = args.prompts.split("|") if args.prompts else PROMPTS
    pipe = import_zoo().load(args.model, device=args.device, weights_dir=args.weights_dir)
    t = time.time()
    g = torch.Generator(args.device).manual_seed(args.seed)
    frames = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.cfg, generator=g).frames
    u8 = (frames * 255).round().astype(np.uint8)
    info = save_video_grid(u8, prompts, args.out)
    info.update(seconds=round(time.time() - t, 1), seed=args.seed,
                num_inference_steps=args.steps or pipe.defaults["num_inference_steps"],
                guidance_scale=args.cfg if args.cfg is not None else pipe.defaults["guidance_scale"])
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
