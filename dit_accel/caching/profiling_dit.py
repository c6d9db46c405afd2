"""ProfilingDiT — profiling-guided per-block caching (Ma et al., 2025, "Model Reveals What to
Cache: Profiling-Based Feature Reuse for Video Diffusion Models", arXiv 2504.03140; what is
reconstructed: ``docs/methods.md``).

The paper profiles a DiT's attention maps and observes that some blocks attend mainly to the
foreground (the moving / salient subject) and others mainly to the background; background
features change slowly across steps, so background-focused blocks are cached aggressively while
foreground-focused blocks are recomputed more often. The paper's foreground masks and its per-step
adaptation of the reuse decision are not reproduced here.

Our version, without masks:

* **Profiling (calibration)**: ``dit_accel.calibrate`` records, for every block and step, the
  normalised entropy of the block's self-attention (``RecordConfig(attention_stats=True)``:
  softmax(q·Kᵀ/√d) from the attention module's ``to_q``/``to_k``/``norm_q``/``norm_k`` on
  random query tokens, entropy / log(#keys); see ``dit_accel.calibrate``). **Proxy**: a
  foreground-focused block attends sharply to a few salient tokens (low entropy), a
  background-focused block spreads its attention over the image (high entropy). The mean over
  steps and generations is stored per block as ``block_entropy``; the ``background_share`` of
  blocks with the highest entropy (at least one, and never all when ``background_share < 1``) are
  ``"bg"``, the rest ``"fg"`` — or, if ``entropy_threshold`` is set, blocks whose entropy is
  above it are ``"bg"``.
* **Inference**: one cacheable range per block. After ``warmup_steps`` (always computed), a
  block of class c is computed on steps where (step − warmup_steps) % interval_c == 0 and reuses
  its cached residual (output − input, added to its fresh input) otherwise, with
  ``foreground_interval`` (default 1: always computed) and ``background_interval`` (default 3).
  The schedule is static: no host sync.

``block_classes`` (a list of "fg"/"bg", one per block) is what inference needs; it can also be
written by hand. Without it the method refuses to run (PolicyError: calibrate first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import PolicyError, finite_numbers, option
from .base import (CacheConfig, CacheMethod, CachePlan, CacheState, register_cache_method, replace_config,
                   require_calibrated)
from .records import Records

CLASSES = ("fg", "bg")


@dataclass(frozen=True)
class ProfilingDiTConfig(CacheConfig):
    """ProfilingDiT: background blocks (flat attention) reuse their residual more often than foreground ones."""

    foreground_interval: int = option(1, ge=1, le=1000, doc="foreground blocks: compute every N-th step")
    background_interval: int = option(3, ge=1, le=1000, doc="background blocks: compute every N-th step")
    warmup_steps: int = option(1, ge=0, doc="leading steps on which every block is computed")
    background_share: float = option(0.5, ge=0.0, le=1.0, doc="share of blocks (highest attention entropy) "
                                                              "classed background")
    entropy_threshold: float | None = option(None, ge=0.0, le=1.0, doc="if set, blocks whose normalised "
                                             "attention entropy exceeds it are background (overrides "
                                             "background_share)")
    block_classes: list | None = option(None, doc="calibrated class of each block: 'fg' or 'bg'")
    block_entropy: list | None = option(None, doc="calibrated mean normalised attention entropy per block")

    def validate(self) -> None:
        if self.block_classes is not None:
            if not isinstance(self.block_classes, list) or not self.block_classes or \
                    any(c not in CLASSES for c in self.block_classes):
                raise PolicyError(f"cache.block_classes: expected a non-empty list of 'fg'/'bg', got "
                                  f"{self.block_classes!r} (run dit_accel.calibrate)")
        if self.block_entropy is not None:
            if not isinstance(self.block_entropy, list) or any(
                    isinstance(e, bool) or not isinstance(e, (int, float)) for e in self.block_entropy):
                raise PolicyError("cache.block_entropy: expected a list of numbers, one per block")
            finite_numbers("cache.block_entropy", self.block_entropy, min_length=0)
            if self.block_classes is not None and len(self.block_entropy) != len(self.block_classes):
                raise PolicyError(f"cache.block_entropy has {len(self.block_entropy)} blocks, cache.block_classes "
                                  f"has {len(self.block_classes)}; both hold one entry per block")
        super().validate()


def classify(entropy, background_share: float = 0.5, threshold: float | None = None) -> list[str]:
    """'bg' for the blocks with the most spread-out attention (highest entropy), 'fg' for the rest.

    By rank: round(background_share · blocks) blocks, at least one if background_share > 0 and at
    most blocks − 1 if background_share < 1; ties broken by block index. By ``threshold`` if given.
    """
    entropy = np.asarray(entropy, dtype=np.float64)
    if entropy.size == 0 or not np.all(np.isfinite(entropy)):
        raise PolicyError(f"profiling_dit: no usable attention entropy per block ({entropy.tolist()}); "
                          "the attention modules were not seen during calibration")
    if threshold is not None:
        return ["bg" if e > threshold else "fg" for e in entropy]
    n = len(entropy)
    count = int(round(background_share * n))
    if background_share > 0:
        count = max(count, 1)
    if background_share < 1:
        count = min(count, n - 1)
    order = np.argsort(-entropy, kind="stable")
    background = set(order[:count].tolist())
    return ["bg" if i in background else "fg" for i in range(n)]


@register_cache_method("profiling_dit", ProfilingDiTConfig)
class ProfilingDiT(CacheMethod):
    record_options = {"attention_stats": True}
    exact = {"background_interval": 1, "foreground_interval": 1}
    reusing = {"background_interval": 2}

    def __init__(self, config: ProfilingDiTConfig, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        require_calibrated(config, "block_classes", " (or give one 'fg'/'bg' per block)")
        if len(config.block_classes) != self.num_blocks:
            raise PolicyError(f"cache.block_classes has {len(config.block_classes)} blocks; the model has "
                              f"{self.num_blocks} (calibrate on this model)")
        self.intervals = [config.background_interval if c == "bg" else config.foreground_interval
                          for c in config.block_classes]

    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=tuple((i, i + 1) for i in range(num_blocks)))

    def is_compute(self, block: int, step: int) -> bool:
        warmup = self.config.warmup_steps
        return step < warmup or (step - warmup) % self.intervals[block] == 0

    def should_reuse(self, range_id: int, state: CacheState) -> bool:
        return not self.is_compute(range_id, state.step) and range_id in state.residuals

    @staticmethod
    def calibrated(config: ProfilingDiTConfig, records: Records, family: str) -> ProfilingDiTConfig:
        """Mean attention entropy per block over all recorded steps and branches → fg/bg classes."""
        records.require("attn_entropy", "profiling_dit",
                        "no attention statistics: record with RecordConfig(attention_stats=True)")
        table = np.array([row["attn_entropy"] for row in records], dtype=np.float64)  # (rows, blocks)
        with np.errstate(all="ignore"):
            entropy = [float(v) if math.isfinite(v) else math.nan for v in np.nanmean(table, axis=0)]
        classes = classify(entropy, config.background_share, config.entropy_threshold)
        return replace_config(config, block_classes=classes, block_entropy=[round(e, 6) for e in entropy])
