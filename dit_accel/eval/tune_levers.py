"""Speed levers for :func:`dit_accel.tune`: compile, FP8 linears and sparse attention beside the cache search.

A *lever* is a policy section that saves time without skipping computation the compute share counts:
regional ``torch.compile`` (``compile:``), FP8 linear layers through torchao (``quant:``) and block-sparse
self-attention (``attention:``). Levers are measured before the cache search, each alone, against the
unaccelerated pipeline on the search pairs:

* **quality**: ``metric`` of the lever alone against the unaccelerated output; a lever below
  ``floor`` (:data:`FLOORS`: the loss no cache could win back) is dropped;
* **speed**: the wall-clock speed-up of the lever alone, in interleaved rounds with the baseline
  (:mod:`dit_accel.eval.timing`); a lever whose range does not lie above 1.0× is dropped — a lever that
  makes the call slower (or whose gain is inside the measured spread) is not applied.

The kept levers go into every cache candidate *and* into the fewer-steps competitor (a user who compiles
can compile fewer steps too), so the margin the tuner demands is the cache's own. The search's compute
target becomes ``target / lever_speedup`` (the product of the kept levers' median speed-ups, an estimate
the final wall-clock measurement of the whole composition checks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..config import PolicyError
from ..policy import Policy
from .timing import CallTimer, interleaved, median_spread

if TYPE_CHECKING:
    from .tune import _Engine

#: named levers -> the policy sections they add
LEVERS: dict[str, dict[str, Any]] = {
    "compile": {"compile": {"mode": "regional"}},
    "fp8": {"quant": {"linear": "fp8_dynamic"}},
    "sparse": {"attention": {"sparse": {"method": "xattention", "threshold": 0.9}, "warmup_steps": 2}},
}
SECTIONS = ("compile", "quant", "attention", "memory")
#: default quality floor of a lever alone, per metric (higher-is-better metrics: at least; others: at most)
FLOORS = {"psnr": 25.0, "ssim": 0.9, "lpips": 0.1, "rel_l2": 0.1}


@dataclass(frozen=True)
class Lever:
    """One lever: a name and the policy sections it adds."""

    name: str
    sections: Mapping[str, Any]


@dataclass
class LeverResult:
    """What a lever alone measured on the search pairs, and whether the tuner keeps it."""

    lever: Lever
    score: float
    speedup: float | None = None
    speed_range: tuple[float, float] | None = None
    kept: bool = False
    reason: str = ""


def resolve_levers(levers: Sequence[str | Mapping[str, Any]]) -> list[Lever]:
    """Named levers (:data:`LEVERS`) or mappings ``{"name": ..., <section>: {...}}``; validated as policies."""
    if isinstance(levers, (str, bytes, Mapping)):
        raise PolicyError("tune: levers must be a list, e.g. levers=['compile', 'fp8']")
    out: list[Lever] = []
    for item in levers:
        if isinstance(item, str):
            if item not in LEVERS:
                raise PolicyError(f"tune: unknown lever {item!r}; choose from {list(LEVERS)} or pass a mapping of "
                                  f"policy sections ({', '.join(SECTIONS)})")
            lever = Lever(item, LEVERS[item])
        elif isinstance(item, Mapping):
            sections = {k: v for k, v in item.items() if k != "name"}
            bad = [k for k in sections if k not in SECTIONS]
            if bad or not sections:
                raise PolicyError(f"tune: a lever mapping holds policy sections among {list(SECTIONS)} (and a "
                                  f"'name'), got {sorted(item)}")
            lever = Lever(str(item.get("name") or "+".join(sections)), sections)
        else:
            raise PolicyError(f"tune: a lever is a name or a mapping, got {item!r}")
        lever_policy([lever])  # validates the sections now, not in the middle of the search
        if any(set(lever.sections) & set(o.sections) for o in out):
            raise PolicyError(f"tune: lever {lever.name!r} sets a section another lever sets")
        out.append(lever)
    return out


def lever_policy(levers: Sequence[Lever], name: str = "levers") -> Policy | None:
    """One policy holding every lever's sections (None without levers)."""
    if not levers:
        return None
    sections: dict[str, Any] = {}
    for lever in levers:
        sections.update(lever.sections)
    return Policy(name=name, **sections)


def with_levers(policy: Policy, levers: Sequence[Lever]) -> Policy:
    """``policy`` with the levers' sections added (the policy's own sections win)."""
    extra = lever_policy(levers)
    if extra is None:
        return policy
    changes = {s: getattr(extra, s) for s in SECTIONS if getattr(extra, s) is not None and getattr(policy, s) is None}
    return dataclasses.replace(policy, **changes)


def _passes(score: float, floor: float, higher: bool) -> bool:
    return score >= floor if higher else score <= floor


def measure_levers(engine: "_Engine", levers: Sequence[Lever], pairs: list[tuple[int, int]], floor: float,
                   higher: bool, warmup: int, repeats: int, speed: str) -> list[LeverResult]:
    """Score every lever alone on ``pairs`` against the unaccelerated output, time the ones above the floor
    beside the baseline (every pair in each sample), and mark which to keep."""
    from .. import api
    from .tune import Candidate, _mean

    results = []
    for lever in levers:
        cand = Candidate(f"lever {lever.name}", "lever", lever_policy([lever], f"lever-{lever.name}"), engine.steps)
        score = _mean(engine.measure(cand, pair)[0] for pair in pairs)
        result = LeverResult(lever, score)
        if not _passes(score, floor, higher):
            result.reason = f"{score:.2f} against the unaccelerated output is past the floor {floor:g}"
        results.append(result)
    timed = [r for r in results if not r.reason]
    if not timed:
        return results
    modules = list(api._transformers(engine.pipe).values())
    timer = CallTimer(modules, next(modules[0].parameters()).device)

    def call(rnd: int) -> None:
        for index, seed in pairs:
            engine.pipe(**engine.call_args(engine.prompts[index], seed, engine.steps))

    variants = {"baseline": (lambda: None, call, lambda: None)}
    for r in timed:
        policy = lever_policy([r.lever], f"lever-{r.lever.name}")
        variants[r.lever.name] = (lambda p=policy: api.accelerate(engine.pipe, p), call,
                                  lambda: api.remove(engine.pipe))
    timings = interleaved(variants, timer, warmup, repeats)
    which = "transformer_ms" if speed == "transformer" else "e2e_ms"
    base, base_spread = median_spread(getattr(timings["baseline"], which))
    for r in timed:
        med, spread = median_spread(getattr(timings[r.lever.name], which))
        r.speedup = base / med
        r.speed_range = ((base - base_spread) / (med + spread), (base + base_spread) / max(med - spread, 1e-9))
        if r.speed_range[0] <= 1.0:
            r.reason = (f"{r.speedup:.2f}× (range {r.speed_range[0]:.2f}–{r.speed_range[1]:.2f}) is not a measured "
                        "gain")
        else:
            r.kept = True
            r.reason = f"kept: {r.speedup:.2f}× (range {r.speed_range[0]:.2f}–{r.speed_range[1]:.2f}), {r.score:.2f}"
    return results


def combined_speedup(results: Sequence[LeverResult]) -> float:
    """The product of the kept levers' median speed-ups (1.0 without any)."""
    return math.prod(r.speedup for r in results if r.kept and r.speedup is not None)
