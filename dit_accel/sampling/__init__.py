"""Sampler-level drivers: methods that change how the pipeline is called, not what a block computes.

* :mod:`~dit_accel.sampling.bottleneck` — Bottleneck Sampling (Tian et al. 2025): a high-low-high
  resolution schedule, one pipeline call per stage with ``latents=`` and a custom schedule;
* :mod:`~dit_accel.sampling.layout` — the pipelines' latent layouts (FLUX 2×2 packing, video grids);
* :mod:`~dit_accel.sampling.schedules` — custom flow-matching schedules for one call.

Drivers compose with ``dit_accel.accelerate``: whatever is attached to the pipeline runs inside every call.

    >>> from dit_accel.sampling import bottleneck_sample
    >>> images = bottleneck_sample(pipe, prompt="a cat", num_inference_steps=28).images
"""

from __future__ import annotations

from .bottleneck import (BottleneckConfig, BottleneckPlan, BottleneckSampler, PlannedStage, Stage, bottleneck_sample,
                         default_stages)
from .layout import LatentLayout
from .schedules import stage_scheduler, stage_sigmas

__all__ = ["BottleneckConfig", "BottleneckPlan", "BottleneckSampler", "LatentLayout", "PlannedStage", "Stage",
           "bottleneck_sample", "default_stages", "stage_scheduler", "stage_sigmas"]
