"""The ``dit-accel`` command line: ``demo``, ``presets``, ``methods``, ``show`` (plus ``eval``, ``sweep``, ``report``).

The lists in the help texts and error messages come from the registries: caching methods from
``dit_accel.caching`` (``method_names()`` / ``alias_names()``), presets from ``dit_accel.preset_names()``,
tiny families from ``dit_accel.testing.FAMILIES``. ``dit-accel --help`` imports no torch: a sub-command's
arguments (and the method lists, which need the caching modules) are built only when that sub-command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import textwrap
from typing import Any, Callable, Iterable

from .config import PolicyError

DESCRIPTION = "Training-free acceleration of diffusion transformers in HuggingFace diffusers."


# ---------------------------------------------------------------------------------------------------
# Registry lists (each imported where it is needed)
# ---------------------------------------------------------------------------------------------------


def _preset_names() -> list[str]:
    from .presets import preset_names  # = dit_accel.preset_names, without importing the policy modules

    return preset_names()


def _tiny_models() -> list[str]:
    from .testing import FAMILIES

    return [f"tiny-{family}" for family in FAMILIES]


def _cache_methods() -> tuple[list[str], dict[str, tuple[str, dict[str, Any]]]]:
    from .caching import alias_names, method_names

    return method_names(), alias_names()


def _guidance_methods() -> dict[str, type]:
    """``guidance.method`` name -> config class (the name is the default of the class's ``method`` field)."""
    from .caching.base import guidance_config_types

    out = {}
    for cls in guidance_config_types():
        default = next((f.default for f in dataclasses.fields(cls) if f.name == "method"), None)
        out[str(default)] = cls
    return out


def _alias_text(method: str, defaults: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in defaults.items())
    return f"{method} with {settings}" if settings else method


def _summary(cls: type) -> str:
    """The first paragraph (for the caching methods: the first line) of a config class's docstring, on one
    line ('' when the class has no docstring of its own)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    if not doc or doc.startswith(f"{cls.__name__}("):  # the signature dataclasses writes without a docstring
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def _methods_text() -> str:
    names, aliases = _cache_methods()
    listed = [*names, *(f"{alias} (= {_alias_text(*aliases[alias])})" for alias in sorted(aliases))]
    return (f"caching methods (cache.method): {', '.join(listed)}; guidance methods (guidance.method): "
            f"{', '.join(_guidance_methods())}")


# ---------------------------------------------------------------------------------------------------
# Sub-commands
# ---------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model=args.model, policies=args.policies, steps=args.steps, repeats=args.repeats,
             out_dir=None if args.no_images else args.out, batch=args.batch, progress=not args.quiet)
    return 0


def _default_dict(section: Any) -> dict:
    """The section's defaults as ``to_dict`` writes them ({} when the section has required fields)."""
    try:
        return type(section)().to_dict()
    except (TypeError, ValueError, PolicyError):
        return {d.name: d.default for d in dataclasses.fields(section)}


def _set_fields(values: dict, defaults: dict, keep: tuple = ()) -> dict:
    """The entries of ``values`` that differ from ``defaults`` (nested sections compared field by field)."""
    out = {}
    for k, v in values.items():
        d = defaults.get(k, object())
        if isinstance(v, dict) and isinstance(d, dict):
            v = _set_fields(v, d, keep)
            if v:
                out[k] = v
        elif k in keep or v != d:
            out[k] = v
    return out


def _presets(args: argparse.Namespace) -> int:
    """One line per preset: each section's set fields, calibrated tables summarised by their size."""
    from .config import ConfigBase, describe_value
    from .policy import load_policy, preset_names

    width = max(len(n) for n in preset_names())
    for name in preset_names():
        policy = load_policy(name)
        parts = []
        for f in dataclasses.fields(policy):
            section = getattr(policy, f.name)
            if f.name == "calibrated_for" and section is not None:
                parts.append(f"calibrated for {getattr(section, 'model', '?')} ({getattr(section, 'blocks', '?')} "
                             "blocks)")
            elif isinstance(section, ConfigBase):
                fields = _set_fields(section.to_dict(), _default_dict(section), keep=("method", "linear"))
                parts.append(f"{f.name}: " + ", ".join(f"{k}={describe_value(v, limit=4)}" for k, v in fields.items()
                                                       if v is not None))
        print(f"{name:<{width}}  {'; '.join(parts) or 'no acceleration'}")
    print("dit-accel show NAME prints a preset in full (--explain: with every option's docs).")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .caching import cache_config_from_dict, get_method

    names, aliases = _cache_methods()
    guidance = _guidance_methods()
    for name in args.names:
        if name not in (*names, *aliases, *guidance):
            raise PolicyError(f"unknown method {name!r}; {_methods_text()}")
    for i, name in enumerate(args.names):  # the options of the named methods
        if name in guidance:
            block = _explain_block(f"guidance method {name}", guidance[name])
        else:
            config = cache_config_from_dict({"method": name})  # an alias: its method with the alias's settings
            title = f"caching method {name}" + (f" (= {_alias_text(*aliases[name])})" if name in aliases else "")
            block = _explain_block(title, type(config), config)
        print(("\n" if i else "") + block)
    if args.names:
        return 0
    rows = [(name, _summary(get_method(name).config_cls)) for name in names]
    rows += [(alias, f"= {_alias_text(*aliases[alias])}: {_summary(get_method(aliases[alias][0]).config_cls)}")
             for alias in sorted(aliases)]
    width = max(len(name) for name, _ in [*rows, *((g, "") for g in guidance)])
    print("caching methods (cache: {method: NAME}):")
    for name, text in rows:
        print(f"  {name:<{width}}  {text}")
    print("guidance methods (guidance: {method: NAME}):")
    for name, cls in guidance.items():
        print(f"  {name:<{width}}  {_summary(cls)}")
    print("dit-accel methods NAME lists a method's options; dit-accel show PRESET --explain a preset's.")
    return 0


def _option_table(cls: type, values: Any = None, indent: str = "  ") -> list[str]:
    """One line per documented option of ``cls``: name, value (when it differs from the default), default,
    allowed values, doc."""
    from .config import describe_value, explain_options

    def short(text: str, limit: int = 40) -> str:
        return text if len(text) <= limit else text[:limit - 3] + "..."

    rows = []
    for name, default, constraints, doc in explain_options(cls):
        value = None if values is None else describe_value(getattr(values, name))
        setting = f"{short(value)} (default {default})" if value is not None and value != default else default
        rows.append((name, setting, f"[{constraints}] " if constraints else "", doc))
    if not rows:
        return [f"{indent}(no documented options)"]
    name_w = max(len(r[0]) for r in rows)
    set_w = min(max(len(r[1]) for r in rows), 32)
    return [f"{indent}{n:<{name_w}}  {s:<{set_w}}  {c}{d}" for n, s, c, d in rows]


def _explain_block(title: str, cls: type, values: Any = None) -> str:
    summary = _summary(cls)
    lines = [f"{title}: {cls.__name__}" + (f" — {summary}" if summary else "")]
    lines += _option_table(cls, values)
    return "\n".join(lines)


def _explain_policy(policy: Any) -> str:
    """For every section of ``policy`` (and every nested sub-section), its config class's option docs."""
    from .config import ConfigBase

    blocks = []

    def add(where: str, section: ConfigBase) -> None:
        blocks.append(_explain_block(where, type(section), section))
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, ConfigBase):
                add(f"{where}.{f.name}", value)

    for f in dataclasses.fields(policy):
        section = getattr(policy, f.name)
        if isinstance(section, ConfigBase):
            add(f.name, section)
    if not blocks:
        return "no sections: no acceleration (outputs bit-identical to the pipeline's)"
    return "\n\n".join(blocks)


