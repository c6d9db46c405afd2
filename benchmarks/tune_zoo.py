"""``dit_accel.tune`` on the trained reference models (offline, CPU): does the tuned policy beat fewer steps?

For each zoo model and target speed-up, tune on search classes (seed 0) and validate on *other* classes and
seeds (held-out prompts and seeds), at the model card's sampler settings. One results store per model is shared
by the targets (their candidates overlap, so the second target regenerates little). Writes a Markdown table and
the raw rows (JSON)::

    python benchmarks/tune_zoo.py --models cifar10_dit cifar10_mmdit --targets 2 3 \\
        --out benchmarks/results/tune_zoo_cpu --store /tmp/tune_zoo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

import dit_accel  # noqa: E402
from dit_accel import zoo  # noqa: E402
from dit_accel.eval.tune import tune  # noqa: E402


def run(name: str, targets: list[float], args: argparse.Namespace) -> list[dict]:
    pipe = zoo.load(name)
    steps = args.steps or pipe.defaults["num_inference_steps"]
    call = {k: v for k, v in pipe.defaults.items() if k != "num_inference_steps"}
    if args.frames and name == "digits_wan":
        call["num_frames"] = args.frames
    search = [zoo.class_conditions(pipe, [c]) for c in args.search_classes]
    held = [zoo.class_conditions(pipe, [c]) for c in args.holdout_classes]
    rows = []
    for target in targets:
        t0 = time.perf_counter()
        result = tune(pipe, search, target_speedup=target, budget_minutes=args.budget, seeds=args.seeds,
                      holdout_seeds=args.holdout_seeds, holdout_prompts=held, store=Path(args.store) / name,
                      timing_repeats=args.repeats, progress=not args.quiet, methods=args.methods,
                      num_inference_steps=steps, **call)
        seconds = time.perf_counter() - t0
        v = result.chosen
        row = {"model": name, "target": target, "steps": steps, "seconds": seconds, "call": call,
               "command": environment()["command"], "date": environment()["date"],
               "search_classes": args.search_classes, "holdout_classes": args.holdout_classes, "seeds": args.seeds,
               "holdout_seeds": args.holdout_seeds, "methods": args.methods or "all", "policy": None
               if result.policy is None else result.policy.to_dict(), "explanation": result.explanation,
               "competitor_at_target": result.competitor, "notes": result.notes, "table": result.table(),
               "validations": [{"label": x.trial.candidate.label, "share": x.share, "psnr": x.score,
                                "competitor_steps": x.competitor_steps, "competitor_psnr": x.competitor_score,
                                "margin_db": x.margin, "wall_speedup": x.wall_speedup, "wall_range": x.wall_range,
                                "speed": x.speed, "speed_basis": x.speed_basis, "fallbacks": x.fallbacks}
                               for x in result.validations]}
        if v is not None:
            row["chosen"] = v.trial.candidate.label
            if args.save_policies:
                result.save_pretrained(Path(args.out).parent / f"tuned_{name}_{target:g}x")
        rows.append(row)
        print(f"[{name} {target:g}x] {result.explanation} ({seconds:.0f} s)", flush=True)
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    first: dict[str, str] = {}
    for r in rows:  # each command once, with the time its first row finished
        first.setdefault(r["command"], r["date"])
    commands = [f"`{c}` (first row {d})" for c, d in first.items()]
    lines = ["# dit_accel.tune on the reference models (CPU)", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}, one CPU thread of a 2-core machine shared with "
             "other jobs (wall-clock ranges are wide for that reason). Commands:", "",
             *[f"- {c}" for c in commands], "",
             "Per model: search classes and seeds, held-out classes and seeds (held-out seeds are 1000, 1001, ...; "
             "neither the held-out classes nor the seeds are seen by the search or the calibration), searched "
             "methods and call settings are in the sections below and in the JSON beside this file. PSNR against the "
             "unaccelerated output of the same class and seed; *fewer steps* is the "
             "unaccelerated pipeline at `round(steps × compute share)` steps on the same held-out pairs. Speed-up: "
             "wall-clock of the whole pipeline call (median of interleaved rounds, range = baseline ± spread over "
             "candidate ∓ spread), or the compute bound `1 / share` where the target lies inside that range.", "",
             "| model | target | tuned policy | compute share | speed-up (basis) | held-out PSNR | fewer steps "
             "(steps: PSNR) | margin | tune time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chosen = next((v for v in r["validations"] if v["label"] == r.get("chosen")), None)
        if chosen is None:
            lines.append(f"| {r['model']} | {r['target']:g}× | none: {r['explanation']} | | | | "
                         f"{r['competitor_at_target']['steps']}: {r['competitor_at_target']['score']:.2f} | | "
                         f"{r['seconds']:.0f} s |")
            continue
        lines.append(f"| {r['model']} | {r['target']:g}× | `{chosen['label']}` | {chosen['share']:.3f} | "
                     f"{chosen['speed']:.2f}× ({chosen['speed_basis']}) | {chosen['psnr']:.2f} dB | "
                     f"{chosen['competitor_steps']}: {chosen['competitor_psnr']:.2f} dB | "
                     f"**{chosen['margin_db']:+.2f} dB** | {r['seconds']:.0f} s |")
    for r in rows:
        lines += ["", f"## {r['model']}, target {r['target']:g}× ({r['steps']} steps)", "",
              f"Search classes {r['search_classes']} × {r['seeds']} seed(s); held out classes {r['holdout_classes']} "
              f"× {r['holdout_seeds']} seed(s); methods {r['methods']}; call {r['call']}.", "", r["table"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar10_dit", "cifar10_mmdit", "digits_wan"])
    p.add_argument("--targets", nargs="+", type=float, default=[2.0, 3.0])
    p.add_argument("--search-classes", nargs="+", type=int, default=[1, 7])
    p.add_argument("--holdout-classes", nargs="+", type=int, default=[0, 3])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--holdout-seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="default: the model card's")
    p.add_argument("--frames", type=int, default=None, help="digits_wan: frames per clip (default: the model's)")
    p.add_argument("--budget", type=float, default=3.0, help="search budget per target, minutes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--store", default="/tmp/dit_accel_tune_zoo")
    p.add_argument("--out", default="benchmarks/results/tune_zoo_cpu")
    p.add_argument("--methods", nargs="+", default=None, help="methods to search (default: all)")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing --out JSON (rows of the same model and target are replaced)")
    p.add_argument("--render", action="store_true", help="only write the Markdown again from the --out JSON")
    p.add_argument("--save-policies", action="store_true", help="also save each tuned policy folder beside --out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread also keeps the timing steadier
    dit_accel.logging.set_verbosity_error()
    env = environment()
    out = Path(args.out)
    if args.render:
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())["rows"], env))
        return
    rows = [row for name in args.models for row in run(name, args.targets, args)]
    if args.append and out.with_suffix(".json").is_file():
        new = {(r["model"], r["target"]) for r in rows}
        old = json.loads(out.with_suffix(".json").read_text())["rows"]
        rows = [r for r in old if (r["model"], r["target"]) not in new] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(rows, env))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
