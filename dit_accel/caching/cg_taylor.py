"""Confidence-gated Taylor forecasting of the last block's output — CG-Taylor (Guan et al., 2025,
"Forecasting When to Forecast: Accelerating Diffusion Models with Confidence-Gated Taylor",
arXiv:2508.02240).

Instead of TaylorSeer's per-module forecasts, one finite-difference Taylor series is kept for the
*last* block's output (hidden and encoder states) and one for the *first* block's output. Block 0
always runs; its true output is compared with its own Taylor forecast (relative L1 error,
``mean|forecast − true| / mean|true|``). If the error is below ``threshold`` the forecast is
trusted: blocks 1 … N−1 are skipped and the last block's forecast is the range's output.
Otherwise every block runs and both series are updated at this step (so both are always expanded
around the same nodes: the first block's error measures how far the shared nodes can be trusted).

Defaults: ``threshold=0.13``, ``order=1`` (last block), ``probe_order=1`` (first block) — the
authors' FLUX.1-dev setting (README: "confidence gate=0.13/0.03, first block order=1, last block
order=1"; 0.03 is their quality setting; Wan2.1 uses 0.36 with first-block order 3).
``warmup_steps=6`` and ``final_steps=1`` follow their code (the gate is evaluated from the 7th
step on; the first and last steps are always computed). Memory: ``order + 1`` copies of the last
block's output (+ encoder states) and ``probe_order + 1`` of the first block's hidden output per
branch, whatever the depth of the model.

Where we depart: the gate decides per sample and reuses only if every sample agrees
(``batch_decision: strict``, the project's rule for batched CFG; ``mean`` pools the batch as the
reference does); with separate CFG calls each branch gates on its own first block (the reference
lets the uncond pass follow the cond decision). The first-block series is updated at every fully
computed step, including forced ones. ``max_consecutive_forecast`` caps forecasts in a row (off in
the paper); ``metric: l2`` uses the relative L2 error instead. ``expansion: newton`` as in
``taylorseer``. ``final_steps`` needs the number of steps (a pipeline call, or
``dit_accel.reset(model, num_inference_steps=N)``); it is ignored in custom loops without it.
The gate reads one number per step on the host (like FBCache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PolicyError, option
from . import _taylor
from .base import (CacheConfig, CacheMethod, CachePlan, CacheState, Residual, batch_agrees, register_cache_method,
                   shard_sums)


@dataclass(frozen=True)
class CGTaylorConfig(CacheConfig):
    """CG-Taylor: forecast the last block's output; the first block's forecast error gates the forecast."""

    threshold: float = option(0.13, ge=0.0, le=10.0,
                              doc="relative error of the first block's forecast under which the last "
                                  "block's forecast is trusted")
    order: int = option(1, ge=0, le=8, doc="Taylor order of the last block's output")
    probe_order: int = option(1, ge=0, le=8, doc="Taylor order of the first block's output (the gate's probe)")
    warmup_steps: int = option(6, ge=0, doc="steps always computed at the start of each call")
    final_steps: int = option(1, ge=0, doc="steps always computed at the end (needs the number of steps)")
    max_consecutive_forecast: int | None = option(None, ge=1, doc="forecast at most this many steps in a row")
    metric: str = option("l1", choices=("l1", "l2"), doc="relative L1 (the paper) or L2 error of the probe forecast")
    expansion: str = option("taylor", choices=_taylor.EXPANSIONS,
                            doc="taylor: the paper's series; newton: divided differences, exact for polynomials")
    batch_decision: str = option("strict", choices=("strict", "mean"),
                                 doc="strict: forecast only if every sample agrees; mean: one pooled decision")


def relative_error(current: torch.Tensor, reference: torch.Tensor, per_sample: bool, ord: int,
                   state: CacheState | None = None) -> torch.Tensor:
    """‖current − reference‖ / ‖reference‖ (L1 or L2) per sample (dim 0) or pooled, at least in float32.

    For L1 this is ``mean|current − reference| / mean|reference|``, the reference's error. With ``state``, the
    sums behind both norms are taken over every context-parallel shard.
    """
    dims = tuple(range(1, current.ndim)) if per_sample else tuple(range(current.ndim))
    dtype = torch.promote_types(current.dtype, torch.float32)  # no narrowing of float64 features
    norm = torch.linalg.vector_norm(reference, ord=ord, dim=dims, dtype=dtype) ** ord
    diff = torch.linalg.vector_norm(current - reference, ord=ord, dim=dims, dtype=dtype) ** ord
    if state is not None:
        diff, norm = shard_sums(state, diff, norm)
    return (diff / norm.clamp_min(torch.finfo(dtype).tiny)) ** (1.0 / ord)


@dataclass(eq=False)
class CGTaylorState(CacheState):
    """Args:
        probe: the Taylor series of the first block's output (the gate's probe).
        probe_out: the first block's output on this call.
        error: its forecast error on this call (a tensor until the gate reads it).
        last_hidden, last_encoder: the Taylor series of the last block's outputs.
        last_encoder_none: the last block returns no encoder stream.
        streak: consecutive forecast steps.
    """

    probe: _taylor.Series | None = None
    probe_out: torch.Tensor | None = None
    error: torch.Tensor | None = None
    last_hidden: _taylor.Series | None = None
    last_encoder: _taylor.Series | None = None
    last_encoder_none: bool = False
    streak: int = 0


@register_cache_method("cg_taylor", CGTaylorConfig)
class CGTaylor(CacheMethod):
    State = CGTaylorState
    exact = {"threshold": 0.0}
    reusing = {"threshold": 10.0, "warmup_steps": 2}

    def make_plan(self, num_blocks: int) -> CachePlan:
        if num_blocks < 2:
            raise PolicyError(f"cache.method cg_taylor needs at least 2 blocks (a first block to gate on and blocks "
                              f"to skip); the model has {num_blocks}")
        return CachePlan(ranges=((1, num_blocks),), watch_outputs=frozenset({0, num_blocks - 1}))

    @property
    def per_sample(self) -> bool:
        return self.config.batch_decision == "strict"

    def _keep(self, tensor: torch.Tensor, state: CGTaylorState) -> torch.Tensor:
        # factor 0 aliases a tensor the model keeps using; clone where in-place writes can't be seen
        ctx = state.ctx
        return tensor.clone() if ctx.clone_inputs or (ctx.clone_unverifiable and tensor.is_inference()) else tensor

    def _forced_full(self, state: CGTaylorState) -> bool:
        c = self.config
        if state.step < c.warmup_steps:
            return True
        return state.num_steps is not None and state.step >= state.num_steps - c.final_steps

    # ---- the probe: block 0 -------------------------------------------------------------------
    def on_output(self, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None,
                  state: CGTaylorState) -> None:
        c = self.config
        if index == 0:
            state.probe_out = hidden
            state.error = None
            probe = state.probe
            if probe is not None and probe.intact() and probe[0].shape == hidden.shape and not self._forced_full(state):
                predicted = _taylor.forecast(probe, state.step, c.expansion)
                # launched now, read at the range start: no host sync here
                state.error = relative_error(predicted, hidden, self.per_sample, 1 if c.metric == "l1" else 2, state)
        if index == self.num_blocks - 1:  # the last block ran: a full step
            step = state.step
            state.last_hidden = _taylor.update(state.last_hidden, self._keep(hidden, state), step, c.order,
                                               c.expansion, track_version=True)
            state.last_encoder_none = encoder is None
            state.last_encoder = None if encoder is None else _taylor.update(
                state.last_encoder, self._keep(encoder, state), step, c.order, c.expansion, track_version=True)

    # ---- the gate ----------------------------------------------------------------------------
    def should_reuse(self, range_id: int, state: CGTaylorState) -> bool:
        c = self.config
        error, state.error = state.error, None
        probe_out, state.probe_out = state.probe_out, None
        last = state.last_hidden
        reuse = False
        if error is not None and last is not None and last.intact() and not self._forced_full(state) \
                and (c.max_consecutive_forecast is None or state.streak < c.max_consecutive_forecast):
            reuse = batch_agrees(error < c.threshold, state)
        if reuse:
            state.streak += 1
        else:
            state.streak = 0
            if probe_out is not None:
                state.probe = _taylor.update(state.probe, self._keep(probe_out, state), state.step, c.probe_order,
                                             c.expansion, track_version=True)
        return reuse

    def on_range_computed(self, range_id: int, residual: Residual, state: CGTaylorState) -> None:
        """Nothing to cache: the last block's output is taken in ``on_output``."""

    def reused_output(self, range_id: int, hidden: torch.Tensor, encoder: torch.Tensor | None,
                      state: CGTaylorState) -> tuple[torch.Tensor, torch.Tensor | None]:
        step, expansion = state.step, self.config.expansion
        out_h = _taylor.forecast(state.last_hidden, step, expansion)
        if state.last_encoder_none:
            return out_h, None
        series_e = state.last_encoder
        out_e = _taylor.forecast(series_e, step, expansion) if series_e is not None and series_e.intact() else encoder
        return out_h, out_e