def _show(args: argparse.Namespace) -> int:
    from .policy import load_policy

    policy = load_policy(args.policy)
    print(policy.to_yaml(), end="")
    if args.explain:
        print("\n# options (value when not the default; [allowed values])")
        print(_explain_policy(policy))
    return 0


# ---------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, without breaking lines inside hyphenated names (``cifar10_dit-teacache``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a trained reference model: cifar10_dit (default when installed), cifar10_mmdit "
                        "(text-to-image MM-DiT), digits_wan (text-to-video, 8 frames shown), or tiny-FAMILY "
                        f"(random weights: {', '.join(_tiny_models())})")
    p.add_argument("--policies", nargs="+", default=None,
                   help=f"presets ({', '.join(_preset_names())}) or YAML files to compare with the baseline "
                        "(default: fbcache, fora, and for the reference model its calibrated teacache/magcache "
                        "presets)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds, all variants interleaved in each; time = median ± half the range")
    p.add_argument("--batch", type=int, default=4, help="images per call for the reference model")
    p.add_argument("--out", default="dit_accel_demo", help="folder for demo_grid.png")
    p.add_argument("--no-images", action="store_true", help="do not write the image grid")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr (the table still prints)")
    p.set_defaults(func=_demo)


def _configure_presets(p: argparse.ArgumentParser) -> None:
    p.epilog = f"presets: {', '.join(_preset_names())}"
    p.set_defaults(func=_presets)


def _configure_methods(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="methods whose options to list (default: list the methods)")
    p.epilog = _methods_text()
    p.set_defaults(func=_methods)


def _configure_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("policy", metavar="NAME", help=f"a preset ({', '.join(_preset_names())}) or a policy YAML file")
    p.add_argument("--explain", action="store_true",
                   help="also list every option of each section: value, default, allowed values and what it does")
    p.epilog = _methods_text()
    p.set_defaults(func=_show)


# name -> (one-line help, what builds its arguments)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "demo": ("baseline vs accelerated on an offline pipeline (table + image grid)", _configure_demo),
    "presets": ("list the shipped presets", _configure_presets),
    "methods": ("list the caching and guidance methods (NAME: its options)", _configure_methods),
    "show": ("print a policy (preset, YAML path) as validated YAML (--explain: with every option's docs)",
             _configure_show),
}


def _epilog() -> str:
    def wrapped(label: str, items: Iterable[str], tail: str = "") -> str:
        return textwrap.fill(f"{label}: {', '.join(items)}{tail}", width=100, subsequent_indent="  ",
                             break_on_hyphens=False)
    return "\n".join([wrapped("presets", _preset_names(), " (dit-accel show NAME --explain)"),
                      wrapped("tiny models", _tiny_models(), " (demo --model, eval --model)"),
                      "caching and guidance methods: dit-accel methods"])


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``dit-accel`` parser; ``commands``: the sub-commands of :data:`COMMANDS` whose arguments to build
    (default: all; the others are listed, with their one-line help, but take no arguments)."""
    chosen = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(prog="dit-accel", description=DESCRIPTION, epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                           formatter_class=_Formatter)
        if name in chosen:
            configure(p)

    try:  # eval / sweep / report live with the evaluation harness
        from .eval.cli import register_commands
    except ModuleNotFoundError as err:
        if err.name not in ("dit_accel.eval", "dit_accel.eval.cli"):
            raise
    else:
        register_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level takes no option values
    args = build_parser([command] if command in COMMANDS else ()).parse_args(argv)
    try:
        return args.func(args)
    except PolicyError as err:
        print(f"dit-accel: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
