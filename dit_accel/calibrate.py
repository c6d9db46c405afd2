"""``dit_accel.calibrate``: run a few generations, record what a caching method needs, return a
policy that carries it (and saves to YAML like any other).

A hidden recording method computes every block and records, per CFG branch and step: the
relative L1 change of the first block's modulated input and of its timestep-embedding
argument (TeaCache's inputs), and the relative L1 change and token-wise magnitude ratio of the
block-stack residual (TeaCache's target, MagCache's γ). Each method that needs calibration
implements ``calibrated(config, records, family) -> config``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .adapters.base import call_argument
from .api import _runtimes, accelerated
from .config import ConfigBase, PolicyError, option
from .policies import get_method
from .policies.base import BlockCall, BranchState, CacheMethod, CachePlan
from .policies.dbcache import relative_l1
from .policy import Policy, PolicyLike, load_policy


@dataclass(frozen=True)
class RecordConfig(ConfigBase):
    section: ClassVar[str] = "cache"
    method: str = option("_record", choices=("_record",))


def _rel(current: torch.Tensor | None, previous: torch.Tensor | None) -> float:
    if current is None or previous is None or current.shape != previous.shape:
        return math.nan
    return float(relative_l1(current.float(), previous.float(), per_sample=False))


class Recorder(CacheMethod):
    """Computes everything, records per-step statistics (see module docstring)."""

    name = "_record"
    config_cls = RecordConfig

    def __init__(self, config, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        self.records: list[dict[str, Any]] = []

    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=((0, num_blocks),), watch_inputs=frozenset({0}))

    def on_input(self, call: BlockCall, state: BranchState) -> None:
        m = state.method
        modulated = self.adapter.modulated_input(call.block, call.args, call.kwargs) \
            if self.adapter.modulated_input_fn is not None else None
        temb = call_argument(call.block.meta, "temb", call.args, call.kwargs)
        m["row"] = {"branch": state.key[0], "step": state.step,
                    "modulated_change": _rel(modulated, m.get("modulated")),
                    "temb_change": _rel(temb, m.get("temb"))}
        m["modulated"], m["temb"] = modulated, temb

    def should_reuse(self, range_id: int, state: BranchState) -> bool:
        return False

    def on_range_computed(self, range_id, residual, encoder_residual, encoder_out_is_none, state) -> None:
        m = state.method
        previous = m.get("residual")
        row = m.pop("row")
        row["residual_change"] = _rel(residual, previous)
        if previous is not None and previous.shape == residual.shape:
            ratio = residual.float().norm(dim=-1) / previous.float().norm(dim=-1).clamp_min(1e-12)
            row["mag_ratio"], row["mag_std"] = float(ratio.mean()), float(ratio.std())
        else:
            row["mag_ratio"], row["mag_std"] = math.nan, math.nan
        m["residual"] = residual
        self.records.append(row)


def fit_polynomial(x: Sequence[float], y: Sequence[float], degree: int = 4) -> tuple[float, ...]:
    """Least-squares polynomial y ≈ P(x), highest power first (numpy.polyfit)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() <= degree:
        raise PolicyError(f"calibration recorded {int(keep.sum())} usable steps; need more than {degree} "
                          "(more prompts or steps)")
    return tuple(float(c) for c in np.polyfit(x[keep], y[keep], degree))


def per_branch_mean(records: list[dict], key: str) -> dict[str, list[float]]:
    """Mean of ``key`` over generations, per branch and step (steps with no value are dropped at the start)."""
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in records:
        if math.isfinite(row[key]):
            table[row["branch"]][row["step"]].append(row[key])
    return {branch: [float(np.mean(steps[s])) for s in sorted(steps)] for branch, steps in table.items()}


def calibrate(pipe: Any, prompts: Sequence[str | dict], policy: PolicyLike, **call_kwargs: Any) -> Policy:
    """Run one generation per prompt and return ``policy`` with the method's calibrated fields filled.

    ``prompts``: strings (passed as ``prompt=``) or dicts of call arguments (e.g.
    ``{"class_labels": [3]}``); ``call_kwargs`` go to every call (steps, size, seed...). Calibrate
    at the step count and resolution you will serve.
    """
    policy = load_policy(policy)
    if policy.cache is None:
        raise PolicyError("policy has no cache section to calibrate")
    method = get_method(policy.cache.method)
    if not hasattr(method, "calibrated"):
        raise PolicyError(f"cache.method {policy.cache.method!r} needs no calibration")
    if not prompts:
        raise PolicyError("calibrate needs at least one prompt")
    records: list[dict] = []
    family = None
    with accelerated(pipe, Policy(name="calibration", cache=RecordConfig())):
        runtime = next(iter(_runtimes(pipe).values()))
        family = runtime.adapter.family
        for prompt in prompts:
            kwargs = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
            pipe(**{**call_kwargs, **kwargs})
            records.extend(runtime.method.records)
            runtime.method.records = []
    return Policy(name=policy.name, cache=method.calibrated(policy.cache, records, family))
