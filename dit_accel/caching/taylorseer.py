"""Taylor-forecast block caching — TaylorSeer (Liu et al., 2025, "From Reusing to Forecasting:
Accelerating Diffusion Models with TaylorSeers", ICCV 2025).

Every ``interval``-th step (after ``warmup_steps`` full steps) computes all blocks and updates,
per block, finite-difference factors of the block's residual (output − input) up to ``order``
from the step distance between full steps; the steps in between skip the block and add the
Taylor forecast ``Σ_i Δ^i f / i! · x^i`` (``Δ`` normalised per step, ``x`` the steps since the
last full step) to the fresh block input. The schedule is deterministic: no host sync.

Defaults: ``interval=6, order=1, warmup_steps=3`` — the official TaylorSeer-FLUX code
(``cache_init.py``, mode "Taylor": ``fresh_threshold=6``, ``max_order=1``, ``first_enhance=3``, its
"optimized to balance quality and acceleration" FLUX.1-dev setting). The schedule follows the
reference's ``cal_type``: steps ``0 .. warmup_steps−1`` are full and the last warm-up step starts
the period, so with the defaults steps 0, 1, 2, 8, 14, … are full. (diffusers'
``TaylorSeerCacheConfig`` defaults to interval 5, order 1, 3 warm-up steps.)

Granularity and where we depart:

* The reference forecasts module outputs (attention and MLP outputs, before their gates) and
  applies the current step's gates; we forecast each block's residual. Finite differences and
  the Taylor sum are linear, so forecasting the residual equals forecasting each contribution
  the block adds to its stream and summing them — for every tier-1 block the residual is exactly
  such a sum: FLUX/HunyuanVideo double blocks and SD3 joint blocks (gated attention + gated MLP,
  on both streams), FLUX/HunyuanVideo single blocks (gate · proj_out(attn ‖ MLP), itself a sum of
  an attention and an MLP term), PixArt (gated self-attention + cross-attention + gated MLP),
  DiT (gated attention + gated MLP), Wan (gated self-attention + cross-attention + gated FFN),
  CogVideoX (gated attention + gated FF on both streams). The equality holds up to rounding where
  the stream is added in low precision (Wan accumulates in float32 and casts back) and FLUX's fp16
  clipping. What differs from the paper is the gate: it is forecast together with its module's
  output (the reference recomputes the gate from the current timestep); forecasting pre-gate
  module outputs would need module-level hooks the block interface does not have. Memory is one
  residual per block and order instead of one per module and order (half, for two-module blocks).
* ``expansion: newton`` (ours) uses true divided differences and the Newton form, exact for
  trajectories polynomial of degree ≤ ``order`` in the step, also across the uneven spacing of
  warm-up and interval steps; the paper's ``taylor`` expansion is exact only up to degree 1 (see
  ``dit_accel.caching._taylor``). With the default ``order=1`` both are identical.
* Factors are kept and combined in the model dtype (as the reference and diffusers do) in the
  branch state, so they count in ``stats().cache_bytes``. ``fn_compute`` / ``bn_compute`` exclude
  the first/last blocks from forecasting (both 0 in the paper).
* ``granularity: stack`` (default) forecasts one residual for the whole forecast range instead of
  one per block: finite differences and the Taylor sum are linear and the block residuals telescope,
  so it is the same forecast up to rounding, with one factor set and one add per step instead of one
  per block (``block`` keeps per-block factors; the reference and diffusers work per module).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import option
from . import _taylor
from .base import (GRANULARITIES, CacheConfig, CacheMethod, CachePlan, CacheState, Residual, cache_ranges,
                   register_cache_method)


@dataclass(frozen=True)
class TaylorSeerConfig(CacheConfig):
    """TaylorSeer: full steps every ``interval``; in between, Taylor-forecast each block range's residual."""

    interval: int = option(6, ge=1, le=1000, doc="full computation every N-th step after warm-up; forecast in between")
    order: int = option(1, ge=0, le=8, doc="highest order of the finite-difference Taylor series (0 = plain reuse)")
    warmup_steps: int = option(3, ge=0, doc="steps always computed at the start of each call")
    expansion: str = option("taylor", choices=_taylor.EXPANSIONS,
                            doc="taylor: the paper's series; newton: divided differences, exact for polynomials")
    fn_compute: int = option(0, ge=0, doc="first blocks never forecast")
    bn_compute: int = option(0, ge=0, doc="last blocks never forecast")
    granularity: str = option("stack", choices=GRANULARITIES,
                              doc="stack: one forecast for all forecast blocks; block: one per block (same result)")


def is_full_step(step: int, warmup_steps: int, interval: int) -> bool:
    """The reference's schedule: warm-up steps are full, the last of them starts the period."""
    anchor = max(warmup_steps, 1) - 1
    return step <= anchor or (step - anchor) % interval == 0


@dataclass(eq=False)
class TaylorSeerState(CacheState):
    """Args:
        hidden: the Taylor series of each range's hidden-stream residual.
        encoder: the same for the encoder stream (dual-stream blocks).
        encoder_none: the range's last block returns no encoder stream.
    """

    hidden: dict[int, _taylor.Series] = field(default_factory=dict)
    encoder: dict[int, _taylor.Series] = field(default_factory=dict)
    encoder_none: dict[int, bool] = field(default_factory=dict)


@register_cache_method("taylorseer", TaylorSeerConfig)
class TaylorSeer(CacheMethod):
    State = TaylorSeerState
    exact = {"interval": 1}
    reusing = {"interval": 2, "warmup_steps": 1}

    def make_plan(self, num_blocks: int) -> CachePlan:
        c = self.config
        return CachePlan(ranges=cache_ranges(num_blocks, c.fn_compute, c.bn_compute, c.granularity))

    def is_full_step(self, step: int) -> bool:
        return is_full_step(step, self.config.warmup_steps, self.config.interval)

    def should_reuse(self, range_id: int, state: TaylorSeerState) -> bool:
        return not self.is_full_step(state.step) and range_id in state.hidden

    def on_range_computed(self, range_id: int, residual: Residual, state: TaylorSeerState) -> None:
        c, step = self.config, state.step
        state.hidden[range_id] = _taylor.update(state.hidden.get(range_id), residual.hidden, step, c.order, c.expansion)
        state.encoder_none[range_id] = residual.encoder_is_none
        if residual.encoder is None:
            state.encoder.pop(range_id, None)
        else:
            state.encoder[range_id] = _taylor.update(state.encoder.get(range_id), residual.encoder, step, c.order,
                                                     c.expansion)

    def reused_output(self, range_id: int, hidden: torch.Tensor, encoder: torch.Tensor | None,
                      state: TaylorSeerState) -> tuple[torch.Tensor, torch.Tensor | None]:
        step, expansion = state.step, self.config.expansion
        hidden = hidden + _taylor.forecast(state.hidden[range_id], step, expansion)
        if state.encoder_none.get(range_id, False):
            return hidden, None
        series_e = state.encoder.get(range_id)
        if series_e is not None and encoder is not None:
            encoder = encoder + _taylor.forecast(series_e, step, expansion)
        return hidden, encoder
