"""Seed methods on the trained reference models (offline, CPU): Bottleneck Sampling and LinearAG, each beside
the fewer-steps competitor at the same compute share.

    python benchmarks/seed_methods_zoo.py --out benchmarks/results/seed_methods_zoo_cpu.md

Per model (``cifar10_dit``, ``cifar10_mmdit``, ``digits_wan``): the full run at ``--steps`` is the reference;
every variant runs on the same initial noise. *token share*: tokens the first block's self-attention really
processed (a forward pre-hook sums batch x tokens of every run), relative to the reference run;
*attention share*: the same with tokens² per sample (self-attention score work); *calls*: how often it ran,
relative to the reference (a half-batch call counts once; a skipped unconditional call not at all).
PSNR in dB on the [0, 1] images (video: every frame) against the reference. ``--models`` runs some models
and keeps the other models' rows of an existing result file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

import dit_accel  # noqa: E402
from dit_accel import zoo  # noqa: E402
from dit_accel.adapters import get_adapter  # noqa: E402
from dit_accel.eval.metrics import psnr  # noqa: E402
from dit_accel.sampling import BottleneckSampler, Stage  # noqa: E402

LABELS = {"cifar10_dit": [0, 3, 5, 8], "cifar10_mmdit": [0, 3, 5, 8], "digits_wan": [3, 7]}
CALIBRATION_LABELS = {"cifar10_dit": [1, 2, 4, 6], "cifar10_mmdit": [1, 2, 4, 6], "digits_wan": [2, 5]}


class Work:
    """Tokens (and tokens² per sample) that the first block's self-attention really processed, and how often it
    ran: a pass-through call (an unconditional call LinearAG / AG replaced) runs no block and counts nothing."""

    def __init__(self, transformer):
        self.tokens = self.square = self.calls = 0
        block = get_adapter(transformer).blocks(transformer)[0].module
        attention = next(m for m in block.modules() if type(m).__name__ == "Attention" or
                         type(m).__name__.endswith("Attention"))
        self.handle = attention.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        n = hidden.shape[1]  # [B, tokens, D]
        self.tokens += hidden.shape[0] * n
        self.square += hidden.shape[0] * n * n
        self.calls += 1

    def close(self):
        self.handle.remove()


def images(pipe, raw: torch.Tensor) -> torch.Tensor:
    x = (raw.float() / 2 + 0.5).clamp(0, 1)
    return x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x


def bottleneck_variants(steps: int) -> dict[str, dict]:
    n1, n3 = round(0.2 * steps), round(0.3 * steps)
    return {
        "bottleneck default (fresh noise)": {},
        "bottleneck default, noise=initial": {"noise": "initial"},
        "bottleneck scale 0.75, noise=initial": {"noise": "initial", "stages": [
            Stage(steps=n1, end=0.8), Stage(scale=0.75, steps=steps - n1 - n3, start=0.8, end=0.3),
            Stage(steps=n3, start=0.6)]},
        "bottleneck late low stage, noise=initial": {"noise": "initial", "stages": [
            Stage(steps=steps // 2, end=0.5), Stage(scale=0.5, steps=round(0.3 * steps), start=0.5, end=0.25),
            Stage(steps=steps - steps // 2 - round(0.3 * steps), start=0.35)]},
    }


def run(pipe, fn, label: str, rows: list, reference: dict | None, **meta) -> dict:
    work = Work(pipe.transformer)
    t0 = time.perf_counter()
    try:
        raw = fn()
    finally:
        work.close()
    row = {"variant": label, "seconds": time.perf_counter() - t0, "tokens": work.tokens, "square": work.square,
           "calls": work.calls, "images": images(pipe, raw), **meta}
    if reference is not None:
        row["token_share"] = work.tokens / reference["tokens"]
        row["attention_share"] = work.square / reference["square"]
        row["call_share"] = work.calls / reference["calls"]
        row["psnr"] = psnr(row["images"], reference["images"], data_range=1.0)
    rows.append(row)
    print(f"  {label}: " + ", ".join(f"{k}={row[k]:.3f}" for k in ("token_share", "psnr") if k in row), flush=True)
    return row


def bench_model(name: str, steps: int, methods: list[str]) -> list[dict]:
    pipe = zoo.load(name)
    cond = zoo.class_conditions(pipe, LABELS[name])
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    common = dict(**cond, generator=None, output_type="raw", num_inference_steps=steps)
    rows: list[dict] = []
    call = lambda **kw: pipe(**{**common, "generator": seed(), **kw})[0]  # noqa: E731
    reference = run(pipe, call, f"full run, {steps} steps", rows, None)
    reference.update(token_share=1.0, attention_share=1.0, call_share=1.0, psnr=float("inf"))
    shares = set()
    if "bottleneck" in methods:
        for label, fields in bottleneck_variants(steps).items():
            sampler = BottleneckSampler(pipe, **fields)
            row = run(pipe, lambda: sampler(**{**common, "generator": seed()})[0], label, rows, reference,
                      method="bottleneck")
            shares.add(row["token_share"])
    if "linear_ag" in methods:
        calib = [zoo.class_conditions(pipe, [c]) for c in CALIBRATION_LABELS[name]]
        calib = [{k: (v[0] if isinstance(v, list) else v) for k, v in c.items()} for c in calib]
        linear = dit_accel.calibrate(pipe, calib, {"name": "linear_ag", "guidance": {"method": "linear_ag"}},
                                     num_inference_steps=steps, generator=torch.Generator().manual_seed(1),
                                     output_type="raw")
        for label, policy in (("adaptive guidance (preset)", "adaptive_guidance"),
                              ("LinearAG, every 2nd uncond replaced (calibrated on other labels, seed 1)", linear)):
            dit_accel.accelerate(pipe, policy)
            try:
                row = run(pipe, call, label, rows, reference, method="guidance")
            finally:
                dit_accel.remove(pipe)
            shares.add(row["token_share"])
            shares.add(row["call_share"])
    ks: set[int] = set()  # the step counts just below and above each method's share
    for share in shares:
        ks |= {max(1, math.floor(share * steps + 1e-9)), max(1, math.ceil(share * steps - 1e-9))}
    for k in sorted(ks):
        if k != steps:
            run(pipe, lambda k=k: call(num_inference_steps=k), f"fewer steps: {k}", rows, reference,
                method="fewer steps")
    for row in rows:
        row.pop("images")
        row["model"] = name
    return rows


def write(rows: list[dict], args, out: Path) -> None:
    env = environment()
    previous = out.with_suffix(".json")
    if previous.exists():  # keep the rows of models this run did not measure
        done = {r["model"] for r in rows}
        kept = [r for r in json.loads(previous.read_text())["rows"] if r["model"] not in done]
        rows = kept + [r for r in rows if r not in kept]
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    lines = [f"# Seed methods on the reference models ({env['date']}, CPU)", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}, Python {env['python']}. Command: "
             f"`{env['command']}`. {args.steps} Euler steps for every model (reference: the full run), labels "
             "0, 3, 5, 8 (images) / digits 3, 7 (clips), seed 0, default guidance scales. Shares: measured by a "
             "forward pre-hook (see the script's docstring); PSNR on [0, 1] images / frames vs. the full run.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {model}", "", "| variant | token share | attention share | calls | PSNR (dB) |",
                  "|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: -r["token_share"]):
            p = "—" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
            lines.append(f"| {r['variant']} | {r['token_share']:.3f} | {r['attention_share']:.3f} | "
                         f"{r['call_share']:.3f} | {p} |")
        lines.append("")
    out.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_dit", "cifar10_mmdit", "digits_wan"])
    parser.add_argument("--methods", nargs="+", default=["bottleneck", "linear_ag"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seed_methods_zoo_cpu.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        print(name, flush=True)
        rows += bench_model(name, args.steps, args.methods)
        write(rows, args, args.out)


if __name__ == "__main__":
    main()
