"""Seed methods on the trained reference models (offline, CPU): Bottleneck Sampling, LinearAG, ProfilingDiT, Δ-DiT,
Step Rehash and CacheQuant, each beside the fewer-steps competitor at the same compute share.

    python benchmarks/seed_methods_zoo.py --out benchmarks/results/seed_methods_zoo_cpu.md
    python benchmarks/seed_methods_zoo.py --methods profiling_dit delta_dit   # only these rows, the others kept
    python benchmarks/seed_methods_zoo.py --models cifar10_dit digits_wan --methods step_rehash cachequant

CacheQuant rows run with int8 weight-only linears (torchao, the CPU mode) and are compared with the full-precision
full run, like every other row; beside them: int8 linears alone at every step, a uniform refresh (FORA interval 2)
with int8 linears (the naive combination the paper improves on), and fewer steps with int8 linears (the
fewer-steps competitor under the same quantization). Its block share counts block evaluations (each one runs
quantized linears).

Per model (``cifar10_dit``, ``cifar10_mmdit``, ``digits_wan``): the full run at ``--steps`` is the reference;
every variant runs on the same initial noise. *token share*: tokens the first block's self-attention really
processed (a forward pre-hook sums batch x tokens of every run), relative to the reference run;
*attention share*: the same with tokens² per sample (self-attention score work); *calls*: how often it ran,
relative to the reference (a half-batch call counts once; a skipped unconditional call not at all);
*block share* (caching methods and fewer steps): transformer-block evaluations (``dit_accel.stats``) relative to
the reference. PSNR in dB on the [0, 1] images (video: every frame) against the reference. ``--models`` and
``--methods`` run some models / methods and keep the other rows of an existing result file; fewer-steps rows
already there are not run again (they are deterministic); each run's command, date, versions and CPU are
kept in the file.
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
from common import cpu_name, environment  # noqa: E402

import dit_accel  # noqa: E402
from dit_accel import zoo  # noqa: E402
from dit_accel.adapters import get_adapter  # noqa: E402
from dit_accel.caching.cachequant import CacheQuant, CacheQuantConfig  # noqa: E402
from dit_accel.caching.profiling_dit import ProfilingDiT, ProfilingDiTConfig  # noqa: E402
from dit_accel.caching.step_rehash import StepRehash, StepRehashConfig  # noqa: E402
from dit_accel.calibration import record  # noqa: E402
from dit_accel.calibration.passes import RandomState  # noqa: E402
from dit_accel.quant import quantized  # noqa: E402
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


def run(pipe, fn, label: str, rows: list, reference: dict | None, policy=None, **meta) -> dict:
    """Run ``fn`` (with ``policy`` attached, if given) and add its row: shares and PSNR against ``reference``."""
    work = Work(pipe.transformer)
    t0 = time.perf_counter()
    blocks = None
    try:
        if policy is None:
            raw = fn()
        else:
            with dit_accel.accelerated(pipe, policy):
                raw = fn()
                stats = dit_accel.stats(pipe)
            blocks = stats.blocks_computed
    finally:
        work.close()
    row = {"variant": label, "seconds": time.perf_counter() - t0, "tokens": work.tokens, "square": work.square,
           "calls": work.calls, "images": images(pipe, raw), **meta}
    if blocks is not None:
        row["blocks"] = blocks
    if reference is not None:
        row["token_share"] = work.tokens / reference["tokens"]
        row["attention_share"] = work.square / reference["square"]
        row["call_share"] = work.calls / reference["calls"]
        if blocks is not None:
            row["block_share"] = blocks / reference["blocks"]
        elif meta.get("method") == "fewer steps":
            row["block_share"] = row["call_share"]
        row["psnr"] = psnr(row["images"], reference["images"], data_range=1.0)
    rows.append(row)
    print(f"  {label}: " + ", ".join(f"{k}={row[k]:.3f}" for k in ("token_share", "block_share", "psnr") if k in row),
          flush=True)
    return row


def profiling_variants(pipe, steps: int, calib: list[dict], name: str) -> dict[str, ProfilingDiTConfig]:
    """ProfilingDiT configurations, all classed from one recording (other labels, seed 1): the paper's
    foreground profiling with the measured step dependence (the preset), intervals 4, the entropy proxy, the
    earlier preset (entropy, warm-up 1) and the foreground classes inverted (a control)."""
    records, family = record(pipe, calib, ProfilingDiT.record_options, num_inference_steps=steps,
                             generator=torch.Generator().manual_seed(1), output_type="raw")
    fit = lambda **fields: ProfilingDiT.calibrated(ProfilingDiTConfig(**fields), records, family)  # noqa: E731
    paper = fit()
    print(f"  profiling: foreground lift {paper.block_foreground}, entropy {paper.block_entropy}, "
          f"similarity {paper.step_similarity}", flush=True)
    inverted = ["fg" if c == "bg" else "bg" for c in paper.block_classes]
    variants = {
        "ProfilingDiT (preset: foreground profile, measured full steps, bg interval 3)": paper,
        "ProfilingDiT foreground profile, bg interval 4": fit(background_interval=4),
        "ProfilingDiT entropy profile, measured full steps, bg interval 3": fit(profile="entropy"),
        "ProfilingDiT earlier preset (entropy profile, warm-up 1, bg interval 3)": fit(profile="entropy",
                                                                                      warmup_steps=1),
        "ProfilingDiT foreground classes inverted (control)": ProfilingDiTConfig(
            **{**paper.to_dict(), "block_classes": inverted}),
    }
    if name == "digits_wan":  # 3 minutes per run on 2 CPU cores: the preset, the proxy and the control
        keep = ("preset", "entropy profile, measured", "inverted")
        variants = {k: v for k, v in variants.items() if any(w in k for w in keep)}
    return variants


def delta_variants() -> dict[str, dict]:
    """Δ-DiT at the preset's settings under both readings of the boundary b = 0.6 · steps."""
    return {
        "Δ-DiT (preset: b read as steps, outline = first 60% of the steps)": {"method": "delta_dit"},
        "Δ-DiT b read as timesteps (outline = first 40% of the steps)": {"method": "delta_dit",
                                                                        "boundary_reading": "timesteps"},
    }


