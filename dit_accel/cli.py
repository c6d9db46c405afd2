"""The ``dit-accel`` command line: ``demo``, ``presets``, ``show``."""

from __future__ import annotations

import argparse
import sys

from .config import PolicyError


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model=args.model, policies=args.policies, steps=args.steps, repeats=args.repeats,
             out_dir=None if args.no_images else args.out, batch=args.batch)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .policy import load_policy, preset_names

    width = max(len(n) for n in preset_names())
    for name in preset_names():
        policy = load_policy(name)
        parts = [f"{section}: {getattr(policy, section).to_dict()}" for section in ("cache", "guidance")
                 if getattr(policy, section, None) is not None]
        print(f"{name:<{width}}  {'; '.join(parts) or 'no acceleration'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .policy import load_policy

    print(load_policy(args.policy).to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-accel", description="Training-free acceleration of diffusion "
                                     "transformers in HuggingFace diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="baseline vs accelerated on an offline pipeline (table + image grid)")
    demo.add_argument("--model", default=None,
                      help="a trained reference model: cifar10_dit (default when installed), cifar10_mmdit "
                           "(text-to-image MM-DiT), digits_wan (text-to-video, 8 frames shown), or tiny-FAMILY "
                           "(random weights: tiny-flux, tiny-sd3, tiny-pixart, tiny-dit, tiny-wan, "
                           "tiny-hunyuan_video, tiny-cogvideox)")
    demo.add_argument("--policies", nargs="+", default=None,
                      help="presets or YAML files to compare with the baseline (default: fbcache, fora, and for "
                           "the reference model its calibrated teacache/magcache presets)")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    demo.add_argument("--repeats", type=int, default=1, help="timed calls per variant (median)")
    demo.add_argument("--batch", type=int, default=4, help="images per call for the reference model")
    demo.add_argument("--out", default="dit_accel_demo", help="folder for demo_grid.png")
    demo.add_argument("--no-images", action="store_true", help="do not write the image grid")
    demo.set_defaults(func=_demo)

    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(func=_presets)

    show = sub.add_parser("show", help="print a policy (preset, YAML path) as validated YAML")
    show.add_argument("policy")
    show.set_defaults(func=_show)

    try:  # eval / sweep / report live with the evaluation harness
        from .eval.cli import register_commands
    except ModuleNotFoundError as err:
        if err.name not in ("dit_accel.eval", "dit_accel.eval.cli"):
            raise
    else:
        register_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PolicyError as err:
        print(f"dit-accel: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
