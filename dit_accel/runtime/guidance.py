"""The guidance feature: Adaptive Guidance's plumbing (its decisions: :mod:`dit_accel.caching.adaptive_guidance`).

After each step the conditional and guided predictions are compared; once the unconditional branch
is dropped, either a batched CFG call is cut to its conditional rows (``prepare`` slices the
arguments, ``after_call`` completes the output with the conditional rows in both halves; the
branch's state of every feature moves to the half batch), or a separate ``"uncond"`` call passes
every block through and its output is replaced by the same step's conditional prediction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..batching import slice_rows
from ..caching.adaptive_guidance import COND, UNCOND, AdaptiveGuidance
from ..outputs import output_sample, replace_sample
from .feature import Call, Feature
from .generation import call_locals

logger = logging.getLogger("dit_accel")


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def pipeline_guidance_scale(pipeline: Any, component: str = "transformer") -> float | None:
    """The classifier-free guidance scale of the pipeline call in progress, or None if not found.

    In order: the ``true_cfg_scale`` argument of the running ``__call__`` (Flux / HunyuanVideo, whose
    ``guidance_scale`` is an embedded distilled guidance); the pipeline's ``_guidance_scale``
    (``_guidance_scale_2`` first for a second-stage ``transformer_2``, as Wan 2.2 keeps it); the
    ``guidance_scale`` argument of the running ``__call__`` (DiTPipeline and PixArt keep it as a local
    only). Frames are read, never changed.
    """
    suffix = "_2" if component == "transformer_2" else ""
    call = call_locals(pipeline)
    if call is not None:
        value = _number(call.get("true_cfg_scale"))
        if value is not None:
            return value
    for name in ([f"_guidance_scale{suffix}"] if suffix else []) + ["_guidance_scale"]:
        value = _number(getattr(pipeline, name, None))
        if value is not None:
            return value
    if call is not None:
        for name in ([f"guidance_scale{suffix}"] if suffix else []) + ["guidance_scale"]:
            value = _number(call.get(name))
            if value is not None:
                return value
    return None


def pipeline_runs_cfg(pipeline: Any, scale: float | None) -> bool | None:
    """Whether the pipeline call in progress runs classifier-free guidance: its ``do_classifier_free_guidance``
    (a local of ``__call__`` in PixArt, a property in SD3 / CogVideoX), else ``scale > 1``; None if unknown.

    The flag matters where the scale changes per step (CogVideoX's dynamic CFG starts at exactly 1)."""
    call = call_locals(pipeline)
    flag = call.get("do_classifier_free_guidance") if call is not None else None
    if not isinstance(flag, bool):
        try:
            flag = getattr(pipeline, "do_classifier_free_guidance", None)
        except Exception:  # a property reading state the pipeline has not set
            flag = None
    if isinstance(flag, bool):
        return flag
    return None if scale is None else scale > 1.0


def _same_timestep(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
    return a == b


@dataclass(frozen=True)
class GuidanceCall:
    """What the guidance does with one transformer call.

    Args:
        kind: ``"cond"`` (separate CFG: remember its prediction), ``"uncond"`` (compare with it),
            ``"skip"`` (dropped: every block passes through, the output becomes ``cond``),
            ``"full"`` (batched CFG: compare its halves), ``"half"`` (batched, cut to its conditional rows).
        timestep: the call's timestep (separate CFG pairs a cond and an uncond call by it).
        shape: the call's hidden-state shape.
        cond: the conditional prediction of this step (``uncond`` / ``skip``).
        batch: the full batch of a batched call.
        scale: the guidance scale ``w`` (``full``).
    """

    kind: Literal["cond", "uncond", "skip", "full", "half"]
    timestep: Any = None
    shape: tuple | None = None
    cond: torch.Tensor | None = None
    batch: int = 0
    scale: float | None = None


class GuidanceFeature(Feature):
    """Adaptive Guidance on one transformer (see the module docstring)."""

    name = "guidance"
    passes_through = True

    def __init__(self, guidance: AdaptiveGuidance, component: str = "transformer") -> None:
        self.guidance = guidance
        self.component = component
        self._warned_no_scale = False
        self.new_generation()

    def new_generation(self) -> None:
        self.switched: dict[str, bool] = {}
        self.switch_step: dict[str, int] = {}
        self.skipped = 0
        self.active: bool | None = None  # batched CFG on in this generation (guidance scale > 1)
        self._pending: GuidanceCall | None = None  # the conditional prediction of separate CFG
        self._call: GuidanceCall | None = None

    def release(self) -> None:
        self._pending = None
        self._call = None

    def _scale(self, pipe: Any) -> tuple[float | None, float | None]:
        """(w for the guided prediction, the pipeline's own CFG scale) of the call in progress."""
        own = pipeline_guidance_scale(pipe, self.component) if pipe is not None else None
        w = self.guidance.config.guidance_scale
        w = own if w is None else w
        if w is None and not self._warned_no_scale:
            self._warned_no_scale = True
            logger.warning("dit_accel: adaptive guidance cannot find the guidance scale of %s; set "
                           "guidance.guidance_scale in the policy (the unconditional branch is kept)",
                           type(pipe).__name__)
        return w, own

    def prepare(self, call: Call) -> None:
        self._call = None
        hidden = call.kwargs.get("hidden_states", call.args[0] if call.args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim == 0:
            return
        timestep, shape = call.kwargs.get("timestep"), tuple(hidden.shape)
        if call.branch == COND:
            self._call = GuidanceCall("cond", timestep, shape)
            return
        if call.branch == UNCOND:
            pending, self._pending = self._pending, None
            if pending is None or pending.shape != shape or not _same_timestep(pending.timestep, timestep):
                return  # no conditional prediction of this very step: run as usual
            if self.switched.get(UNCOND):
                self._call = GuidanceCall("skip", timestep, shape, cond=pending.cond)
                call.passthrough = True
                self.skipped += 1
            else:
                self._call = GuidanceCall("uncond", timestep, shape, cond=pending.cond)
            return
        if self.guidance.cfg_layout != "batched":
            return
        batch = shape[0]
        if batch % 2:
            return
        if self.switched.get(call.branch):
            self._call = GuidanceCall("half", batch=batch)
            self.skipped += 1
            call.replace_arguments(*self.guidance.slice_call(call.args, call.kwargs, batch))
            return
        w, own = self._scale(call.pipeline)
        if self.active is None:  # once per generation: does this pipeline call batch CFG at all?
            active = pipeline_runs_cfg(call.pipeline, own) if call.pipeline is not None else None
            self.active = True if active is None else active  # bare transformer: the policy says so
        if self.active and w is not None:
            self._call = GuidanceCall("full", batch=batch, scale=w)

    def after_call(self, call: Call, output: Any) -> Any | None:
        g, self._call = self._call, None
        if g is None or output is None:
            return None
        if g.kind == "skip":
            return replace_sample(output, g.cond.clone()) if output_sample(output) is not None else None
        if g.kind == "half":
            return self.guidance.complete_output(output, g.batch // 2)
        sample = output_sample(output)
        if sample is None or call.ctx is None:
            return None
        step = call.ctx.step
        if g.kind == "cond":
            self._pending = GuidanceCall("cond", g.timestep, g.shape, cond=sample)
        elif g.kind == "uncond":
            w, _ = self._scale(call.pipeline)
            if w is not None and self.guidance.may_switch(step) and self.guidance.converged(g.cond, sample, w):
                self.switched[UNCOND] = True
                self.switch_step[UNCOND] = step + 1
        elif g.kind == "full" and self.guidance.may_switch(step):
            cond, uncond = self.guidance.halves(sample)
            if self.guidance.converged(cond, uncond, g.scale):
                self.switched[call.branch] = True
                self.switch_step[call.branch] = step + 1
                rows = self.guidance.cond_rows(g.batch)
                shape = call.ctx.shape
                call.move_state((g.batch // 2, *shape[1:]) if shape else shape,
                                lambda state: slice_rows(state, g.batch, rows))
        return None

    def stats(self) -> dict[str, Any]:
        return {"guidance": self.guidance.describe(), "guidance_skipped_calls": self.skipped,
                "guidance_switch_step": dict(self.switch_step)}