INT8 = {"linear": "int8_weight_only"}


def rehash_variants(pipe, steps: int, calib: list[dict], name: str) -> dict[str, StepRehashConfig]:
    """Step Rehash at several thresholds, all from one profile (other labels, seed 1)."""
    records, family = record(pipe, calib, StepRehash.record_options, num_inference_steps=steps,
                             generator=torch.Generator().manual_seed(1), output_type="raw")
    profiled = StepRehash.calibrated(StepRehashConfig(), records, family)
    for branch, rows in profiled.similarity.items():
        print(f"  step rehash {branch}: similarity to the previous step {[round(r[-1], 4) for r in rows]}", flush=True)
    thresholds = (0.99, 0.995) if name == "digits_wan" else (0.98, 0.99, 0.995)
    return {f"Step Rehash threshold {t}" + (" (preset)" if t == StepRehashConfig().threshold else ""):
            StepRehashConfig(**{**profiled.to_dict(), "threshold": t}) for t in thresholds}


def cachequant_variants(pipe, steps: int, calib: list[dict], name: str) -> dict[str, dit_accel.Policy]:
    """CacheQuant fitted from one two-pass recording (full precision, then int8 linears, from the same noise; other
    labels, seed 1): the preset (DPS + both corrections), DPS without corrections and (not on digits_wan) the
    caching half without quantization."""
    reference, served, family = [], [], ""
    generator = torch.Generator().manual_seed(1)
    kwargs = dict(num_inference_steps=steps, generator=generator, output_type="raw")
    for prompt in calib:
        snapshot = RandomState.capture(kwargs)
        rows, family = record(pipe, [prompt], CacheQuant.record_options, **kwargs)
        reference.extend(rows)
        snapshot.restore()
        with quantized(pipe, dit_accel.quant.LinearQuantConfig(**INT8)):
            rows, family = record(pipe, [prompt], CacheQuant.record_options, **kwargs)
        served.extend(rows)
    full, quant = type(rows)(reference), type(rows)(served)
    quant.quantized, quant.reference = INT8["linear"], full
    fit = lambda records, **f: CacheQuant.calibrated(CacheQuantConfig(**f), records, family)  # noqa: E731
    preset = fit(quant)
    print(f"  cachequant: computed steps {preset.compute_steps}, error per step {preset.step_error}", flush=True)
    variants = {
        "CacheQuant (preset: int8 linears, DPS + decoupled corrections)": dit_accel.Policy(
            name="cachequant", cache=preset, quant=INT8),
        "CacheQuant int8, DPS without corrections": dit_accel.Policy(
            name="cachequant", cache=fit(quant, correct_cache=False, correct_quant=False), quant=INT8),
    }
    if name != "digits_wan":  # ~2 minutes per run there
        variants["CacheQuant without quantization (DPS + caching correction)"] = dit_accel.Policy(
            name="cachequant", cache=fit(full))
    return variants


