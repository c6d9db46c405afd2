"""BAC at block and at sub-block granularity on the trained reference models (offline, CPU), beside fewer steps.

    python benchmarks/bac_variants_zoo.py                                  # cifar10_dit and digits_wan, 20 steps
    python benchmarks/bac_variants_zoo.py --models cifar10_dit --budgets 0.35 0.5 --threads 2

Per model: the full run at ``--steps`` Euler steps is the reference (labels 0, 3, 5, 8 / digits 3, 7, seed 0, the
pipelines' default guidance); BAC is calibrated once per model on other labels (1, 2, 4, 6 / 2, 5) and seed 1 (one
recording with ``BAC.record_options``: per-block and per-sub-block pairwise reuse errors), and each variant's
schedule is fitted from that recording (``BAC.calibrated``, a pure function of it):

* ``block`` — one schedule per block, Bubbling Union over whole blocks (the preset);
* ``sub_block`` — one schedule per attention and per FFN sub-module, the union triggered by FFNs and limited to
  upstream sub-blocks with a significant one-step error (``union_threshold``; 0: every upstream sub-block);
* each as shipped (a common ACS schedule for every unit competes with the units' own united schedules; at a
  budget that is a whole number of steps per unit the common one tends to win and satisfies either union as it
  is) and with the units' own schedules only (``, own schedules only``), where the union rule is what differs.

*compute share*: FLOPs of the whole generation relative to the full run, counted by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, with a formula added for CPU SDPA); this is what
makes the two granularities comparable (a sub-block skips its attention or its FFN, not the norms and
modulation around them). *unit share*: evaluations of the schedule's units (blocks, or sub-blocks) relative to
the full run. PSNR in dB on the [0, 1] images (video: every frame) against the full run. Fewer steps run at the
step counts just below and above each variant's compute share.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, environment, write_results  # noqa: E402

import dit_accel  # noqa: E402
from dit_accel import zoo  # noqa: E402
from dit_accel.caching.bac import BAC, BACConfig, schedule  # noqa: E402
from dit_accel.calibration import record  # noqa: E402
from dit_accel.eval.metrics import psnr  # noqa: E402

LABELS = {"cifar10_dit": [0, 3, 5, 8], "digits_wan": [3, 7]}
CALIBRATION_LABELS = {"cifar10_dit": [1, 2, 4, 6], "digits_wan": [2, 5]}


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and PV of CPU SDPA ([B, H, S, D] shapes), which flop_counter does not count by itself."""
    b, h, s, d = query
    return 2 * b * h * s * key[-2] * d + 2 * b * h * s * key[-2] * value[-1]


def images(raw: torch.Tensor) -> torch.Tensor:
    x = (raw.float() / 2 + 0.5).clamp(0, 1)
    return x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x


def variants(budgets: list[float], thresholds: list[float]) -> dict[str, tuple[BACConfig, bool]]:
    """(config, common_base) by label: the scheduler as shipped (``common_base``: a common ACS schedule for every
    unit competes with the units' own, united schedules) and the units' own schedules only (the paper's ACS +
    union, as far as the budget allows)."""
    out = {}
    for budget in budgets:
        for common in (True, False):
            how = "" if common else ", own schedules only"
            out[f"BAC block, budget {budget}{how}"] = (BACConfig(budget=budget), common)
            for t in thresholds:
                out[f"BAC sub_block, budget {budget}, union_threshold {t}{how}"] = (
                    BACConfig(budget=budget, granularity="sub_block", union_threshold=t), common)
    return out


def fitted(config: BACConfig, records, common_base: bool) -> BACConfig:
    """``BAC.calibrated`` with the scheduler's ``common_base`` choice."""
    if common_base:
        return BAC.calibrated(config, records, "")
    sub = config.granularity == "sub_block"
    key = "sub_dist" if sub else "block_dist"
    units = len(records[0][key])
    per_unit = [records.pairwise(lambda row, i=i: row[key][i]) for i in range(units)]
    result = {}
    for branch in per_unit[0]:
        tables = [p[branch] for p in per_unit]
        steps = tables[0].shape[0]
        total = max(int(round(config.budget * units * steps)), units * min(config.warmup_steps, steps))
        result[branch] = schedule(tables, total, config.warmup_steps, config.bubbling,
                                  records[0]["sub_kinds"] if sub else None, config.union_threshold,
                                  common_base=False)
    return dataclasses.replace(config, schedule=result, calibrated_steps=steps)


