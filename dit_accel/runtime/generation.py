"""Where a generation starts and how many transformer calls it plans, whatever the pipeline does.

A cache must never carry features from one generation into the next, and every step-indexed
schedule (warm-up, "always compute the last step", calibrated curves) must be indexed by what
really runs. Three signals, none of which wraps or patches anything:

* **The pipeline call in progress.** Every diffusers pipeline calls ``scheduler.set_timesteps``
  once at the start of ``__call__``, which assigns a new ``scheduler.timesteps`` tensor. At each
  transformer call the runtime finds the running ``DiffusionPipeline.__call__`` on the Python
  stack (:func:`running_pipeline`, so a second pipeline sharing the transformer, or a scheduler
  swapped with ``pipe.scheduler = X.from_config(...)``, is seen too) and compares the identity
  of its scheduler's ``timesteps``: a new tensor is a new generation (:class:`ScheduleMarker`).
* **The end of a pipeline call.** diffusers pipelines end ``__call__`` with
  ``maybe_free_model_hooks``, which resets the stateful hooks of every component that has
  ``_reset_stateful_cache`` (diffusers' ``CacheMixin``); the runtime frees cached tensors there
  and the next call starts a new generation.
* **Custom sampling loops** (no pipeline on the stack): a timestep that goes up starts a new
  generation, or ``dit_accel.reset(model, num_inference_steps=N)``.

Planned calls (:func:`planned_calls`) are the transformer calls of one CFG branch in this
generation: ``len(scheduler.timesteps)`` minus the scheduler's ``begin_index`` (img2img with
``strength < 1`` starts part-way: 8 steps at 0.5 are 4 calls), so second-order samplers count
their extra evaluations (Heun: 4 steps are 7 calls), and a two-expert pipeline (Wan 2.2's
``boundary_ratio``) gives each transformer the calls it runs. ``offset`` is where those calls sit
in the full schedule, for tables calibrated over it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

_MAX_FRAMES = 64


def _pipeline_class() -> type | None:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    return DiffusionPipeline


def running_pipeline(preferred: Any | None = None) -> Any | None:
    """The pipeline whose ``__call__`` is running on this thread's stack (innermost first), or None.

    ``preferred`` (the pipeline ``accelerate`` was given) is recognised even if it is not a
    ``DiffusionPipeline`` subclass (a user's own pipeline class)."""
    base = _pipeline_class()
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__":
            obj = frame.f_locals.get("self")
            if obj is not None and (obj is preferred or (base is not None and isinstance(obj, base))):
                return obj
        frame = frame.f_back
    return None


def call_locals(pipeline: Any) -> dict | None:
    """The locals of ``pipeline.__call__`` running on this thread's stack, or None (read, never changed)."""
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipeline:
            return frame.f_locals
        frame = frame.f_back
    return None


@dataclass(frozen=True)
class Plan:
    """The transformer calls one CFG branch of a generation will make (None: unknown)."""

    calls: int | None = None
    offset: int = 0
    num_inference_steps: int | None = None

    @property
    def length(self) -> int | None:
        """Calls of the full schedule these calls are part of."""
        return None if self.calls is None else self.offset + self.calls


def _timesteps(scheduler: Any) -> torch.Tensor | None:
    timesteps = getattr(scheduler, "timesteps", None)
    return timesteps if isinstance(timesteps, torch.Tensor) and timesteps.ndim == 1 else None


def planned_calls(pipeline: Any, component: str = "transformer") -> Plan:
    """What ``pipeline`` (inside its ``__call__``, after ``set_timesteps``) will run on ``component``."""
    scheduler = getattr(pipeline, "scheduler", None)
    timesteps = _timesteps(scheduler)
    steps = getattr(scheduler, "num_inference_steps", None)
    steps = steps if isinstance(steps, int) else None
    if timesteps is None:
        return Plan(num_inference_steps=steps)
    begin = getattr(scheduler, "begin_index", None)
    begin = begin if isinstance(begin, int) and 0 <= begin <= len(timesteps) else 0
    run = timesteps[begin:]
    config = getattr(pipeline, "config", None)
    ratio = config.get("boundary_ratio") if hasattr(config, "get") else None
    if isinstance(ratio, (int, float)) and getattr(pipeline, "transformer_2", None) is not None:
        # two experts (Wan 2.2): `transformer` runs t >= boundary, `transformer_2` the rest
        train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
        high = int((run >= ratio * train).sum())
        if component == "transformer_2":
            return Plan(calls=len(run) - high, offset=begin + high, num_inference_steps=steps)
        return Plan(calls=high, offset=begin, num_inference_steps=steps)
    return Plan(calls=len(run), offset=begin, num_inference_steps=steps)


class ScheduleMarker:
    """Tells whether a call belongs to the generation the last call belonged to (see module docstring)."""

    def __init__(self) -> None:
        self._pipeline_id: int | None = None
        self._timesteps: torch.Tensor | None = None  # held so its identity cannot be reused

    def is_new(self, pipeline: Any) -> bool | None:
        """True if ``pipeline``'s schedule is not the one of the previous call (and remember it); None
        when the pipeline has no scheduler timesteps to tell by."""
        timesteps = _timesteps(getattr(pipeline, "scheduler", None))
        if timesteps is None:
            return None
        new = id(pipeline) != self._pipeline_id or timesteps is not self._timesteps
        self._pipeline_id, self._timesteps = id(pipeline), timesteps
        return new

    def clear(self) -> None:
        self._pipeline_id, self._timesteps = None, None
