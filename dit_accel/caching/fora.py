"""Fixed-interval block caching — FORA (Selvaraju et al., 2024, "FORA: Fast-Forward Caching in
Diffusion Transformer Acceleration").

Every ``interval``-th step computes all blocks and stores each block's residual (output −
input, i.e. its attention + MLP contribution); the steps in between reuse those residuals on
top of the fresh block inputs. Default ``interval=3`` (the paper's main setting); the schedule is
deterministic and needs no host sync, which makes speed benchmarks comparable across models.

Departures: FORA caches the attention and MLP outputs separately; at block granularity their
sum is the block residual, which is what we cache (half the memory). ``warmup_steps`` always
computes the first steps, and ``fn_compute``/``bn_compute`` exclude the first/last blocks from
caching (both 0 in the paper). ``granularity: stack`` (default) caches one residual for the
whole cached range instead of one per block: the same result up to rounding (the block residuals
telescope on a reused step) with one add instead of one per block; ``block`` keeps per-block residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from .base import GRANULARITIES, CacheConfig, CacheMethod, CachePlan, CacheState, cache_ranges, register_cache_method


@dataclass(frozen=True)
class FORAConfig(CacheConfig):
    """FORA: compute every ``interval``-th step, reuse every block's residual in between."""

    interval: int = option(3, ge=1, le=1000, doc="compute every N-th step, reuse in between")
    warmup_steps: int = option(0, ge=0, doc="steps always computed at the start of each call")
    fn_compute: int = option(0, ge=0, doc="first blocks never cached")
    bn_compute: int = option(0, ge=0, doc="last blocks never cached")
    granularity: str = option("stack", choices=GRANULARITIES,
                              doc="stack: one residual for all cached blocks; block: one per block (same result)")


@register_cache_method("fora", FORAConfig)
class FORA(CacheMethod):
    exact = {"interval": 1}
    reusing = {"interval": 2}

    def make_plan(self, num_blocks: int) -> CachePlan:
        c = self.config
        return CachePlan(ranges=cache_ranges(num_blocks, c.fn_compute, c.bn_compute, c.granularity))

    def is_compute_step(self, step: int) -> bool:
        c = self.config
        return step < c.warmup_steps or (step - c.warmup_steps) % c.interval == 0

    def should_reuse(self, range_id: int, state: CacheState) -> bool:
        return not self.is_compute_step(state.step) and range_id in state.residuals
