"""Custom flow-matching schedules for one pipeline call, whatever schedule the pipeline asks its scheduler for.

Pipelines set their own schedule (``scheduler.set_timesteps(num_inference_steps)``, or shifted ``sigmas`` and
FLUX's resolution-dependent ``mu``). A driver that needs a given list of noise levels for one call —
a stage starting at a re-noised level — swaps in, for that call only, a scheduler of the pipeline's own class
built from its config with every built-in transform off (``shift=1``, no dynamic shifting, no terminal
stretch, no Karras/exponential/beta spacing) whose ``set_timesteps`` sets exactly the stage's sigmas
(:func:`stage_scheduler`); ``pipe.scheduler`` is put back afterwards, also on error. Supported: flow-matching
schedulers that take explicit sigmas, ``FlowMatchEulerDiscreteScheduler`` (FLUX, SD3, the reference models)
and ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` (Wan's default).

The scheduler appends the terminal σ = 0, so the last update of a stage goes from its last noise level σ to
0: for the Euler step that is exactly x̂₀ = x_σ − σ·v (the flow-matching prediction of the clean sample),
for UniPC the solver's own data prediction.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np

from ..config import PolicyError

#: config keys whose transforms would change the sigmas we set, and their neutral values
NEUTRAL = {"shift": 1.0, "flow_shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None,
           "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}


def time_shift(t: np.ndarray | float, shift: float) -> np.ndarray | float:
    """The flow-matching time shift σ = s·t / (1 + (s − 1)·t) (SD3, FLUX with a fixed shift)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def inverse_time_shift(sigma: float, shift: float) -> float:
    return sigma / (shift - (shift - 1.0) * sigma)


def stage_sigmas(steps: int, start: float, end: float, shift: float = 1.0) -> list[float]:
    """``steps`` noise levels from ``start`` down to ``end``: evenly spaced in the unshifted time, then shifted.

    With ``start=1``, ``end=1/num_train_timesteps`` and the scheduler's own shift this is the default schedule of
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(steps)``."""
    t0, t1 = inverse_time_shift(start, shift), inverse_time_shift(end, shift)
    if steps == 1:
        t = np.array([t0], dtype=np.float64)
    else:
        t = np.linspace(t0, t1, steps, dtype=np.float64)
    return [float(s) for s in np.asarray(time_shift(t, shift), dtype=np.float32)]


def supported(scheduler: Any) -> None:
    """Raise a PolicyError unless stage schedules can drive ``scheduler``."""
    name = type(scheduler).__name__
    config = scheduler.config
    if name == "FlowMatchEulerDiscreteScheduler" or "use_flow_sigmas" in config and name.startswith("UniPC"):
        if config.get("invert_sigmas"):
            raise PolicyError(f"{name} with invert_sigmas (Mochi) is not supported by stage schedules")
        if config.get("stochastic_sampling"):
            raise PolicyError(f"{name} with stochastic_sampling is not supported by stage schedules")
        return
    raise PolicyError(f"stage schedules need a flow-matching scheduler that takes explicit sigmas "
                      f"(FlowMatchEulerDiscreteScheduler, or UniPCMultistepScheduler with use_flow_sigmas=True); "
                      f"the pipeline has {name}")


def stage_scheduler(scheduler: Any, sigmas: Sequence[float]) -> Any:
    """A scheduler of ``scheduler``'s class and config, transforms off, whose ``set_timesteps`` sets ``sigmas``."""
    supported(scheduler)
    cls = type(scheduler)
    overrides = {k: v for k, v in NEUTRAL.items() if k in scheduler.config}
    if "use_flow_sigmas" in scheduler.config:
        overrides["use_flow_sigmas"] = True
    fixed = np.asarray([float(s) for s in sigmas], dtype=np.float32)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: Any = None, timesteps: Any = None, **kwargs: Any) -> None:
        cls.set_timesteps(self, device=device, sigmas=fixed.copy())

    stage_cls = type(f"Stage{cls.__name__}", (cls,), {"set_timesteps": set_timesteps})
    return stage_cls.from_config({**dict(scheduler.config), **overrides})


@contextlib.contextmanager
def scheduled(pipe: Any, sigmas: Sequence[float]) -> Iterator[Any]:
    """``pipe.scheduler`` replaced by :func:`stage_scheduler` for the ``with`` body, put back afterwards."""
    original = pipe.scheduler
    stage = stage_scheduler(original, sigmas)
    pipe.scheduler = stage
    try:
        yield stage
    finally:
        pipe.scheduler = original
