"""First-block residual gate (FBCache) and its DBCache generalisation.

FBCache — "First Block Cache", ParaAttention (chengzeyi, 2024): run the first block; if the
relative L1 change of its residual since the last fully computed step is below ``threshold``,
skip every other block and add their cached residual. DBCache — cache-dit (vipshop, 2025):
"Fn compute, Bn compute": always compute the first ``fn_compute`` blocks (their residual is the
gate's probe) and the last ``bn_compute`` blocks (they refine the reused middle); only the
middle range is cached.

Defaults: ``fn_compute=1, bn_compute=0`` is FBCache; ``threshold=0.08`` is ParaAttention's
FLUX setting and cache-dit's ``residual_diff_threshold`` default. ``warmup_steps`` (cache-dit's
``max_warmup_steps``) and ``max_consecutive_reuse`` (cache-dit's
``max_continuous_cached_steps``) are off by default, as in FBCache.

Departures: the gate is evaluated per sample (``batch_decision="strict"``): the middle is
reused only if every sample in the batch agrees; ``"mean"`` pools the batch into one number as
ParaAttention and diffusers do. ``gate_lag=k`` computes ``k`` more blocks after the probe before
the cached range starts, so the host reads the gate's verdict while those blocks keep the GPU
busy instead of draining its queue (measured in benchmarks/results/flux_hooks.md). The reference residual is the one from the last *computed*
step (as in both anchors), so small drifts accumulate instead of hiding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ConfigBase, PolicyError, option
from .base import BranchState, CacheMethod, CachePlan, batch_agrees, keep, take


@dataclass(frozen=True)
class DBCacheConfig(ConfigBase):
    section: ClassVar[str] = "cache"
    method: str = option("dbcache", choices=("dbcache",))
    threshold: float = option(0.08, ge=0.0, le=10.0, doc="relative L1 change of the probe residual under which the middle is reused")
    fn_compute: int = option(1, ge=1, doc="first blocks always computed (the probe)")
    bn_compute: int = option(0, ge=0, doc="last blocks always computed")
    warmup_steps: int = option(0, ge=0, doc="steps always computed at the start of each call")
    max_consecutive_reuse: int | None = option(None, ge=1, doc="reuse at most this many steps in a row")
    batch_decision: str = option("strict", choices=("strict", "mean"),
                                 doc="strict: reuse only if every sample agrees; mean: one pooled decision")
    gate_lag: int = option(0, ge=0, doc="blocks computed between the probe and the cached range, so the host "
                                         "reads the gate while the GPU is busy (0 = the anchors' behaviour)")


def l1(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Sum of |x| in float32 without a float32 copy: per sample (dim 0) or pooled."""
    dims = tuple(range(1, x.ndim)) if per_sample else tuple(range(x.ndim))
    return torch.linalg.vector_norm(x, ord=1, dim=dims, dtype=torch.promote_types(x.dtype, torch.float32))


def relative_l1(current: torch.Tensor, previous: torch.Tensor, per_sample: bool,
                previous_l1: torch.Tensor | None = None) -> torch.Tensor:
    """mean|current − previous| / mean|previous|, per sample (dim 0) or pooled; float32."""
    base = l1(previous, per_sample) if previous_l1 is None else previous_l1
    return l1(current - previous, per_sample) / base.clamp_min(torch.finfo(torch.float32).tiny)


class DBCache(CacheMethod):
    name = "dbcache"
    config_cls = DBCacheConfig

    def make_plan(self, num_blocks: int) -> CachePlan:
        c = self.config
        if c.fn_compute + c.gate_lag + c.bn_compute >= num_blocks:
            raise PolicyError(
                f"cache.fn_compute ({c.fn_compute}) + cache.gate_lag ({c.gate_lag}) + cache.bn_compute "
                f"({c.bn_compute}) must be less than the model's number of blocks ({num_blocks}) so that something "
                "is left to cache")
        return CachePlan(ranges=((c.fn_compute + c.gate_lag, num_blocks - c.bn_compute),),
                         watch_inputs=frozenset({0}), watch_outputs=frozenset({c.fn_compute - 1}))

    def on_input(self, call, state: BranchState) -> None:
        keep(state, "probe_in", call.hidden)

    def on_output(self, index, hidden, encoder, state: BranchState) -> None:
        probe_in = take(state, "probe_in")
        m = state.method
        m["probe_residual"] = residual = None if probe_in is None else hidden - probe_in
        reference = m.get("reference")
        m["change"] = None
        if residual is not None and reference is not None and reference.shape == residual.shape:
            # launched now, read at the range start (gate_lag blocks later): no host sync here
            m["change"] = relative_l1(residual, reference, self.per_sample, m["reference_l1"])

    @property
    def per_sample(self) -> bool:
        return self.config.batch_decision == "strict"

    def should_reuse(self, range_id: int, state: BranchState) -> bool:
        c = self.config
        m = state.method
        change = m.pop("change", None)
        streak = m.get("streak", 0)
        reuse = False
        if change is not None and state.step >= c.warmup_steps and range_id in state.residuals \
                and (c.max_consecutive_reuse is None or streak < c.max_consecutive_reuse):
            reuse = batch_agrees(change < c.threshold, state)
        if reuse:
            m["streak"] = streak + 1
        else:
            m["streak"] = 0
            residual = m["probe_residual"]
            m["reference"] = residual
            m["reference_l1"] = None if residual is None else l1(residual, self.per_sample)
        return reuse