def bench_model(name: str, steps: int, budgets: list[float], thresholds: list[float]) -> list[dict]:
    pipe = zoo.load(name)
    pipe.set_progress_bar_config(disable=True)
    cond = zoo.class_conditions(pipe, LABELS[name])
    common = dict(**cond, output_type="raw", num_inference_steps=steps)

    def run(label: str, policy=None, method: str = "", **kw) -> dict:
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as flops:
            if policy is None:
                raw = pipe(**{**common, "generator": torch.Generator().manual_seed(0), **kw})[0]
                stats = None
            else:
                with dit_accel.accelerated(pipe, policy):
                    raw = pipe(**{**common, "generator": torch.Generator().manual_seed(0), **kw})[0]
                    stats = dit_accel.stats(pipe)
        row = {"model": name, "variant": label, "method": method, "seconds": time.perf_counter() - t0,
               "flops": flops.get_total_flops(), "images": images(raw)}
        if stats is not None:
            sub = stats.extra.get("sub_blocks")
            done, skipped = (sum(sub["computed"]), sum(sub["reused"])) if sub else \
                (stats.blocks_computed, stats.blocks_reused)
            row["unit_share"] = done / (done + skipped)
        return row

    reference = run(f"full run, {steps} steps", method="full")
    reference.update(compute_share=1.0, unit_share=1.0, psnr=math.inf)
    rows = [reference]
    calib = [zoo.class_conditions(pipe, [c]) for c in CALIBRATION_LABELS[name]]
    calib = [{k: (v[0] if isinstance(v, list) else v) for k, v in c.items()} for c in calib]
    records, family = record(pipe, calib, BAC.record_options, num_inference_steps=steps,
                             generator=torch.Generator().manual_seed(1), output_type="raw")

    def finish(row: dict) -> dict:
        row["compute_share"] = row["flops"] / reference["flops"]
        row["psnr"] = psnr(row["images"], reference["images"], data_range=1.0)
        print(f"  {row['variant']}: compute share {row['compute_share']:.3f}, unit share "
              f"{row.get('unit_share', float('nan')):.3f}, PSNR {row['psnr']:.2f} dB ({row['seconds']:.0f} s)",
              flush=True)
        rows.append(row)
        return row

    shares = []
    for label, (config, common_base) in variants(budgets, thresholds).items():
        calibrated = fitted(config, records, common_base)
        policy = dit_accel.Policy(name="bac", cache=calibrated, calibrated_for=records.calibrated_for)
        shares.append(finish(run(label, policy, method=config.granularity))["compute_share"])
    ks = sorted({k for s in shares for k in (max(1, math.floor(s * steps + 1e-9)), math.ceil(s * steps - 1e-9))
                 if k < steps})
    for k in ks:
        row = run(f"fewer steps: {k}", method="fewer steps", num_inference_steps=k)
        row["unit_share"] = k / steps
        finish(row)
    for row in rows:
        row.pop("images")
    return rows


def fewer_steps_at(rows: list[dict], share: float) -> str:
    """PSNR of the fewer-steps runs just below and above ``share``."""
    fewer = sorted((r for r in rows if r["method"] == "fewer steps"), key=lambda r: r["compute_share"])
    below = [r for r in fewer if r["compute_share"] <= share + 1e-9][-1:]
    above = [r for r in fewer if r["compute_share"] > share + 1e-9][:1]
    return " / ".join(f"{r['variant'].split(': ')[1]} steps: {r['psnr']:.2f}" for r in below + above) or "—"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(LABELS), choices=list(LABELS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.35, 0.5])
    ap.add_argument("--thresholds", nargs="+", type=float, default=[1.0, 0.0],
                    help="sub_block union_threshold values")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="bac_variants_zoo_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [m for m in args.models if m not in zoo.available()]
    if missing:
        raise SystemExit(f"reference weights not installed: {missing}")
    rows = []
    for name in args.models:
        print(name, flush=True)
        rows += bench_model(name, args.steps, args.budgets, args.thresholds)
    env = {**environment(), "cpu": cpu_name(), "threads": args.threads}
    md = [f"# BAC at block and sub-block granularity on the reference models ({env['date']}, CPU)", "",
          "```", *(f"{k}: {v}" for k, v in env.items()), "```", "",
          f"{args.steps} Euler steps (reference: the full run), labels 0, 3, 5, 8 (images) / digits 3, 7 (clips), "
          "seed 0; BAC calibrated on other labels (1, 2, 4, 6 / 2, 5) and seed 1, one recording per model. Compute "
          "share: FLOPs of the generation (FlopCounterMode) vs. the full run; unit share: evaluations of the "
          "schedule's units (blocks / sub-blocks); PSNR on [0, 1] images / frames vs. the full run; fewer steps: "
          "the step counts just below / above each variant's compute share.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        md += [f"## {model}", "", "| variant | compute share | unit share | PSNR (dB) | fewer steps near that share |",
               "|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: (r["method"] == "fewer steps", -r["compute_share"])):
            p = "—" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
            near = fewer_steps_at(mine, r["compute_share"]) if r["method"] in ("block", "sub_block") else ""
            md.append(f"| {r['variant']} | {r['compute_share']:.3f} | {r['unit_share']:.3f} | {p} | {near} |")
        md.append("")
    payload = {"environment": env, "args": vars(args), "rows": rows}
    write_results(args.name, payload, "\n".join(md))
    return payload


if __name__ == "__main__":
    main()
