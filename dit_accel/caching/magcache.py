"""MagCache — Ma et al., 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache".

The magnitude ratio of successive block-stack residuals, γ_t = mean over tokens of
‖r_t‖ / ‖r_{t−1}‖, follows a stable per-model curve (calibrated once by
``dit_accel.calibrate``). While steps are skipped the error of reusing a residual is
estimated from that curve alone: the ratio accumulates multiplicatively, the error as
Σ|1 − Π γ|. A step is skipped while that error stays ≤ ``threshold`` and at most ``max_skips``
steps in a row were skipped; the first ``retention_ratio`` of the steps are always computed.
Defaults are the paper's Wan 2.1 settings (threshold 0.12, K = 2, retention 0.2).

The decision reads only the calibrated table, so it needs no host sync. Ratios are stored per
CFG branch; a call with another step count reads the curve by linear interpolation over the
relative step position (MagCache uses nearest-neighbour interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PolicyError, finite_numbers, option
from .base import (CacheConfig, CacheMethod, CachePlan, CacheState, branch_table, register_cache_method,
                   replace_config, require_calibrated)
from .records import Records


@dataclass(frozen=True)
class MagCacheConfig(CacheConfig):
    """MagCache: skip while the error predicted from the calibrated magnitude-ratio curve stays small."""

    threshold: float = option(0.12, ge=0.0, le=100.0, doc="accumulated magnitude error under which a step is skipped")
    max_skips: int = option(2, ge=1, doc="K: at most this many consecutive skipped steps")
    retention_ratio: float = option(0.2, ge=0.0, le=1.0, doc="leading share of the steps always computed")
    mag_ratios: dict | None = option(None, doc="calibrated ratio curve per CFG branch {branch: [γ_0, γ_1, ...]}")

    def validate(self) -> None:
        if self.mag_ratios is not None:
            if not isinstance(self.mag_ratios, dict) or not self.mag_ratios:
                raise PolicyError("cache.mag_ratios: expected a mapping {branch: [ratios...]} "
                                  "(run dit_accel.calibrate)")
            for branch, ratios in self.mag_ratios.items():
                if not isinstance(ratios, (list, tuple)) or len(ratios) < 2 or not all(
                        isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios):
                    raise PolicyError(f"cache.mag_ratios[{branch!r}]: expected at least 2 positive numbers")
                finite_numbers(f"cache.mag_ratios[{branch!r}]", ratios, positive=True, min_length=2)
        super().validate()


def interpolate(curve: list[float], position: float) -> float:
    """Value of ``curve`` at relative position in [0, 1] (linear)."""
    x = min(max(position, 0.0), 1.0) * (len(curve) - 1)
    lo = int(x)
    hi = min(lo + 1, len(curve) - 1)
    return curve[lo] + (curve[hi] - curve[lo]) * (x - lo)


@dataclass(eq=False)
class MagCacheState(CacheState):
    """Args:
        ratio: the magnitude ratio accumulated over the current run of skipped steps.
        error: the error accumulated over it.
        skips: its length.
    """

    ratio: float = 1.0
    error: float = 0.0
    skips: int = 0


@register_cache_method("magcache", MagCacheConfig)
class MagCache(CacheMethod):
    State = MagCacheState
    exact = {"threshold": 0.0, "max_skips": 1, "retention_ratio": 1.0}
    reusing = {"threshold": 100.0}

    def __init__(self, config: MagCacheConfig, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        require_calibrated(config, "mag_ratios")

    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=((0, num_blocks),))

    def ratio(self, state: CacheState) -> float:
        """γ at this call's position in its schedule (img2img calls start part-way through it)."""
        curve = branch_table(self.config.mag_ratios, state, "mag_ratios")
        index, length = state.schedule_position()
        length = length or len(curve)
        if length == len(curve):
            return float(curve[min(index, len(curve) - 1)])
        return interpolate(list(curve), index / max(length - 1, 1))

    def should_reuse(self, range_id: int, state: MagCacheState) -> bool:
        c = self.config
        index, length = state.schedule_position()
        length = length or len(branch_table(c.mag_ratios, state, "mag_ratios"))
        if index >= int(c.retention_ratio * length) and range_id in state.residuals:
            ratio = state.ratio * self.ratio(state)
            error = state.error + abs(1.0 - ratio)
            skips = state.skips + 1
            if error <= c.threshold and skips <= c.max_skips:
                state.ratio, state.error, state.skips = ratio, error, skips
                return True
        state.ratio, state.error, state.skips = 1.0, 0.0, 0
        return False

    @staticmethod
    def calibrated(config: MagCacheConfig, records: Records, family: str) -> MagCacheConfig:
        """The mean magnitude-ratio curve per branch; step 0 (no previous residual) gets 1.0."""
        curves = {branch: [1.0, *ratios] for branch, ratios in records.per_branch_mean("mag_ratio").items()}
        return replace_config(config, mag_ratios=curves)
