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
busy instead of draining its queue (measured in benchmarks/results/flux_hooks_h200.md). The reference residual is
the one from the last *computed*
step (as in both anchors), so small drifts accumulate instead of hiding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PolicyError, option
from .base import (CacheConfig, CacheMethod, CachePlan, CacheState, Kept, batch_agrees, keep, register_alias,
                   register_cache_method, shard_sums, take)


@dataclass(frozen=True)
class DBCacheConfig(CacheConfig):
    """DBCache (FBCache with ``fn_compute: 1``): a probe residual gates the reuse of the middle blocks."""

    threshold: float = option(0.08, ge=0.0, le=10.0,
                              doc="relative L1 change of the probe residual under which the middle is reused")
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
                previous_l1: torch.Tensor | None = None, state: CacheState | None = None) -> torch.Tensor:
    """mean|current − previous| / mean|previous|, per sample (dim 0) or pooled; float32. With ``state``, the two
    sums are taken over every context-parallel shard (:func:`~dit_accel.caching.base.shard_sums`)."""
    base = l1(previous, per_sample) if previous_l1 is None else previous_l1
    diff = l1(current - previous, per_sample)
    if state is not None:
        diff, base = shard_sums(state, diff, base)
    return diff / base.clamp_min(torch.finfo(torch.float32).tiny)


@dataclass(eq=False)
class DBCacheState(CacheState):
    """Args:
        probe_in: the first block's input, kept until the probe's output arrives.
        change: the probe residual's relative L1 change on this call (a tensor: read at the range start).
        probe_residual: this call's probe residual.
        reference: the probe residual of the last computed step, and its L1 norm.
        streak: consecutive reused steps.
    """

    probe_in: Kept | None = None
    change: torch.Tensor | None = None
    probe_residual: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    reference_l1: torch.Tensor | None = None
    streak: int = 0


@register_cache_method("dbcache", DBCacheConfig)
class DBCache(CacheMethod):
    State = DBCacheState
    exact = {"threshold": 0.0}
    reusing = {"threshold": 10.0}

    def make_plan(self, num_blocks: int) -> CachePlan:
        c = self.config
        if c.fn_compute + c.gate_lag + c.bn_compute >= num_blocks:
            raise PolicyError(
                f"cache.fn_compute ({c.fn_compute}) + cache.gate_lag ({c.gate_lag}) + cache.bn_compute "
                f"({c.bn_compute}) must be less than the model's number of blocks ({num_blocks}) so that something "
                "is left to cache")
        return CachePlan(ranges=((c.fn_compute + c.gate_lag, num_blocks - c.bn_compute),),
                         watch_inputs=frozenset({0}), watch_outputs=frozenset({c.fn_compute - 1}))

    def on_input(self, call, state: DBCacheState) -> None:
        state.probe_in = keep(state, call.hidden)

    def on_output(self, index, hidden, encoder, state: DBCacheState) -> None:
        probe_in, state.probe_in = take(state, state.probe_in), None
        state.probe_residual = residual = None if probe_in is None else hidden - probe_in
        reference = state.reference
        state.change = None
        if residual is not None and reference is not None and reference.shape == residual.shape:
            # launched now, read at the range start (gate_lag blocks later): no host sync here
            state.change = relative_l1(residual, reference, self.per_sample, state.reference_l1, state)

    @property
    def per_sample(self) -> bool:
        return self.config.batch_decision == "strict"

    def should_reuse(self, range_id: int, state: DBCacheState) -> bool:
        c = self.config
        change, state.change = state.change, None
        reuse = False
        if change is not None and state.step >= c.warmup_steps and range_id in state.residuals \
                and (c.max_consecutive_reuse is None or state.streak < c.max_consecutive_reuse):
            reuse = batch_agrees(change < c.threshold, state)
        if reuse:
            state.streak += 1
        else:
            state.streak = 0
            residual = state.probe_residual
            state.reference = residual
            state.reference_l1 = None if residual is None else l1(residual, self.per_sample)
        return reuse


register_alias("fbcache", "dbcache", fn_compute=1, bn_compute=0)