def bench_model(name: str, steps: int, methods: list[str], skip_steps: set[int] = frozenset()) -> list[dict]:
    pipe = zoo.load(name)
    cond = zoo.class_conditions(pipe, LABELS[name])
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    common = dict(**cond, generator=None, output_type="raw", num_inference_steps=steps)
    rows: list[dict] = []
    call = lambda **kw: pipe(**{**common, "generator": seed(), **kw})[0]  # noqa: E731
    reference = run(pipe, call, f"full run, {steps} steps", rows, None, policy="none")
    reference.update(token_share=1.0, attention_share=1.0, call_share=1.0, block_share=1.0, psnr=float("inf"))
    shares = set()
    calib = [zoo.class_conditions(pipe, [c]) for c in CALIBRATION_LABELS[name]]
    calib = [{k: (v[0] if isinstance(v, list) else v) for k, v in c.items()} for c in calib]
    variants = {  # method -> {label: policy}, built only for the methods asked for
        "profiling_dit": lambda: {label: dit_accel.Policy(name="profiling_dit", cache=config)
                                  for label, config in profiling_variants(pipe, steps, calib, name).items()},
        "delta_dit": lambda: {label: {"name": "delta_dit", "cache": cache}
                              for label, cache in delta_variants().items()},
        "step_rehash": lambda: {label: dit_accel.Policy(name="step_rehash", cache=config)
                                for label, config in rehash_variants(pipe, steps, calib, name).items()},
        "cachequant": lambda: cachequant_variants(pipe, steps, calib, name),
    }
    for method, build in variants.items():
        if method not in methods:
            continue
        for label, policy in build().items():
            row = run(pipe, call, label, rows, reference, policy=policy, method=method)
            shares.add(row["block_share"])
    if "cachequant" in methods:
        half = max(1, round(steps / 2))
        controls = {"int8 linears alone, every step": ({"name": "int8", "cache": None, "quant": INT8}, steps),
                    "FORA interval 2 + int8 linears (uniform refresh, no correction)": (
                        {"name": "fora-int8", "cache": {"method": "fora", "interval": 2}, "quant": INT8}, steps),
                    f"fewer steps: {half}, int8 linears": ({"name": "int8", "cache": None, "quant": INT8}, half)}
        for label, (policy, k) in controls.items():
            run(pipe, lambda k=k: call(num_inference_steps=k), label, rows, reference, policy=policy,
                method="cachequant")
    if "bottleneck" in methods:
        for label, fields in bottleneck_variants(steps).items():
            sampler = BottleneckSampler(pipe, **fields)
            row = run(pipe, lambda: sampler(**{**common, "generator": seed()})[0], label, rows, reference,
                      method="bottleneck")
            shares.add(row["token_share"])
    if "linear_ag" in methods:
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
        if k != steps and k not in skip_steps:
            run(pipe, lambda k=k: call(num_inference_steps=k), f"fewer steps: {k}", rows, reference,
                method="fewer steps")
    for row in rows:
        row.pop("images")
        row["model"] = name
    return rows


