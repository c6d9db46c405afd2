"""Bottleneck Sampling (Tian et al., 2025, "Training-free Diffusion Acceleration with Bottleneck Sampling",
arXiv:2503.18940): a high-low-high resolution schedule driven around an unmodified pipeline.

The paper observes that the cost of a DiT step grows with the number of visual tokens (attention
quadratically) while most models saw lower resolutions in pre-training, so the middle of the trajectory can
run at a lower resolution: the first steps run at full resolution (they fix the layout), the middle stage at
a lower one, the last steps at full resolution again (they restore detail). Two devices keep the result
sharp: *noise reintroduction* at every resolution change (the upsampled prediction is blurred; re-noising it
to a higher level than where the previous stage ended lets the model repaint the detail) and *scheduler
re-shifting* per stage (each stage runs its own shifted schedule, spending its steps where its resolution
needs them).

What runs here, per stage ``i`` with ``(scale, steps, start, end, shift)``:

1. the pipeline is called with ``latents=`` (in its own layout, see :mod:`~dit_accel.sampling.layout`),
   the stage's pixel size, and the schedule ``steps`` noise levels from ``start`` to ``end`` (evenly spaced
   in unshifted time, then shifted by ``shift``; :func:`~dit_accel.sampling.schedules.stage_sigmas`); the
   scheduler appends σ = 0, so the call returns x̂₀ = x_end − end·v(x_end) (flow matching; the Euler step to
   0), with no extra transformer evaluation;
2. x̂₀ is resized to the next stage's grid (``downsample`` / ``upsample`` modes of
   ``torch.nn.functional.interpolate``; video: per frame, frames kept) and re-noised to the next stage's
   ``start``: x = (1 − σ)·x̂₀ + σ·ε.

The last stage's call returns the pipeline's normal output (decoded, ``output_type`` as asked). Every stage
is a separate pipeline call, so anything attached to the pipeline — a ``dit_accel.accelerate`` policy,
another hook — runs inside every stage (caches start fresh per call and key their state by input shape).

**Defaults** (:func:`default_stages`): three stages at scales 1 → 0.5 → 1 sharing the requested
``num_inference_steps`` as 20 % / 50 % / 30 %; stage boundaries σ 1 → 0.8 (full), re-noised to 0.8 → 0.3
(half), re-noised to 0.6 → σ_min (full). Departures: the paper's per-model stage step counts, re-noising
levels and shift values (tuned for FLUX.1-dev at 1024² and HunyuanVideo at 720p) are *not* reproduced —
ours were chosen on the project's reference models (``benchmarks/seed_methods_zoo.py``), whose 32² training
resolution leaves little room below it; pass ``stages=`` for the paper's settings on a large model.
``noise="initial"`` (re-noise with the initial noise, area-resized to unit variance, instead of fresh
noise) is ours: it keeps the final stage on the trajectory of the initial noise, which is what fidelity to
the full-resolution run (PSNR) rewards; the paper draws fresh noise (our default too).

Supported: flow-matching pipelines whose scheduler takes explicit sigmas (FlowMatchEulerDiscreteScheduler:
FLUX, SD3, the reference models; UniPC with flow sigmas: Wan) — anything else is refused before the first
call (:mod:`~dit_accel.sampling.schedules`).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..config import ConfigBase, PolicyError, document_options, option
from .layout import LatentLayout, accepts, batch_size, resize, resize_noise
from .schedules import scheduled, stage_sigmas, supported, time_shift

logger = logging.getLogger("dit_accel")

RESIZE_MODES = ("area", "nearest-exact", "bilinear", "bicubic")


@document_options
@dataclass(frozen=True)
class Stage(ConfigBase):
    """One stage of a Bottleneck Sampling plan."""

    section: ClassVar[str] = "sampling.stages[]"
    scale: float = option(1.0, gt=0.0, le=1.0, doc="side length relative to the requested resolution")
    steps: int = option(1, ge=1, doc="transformer evaluations (per CFG branch) of the stage")
    start: float = option(1.0, gt=0.0, le=1.0, doc="noise level σ the stage starts from (1: pure noise)")
    end: float | None = option(None, gt=0.0, le=1.0, doc="σ of the stage's last evaluation, where x̂₀ is formed; "
                                                         "None: the scheduler's σ_min shifted by `shift`, as in its "
                                                         "default schedule (the last stage)")
    shift: float = option(1.0, gt=0.0, doc="time shift of the stage's schedule (re-shifting)")


@document_options
@dataclass(frozen=True)
class BottleneckConfig(ConfigBase):
    """Bottleneck Sampling: run the middle of the trajectory at a lower resolution."""

    section: ClassVar[str] = "sampling"
    method: str = option("bottleneck", choices=("bottleneck",), doc="the sampler-level method")
    stages: tuple | None = option(None, doc="the stages, first to last (Stage or mappings); None: "
                                            "default_stages(num_inference_steps)")
    noise: str = option("fresh", choices=("fresh", "initial"), doc="re-noise with fresh noise (the paper) or the "
                                                                  "initial noise resized (ours)")
    downsample: str = option("area", choices=RESIZE_MODES, doc="interpolation of x̂₀ to a lower resolution")
    upsample: str = option("bicubic", choices=RESIZE_MODES, doc="interpolation of x̂₀ to a higher resolution")

    def validate(self) -> None:
        super().validate()
        if self.stages is None:
            return
        if isinstance(self.stages, (str, bytes)) or not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise PolicyError(f"sampling.stages: expected a non-empty list of stages, got {self.stages!r:.80}")
        stages = tuple(s if isinstance(s, Stage) else Stage.from_dict(s, where=f"sampling.stages[{i}]")
                       for i, s in enumerate(self.stages))
        object.__setattr__(self, "stages", stages)
        check_stages(stages)


def check_stages(stages: tuple[Stage, ...]) -> None:
    """Refuse a plan that cannot run: it must start from pure noise, end at full resolution and σ_min, and every
    stage must go down in noise."""
    first, last = stages[0], stages[-1]
    if first.start != 1.0:
        raise PolicyError(f"sampling.stages[0].start: the first stage starts from pure noise (1.0), got {first.start}")
    if last.scale != 1.0:
        raise PolicyError(f"sampling.stages[-1].scale: the last stage runs at full resolution (1.0), got {last.scale}")
    if last.end is not None:
        raise PolicyError("sampling.stages[-1].end: the last stage runs down to the scheduler's σ_min (leave end "
                          "unset)")
    for i, s in enumerate(stages[:-1]):
        if s.end is None:
            raise PolicyError(f"sampling.stages[{i}].end: every stage but the last needs the σ where it ends")
    for i, s in enumerate(stages):
        if s.end is not None and not s.end < s.start:
            raise PolicyError(f"sampling.stages[{i}]: end ({s.end}) must be below start ({s.start})")
    for i, (a, b) in enumerate(zip(stages, stages[1:])):
        if b.start < a.end:
            raise PolicyError(f"sampling.stages[{i + 1}].start ({b.start}) is below where stage {i} ended "
                              f"({a.end}): re-noising can only add noise")


def default_stages(num_inference_steps: int, low_scale: float = 0.5) -> tuple[Stage, ...]:
    """The default high-low-high plan for ``num_inference_steps`` (see the module docstring)."""
    n = int(num_inference_steps)
    if n < 3:
        raise PolicyError(f"Bottleneck Sampling needs at least 3 steps (one per stage), got {n}")
    n1 = max(1, round(0.2 * n))
    n3 = max(1, round(0.3 * n))
    n2 = max(1, n - n1 - n3)
    return (Stage(scale=1.0, steps=n1, start=1.0, end=0.8),
            Stage(scale=low_scale, steps=n2, start=0.8, end=0.3),
            Stage(scale=1.0, steps=n3, start=0.6, end=None))


@dataclass(frozen=True)
class PlannedStage:
    """A stage resolved for one call: its latent grid and its noise levels."""

    stage: Stage
    grid: tuple[int, ...]
    sigmas: tuple[float, ...]

    @property
    def tokens(self) -> int:
        """Latent positions per sample (visual tokens times the patch area)."""
        n = 1
        for d in self.grid[2:]:
            n *= d
        return n


@dataclass(frozen=True)
class BottleneckPlan:
    """What one call runs: the stages, and the transformer work they cost relative to the full-resolution run."""

    stages: tuple[PlannedStage, ...]
    reference_steps: int
    full_tokens: int = field(default=0)

    @property
    def calls(self) -> int:
        return sum(s.stage.steps for s in self.stages)

    @property
    def token_share(self) -> float:
        """Σ steps·tokens over the stages / (reference steps · full-resolution tokens): the share of the
        token-linear work (projections, FFN) of a full-resolution run with ``reference_steps`` steps."""
        return sum(s.stage.steps * s.tokens for s in self.stages) / (self.reference_steps * self.full_tokens)

    @property
    def attention_share(self) -> float:
        """The same with tokens² (the self-attention score work)."""
        return (sum(s.stage.steps * s.tokens ** 2 for s in self.stages)
                / (self.reference_steps * self.full_tokens ** 2))


class BottleneckSampler:
    """Bottleneck Sampling around ``pipe`` (see the module docstring): ``BottleneckSampler(pipe)(prompt=...)``.

    Keyword arguments are those of ``pipe.__call__`` (positional ones are bound by its signature); ``latents``
    may be given (full-resolution initial noise in the pipeline's layout), else it is drawn from ``generator``
    exactly as the pipeline would draw it."""

    def __init__(self, pipe: Any, config: BottleneckConfig | dict | None = None, **fields: Any) -> None:
        if config is None:
            config = BottleneckConfig(**fields)
        elif isinstance(config, dict):
            config = BottleneckConfig.from_dict({**config, **fields})
        elif fields:
            config = replace(config, **fields)
        if not isinstance(config, BottleneckConfig):
            raise PolicyError(f"expected a BottleneckConfig or a mapping, got {type(config).__name__}")
        self.pipe = pipe
        self.config = config
        self.layout = LatentLayout.of(pipe)
        for name in ("latents", "output_type"):
            if not accepts(pipe, name):
                raise PolicyError(f"{type(pipe).__name__}.__call__ takes no {name}=; Bottleneck Sampling calls the "
                                  "pipeline once per stage with latents= and output_type=")
        supported(pipe.scheduler)
        if not accepts(pipe, "height"):
            raise PolicyError(f"{type(pipe).__name__}.__call__ takes no height=/width=; the stages run at several "
                              "resolutions")

    # ---- planning -------------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> dict:
        if not args:
            return dict(kwargs)
        bound = inspect.signature(type(self.pipe).__call__).bind_partial(self.pipe, *args, **kwargs)
        out = dict(bound.arguments)
        out.pop("self", None)
        out.update(out.pop("kwargs", {}) or {})
        return out

    def _stages(self, kwargs: dict) -> tuple[tuple[Stage, ...], int]:
        steps = kwargs.get("num_inference_steps")
        if self.config.stages is not None:
            return self.config.stages, int(steps) if steps is not None else sum(s.steps for s in self.config.stages)
        if steps is None:
            steps = (getattr(self.pipe, "defaults", None) or {}).get("num_inference_steps") or \
                inspect.signature(type(self.pipe).__call__).parameters.get("num_inference_steps").default
        if not isinstance(steps, int):
            raise PolicyError("pass num_inference_steps= (the full-resolution step count the default stages split)")
        return default_stages(steps), steps

    def plan(self, *args: Any, **kwargs: Any) -> BottleneckPlan:
        """The stages of a call with these arguments (nothing runs). ``num_inference_steps`` is the reference
        run's step count: with default stages they split it; with explicit stages it is only the reference of
        the shares (default: the stages' total)."""
        kwargs = self._bind(args, kwargs)
        stages, reference = self._stages(kwargs)
        layout = self.layout
        height, width, frames = layout.requested_size(self.pipe, kwargs)
        latents = kwargs.get("latents")
        batch = batch_size(kwargs) if latents is None else int(latents.shape[0])
        full = layout.grid_shape(batch, height, width, frames)
        sigma_min = self._sigma_min()
        planned = []
        for i, stage in enumerate(stages):
            hw = layout.scaled_hw(full, stage.scale)
            grid = (*full[:-2], *hw)
            end = stage.end if stage.end is not None else float(time_shift(sigma_min, stage.shift))
            if end >= stage.start:
                raise PolicyError(f"sampling.stages[{i}]: the scheduler's σ_min ({sigma_min}) is not below start "
                                  f"({stage.start})")
            planned.append(PlannedStage(stage, grid, tuple(stage_sigmas(stage.steps, stage.start, end, stage.shift))))
        plan = BottleneckPlan(tuple(planned), reference)
        return replace(plan, full_tokens=PlannedStage(stages[-1], full, ()).tokens)

    def _sigma_min(self) -> float:
        """The unshifted time of the last step of FlowMatchEuler's default schedule (its ``sigma_min``), else
        1 / num_train_timesteps."""
        scheduler = self.pipe.scheduler
        value = vars(scheduler).get("sigma_min")  # an attribute of FlowMatchEuler (UniPC: config only)
        if isinstance(value, (int, float)) and 0.0 < value < 1.0:
            return float(value)
        return 1.0 / float(scheduler.config.get("num_train_timesteps", 1000) or 1000)

    # ---- running --------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self._bind(args, kwargs)
        plan = self.plan(**kwargs)
        pipe, layout, config = self.pipe, self.layout, self.config
        transformer = pipe.transformer
        device = getattr(pipe, "_execution_device", None) or next(transformer.parameters()).device
        dtype = transformer.dtype
        generator = kwargs.get("generator")
        output_type, return_dict = kwargs.pop("output_type", None), kwargs.pop("return_dict", True)
        frames = layout.requested_size(pipe, kwargs)[2]
        kwargs.pop("num_inference_steps", None)
        latents = kwargs.pop("latents", None)
        full = plan.stages[-1].grid
        if latents is None:
            noise = layout.initial_noise(full, generator, device, dtype)
        else:
            noise = layout.from_pipeline(pipe, latents.to(device=device, dtype=dtype), full)
        x = resize_noise(noise, plan.stages[0].grid[-2:]) if plan.stages[0].grid != full else noise
        out = None
        for i, planned in enumerate(plan.stages):
            last = i == len(plan.stages) - 1
            call = {**kwargs, **layout.size_arguments(planned.grid, frames),
                    "latents": layout.to_pipeline(pipe, x), "num_inference_steps": len(planned.sigmas)}
            if last:
                if output_type is not None:
                    call["output_type"] = output_type
                call["return_dict"] = return_dict
            else:
                call.update(output_type=layout.latent_output, return_dict=False)
            with scheduled(pipe, planned.sigmas):
                out = pipe(**call)
            if last:
                break
            x0 = layout.from_pipeline(pipe, out[0], planned.grid)
            nxt = plan.stages[i + 1]
            hw = nxt.grid[-2:]
            if tuple(hw) != tuple(planned.grid[-2:]):
                smaller = hw[0] * hw[1] < planned.grid[-2] * planned.grid[-1]
                x0 = resize(x0, hw, config.downsample if smaller else config.upsample)
            if config.noise == "initial":
                eps = resize_noise(noise, hw)
            else:
                eps = layout.initial_noise(nxt.grid, generator, device, dtype)
            sigma = nxt.stage.start
            x = (1.0 - sigma) * x0 + sigma * eps
        return out


def bottleneck_sample(pipe: Any, *args: Any, config: BottleneckConfig | dict | None = None,
                      stages: Any = None, **kwargs: Any) -> Any:
    """Run ``pipe(*args, **kwargs)`` with Bottleneck Sampling (:class:`BottleneckSampler`); returns what the
    pipeline returns. ``stages``: a list of :class:`Stage` (or mappings) overriding ``config.stages``."""
    fields = {} if stages is None else {"stages": tuple(stages)}
    if isinstance(config, BottleneckConfig) and fields:
        config = BottleneckConfig.from_dict({**config.to_dict(), **fields})
        fields = {}
    return BottleneckSampler(pipe, config, **fields)(*args, **kwargs)