def previous_rows(out: Path) -> tuple[list[dict], list[dict]]:
    """(rows, runs) of an existing result file (runs: the provenance of each run that wrote rows)."""
    previous = out.with_suffix(".json")
    if not previous.exists():
        return [], []
    data = json.loads(previous.read_text())
    runs = data.get("runs") or [{**data["environment"], "models": sorted({r["model"] for r in data["rows"]}),
                                 "methods": sorted({r.get("method", "") for r in data["rows"]} - {""})}]
    return data["rows"], runs


def merge(old: list[dict], new: list[dict], models: set[str], methods: set[str]) -> list[dict]:
    """The old rows this run did not re-measure, then the new ones (a re-run fewer-steps row replaces the old)."""
    fresh = {(r["model"], r["variant"]) for r in new}
    for r in old:  # fewer steps evaluates every block of every step it runs
        if r.get("method") == "fewer steps":
            r.setdefault("block_share", r["call_share"])
    kept = [r for r in old if (r["model"], r["variant"]) not in fresh and not (
        r["model"] in models and r.get("method") in methods)]
    return kept + new


def write(rows: list[dict], runs: list[dict], out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=1, default=str))
    last = runs[-1]
    lines = [f"# Seed methods on the reference models ({last['date']}, CPU)", "",
             "Every model: 20 Euler steps (reference: the full run), labels 0, 3, 5, 8 (images) / digits 3, 7 "
             "(clips), seed 0, default guidance scales; calibrated methods on other labels (1, 2, 4, 6 / 2, 5) and "
             "seed 1. Shares: measured by a forward pre-hook and `dit_accel.stats` (see the script's docstring; "
             "block share: transformer-block evaluations); PSNR on [0, 1] images / frames vs. the full run.", "",
             "Runs that wrote these rows:", ""]
    for run_ in runs:
        lines.append(f"- {run_['date']}: `{run_['command']}` — models {', '.join(run_['models'])}; methods "
                     f"{', '.join(run_['methods'])}; torch {run_['torch']}, diffusers {run_['diffusers']}, Python "
                     f"{run_['python']}, CPU {run_.get('cpu', 'not recorded')}, {run_.get('threads', 1)} thread(s)")
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {model}", "", "| variant | token share | attention share | calls | block share | PSNR (dB) |",
                  "|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["model"] == model),
                        key=lambda r: (-r.get("block_share", r["token_share"]), -r["token_share"])):
            p = "—" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
            b = f"{r['block_share']:.3f}" if "block_share" in r else "—"
            lines.append(f"| {r['variant']} | {r['token_share']:.3f} | {r['attention_share']:.3f} | "
                         f"{r['call_share']:.3f} | {b} | {p} |")
        lines.append("")
    out.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_dit", "cifar10_mmdit", "digits_wan"])
    parser.add_argument("--methods", nargs="+", default=["bottleneck", "linear_ag", "profiling_dit", "delta_dit",
                                                        "step_rehash", "cachequant"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seed_methods_zoo_cpu.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    old, runs = previous_rows(args.out)
    runs.append({**environment(), "cpu": cpu_name(), "threads": args.threads, "models": args.models,
                 "methods": args.methods})
    groups = set(args.methods) | ({"guidance"} if "linear_ag" in args.methods else set())
    rows: list[dict] = []
    for name in args.models:
        print(name, flush=True)
        done = {int(r["variant"].split(":")[1]) for r in old
                if r["model"] == name and r.get("method") == "fewer steps"} if args.steps == 20 else set()
        rows += bench_model(name, args.steps, args.methods, skip_steps=done)
        write(merge(old, rows, set(args.models), groups), runs, args.out)


if __name__ == "__main__":
    main()
