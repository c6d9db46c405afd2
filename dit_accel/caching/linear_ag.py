"""LinearAG (Castillo et al., 2023, "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion
Models", arXiv:2312.12487, the second method of the paper beside AG in :mod:`.adaptive_guidance`).

Classifier-free guidance needs an unconditional estimate u_t every step. The paper observes that along a
trajectory u_t is well predicted by an affine combination of estimates the sampler already has, and replaces
the unconditional network evaluation on chosen steps by that combination, its coefficients fitted offline by
least squares. Here, on a replaced step t (history ``h``):

    û_t = a_0·c_t + Σ_{i=1..h} (a_i·c_{t−i} + b_i·u_{t−i}) + γ

with c the conditional prediction (computed every step), u the unconditional one (computed, or û where that
step was replaced too), and one scalar coefficient per regressor and step, shared by every element and
sample. ``dit_accel.calibrate`` runs full-CFG generations and fits, per replaced step, the coefficients that
minimise Σ‖û_t − u_t‖² over all elements of the calibration generations (normal equations accumulated while
they run; ridge ``1e-8`` relative to the Gram diagonal for conditioning); they are stored in the ``guidance:``
section (``coefficients: {step: [a_0, a_1, b_1, …, γ]}``).

Which steps: ``every``-th step from ``start`` on (default every other step from step 1: half the unconditional
evaluations). Departures: the paper fits its regression on its models' trajectories and reports the schedule
it found best; the step pattern, the scalar-per-regressor form and the ridge term are our reading. A replaced
batched-CFG call runs the conditional rows only (half batch); separate-CFG pipelines pass the unconditional
call through (every block skipped) and take û as its output. Composed with a ``cache:`` section, the half-batch
calls of batched CFG keep their own per-shape cache state (the runtime keys state by input shape).

Calibrations are made for a step count: another step count maps replaced steps by relative position and
warns once (the coefficients belong to the calibrated step gaps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..config import ConfigBase, PolicyError, finite_numbers, option
from .adaptive_guidance import CFG_ORDERS
from .base import register_guidance_method

RIDGE = 1e-8


@dataclass(frozen=True)
class LinearAGConfig(ConfigBase):
    """LinearAG: replace the unconditional evaluation on chosen steps by a fitted affine combination of past
    estimates."""

    section: ClassVar[str] = "guidance"
    method: str = option("linear_ag", choices=("linear_ag",))
    history: int = option(1, ge=1, le=4, doc="past steps of (cond, uncond) estimates the combination uses")
    every: int = option(2, ge=1, doc="replace the unconditional evaluation on every `every`-th step from `start`")
    start: int = option(1, ge=1, doc="first step that may be replaced (needs `history` steps before it)")
    stop: int | None = option(None, ge=1, doc="steps from this one on are never replaced; None: the last step")
    coefficients: dict | None = option(None, doc="calibrated {step: [a_0, a_1, b_1, ..., γ]} (dit_accel.calibrate)")
    calibrated_steps: int | None = option(None, ge=1, doc="the step count the coefficients were fitted for")
    cfg_order: str | None = option(None, choices=CFG_ORDERS,
                                   doc="row order of batched CFG; None: from the pipeline class")
    guidance_scale: float | None = option(None, gt=0.0, doc="unused by the prediction; kept for the guidance API")

    def validate(self) -> None:
        super().validate()
        if self.coefficients is None:
            return
        if not isinstance(self.coefficients, dict) or not self.coefficients:
            raise PolicyError("guidance.coefficients: expected a mapping {step: [coefficients]} (run "
                              "dit_accel.calibrate)")
        width = 2 * self.history + 2
        clean = {}
        for step, values in self.coefficients.items():
            if isinstance(step, bool) or not isinstance(step, (int, str)) or not str(step).isdigit():
                raise PolicyError(f"guidance.coefficients: step keys must be integers >= 0, got {step!r}")
            values = finite_numbers(f"guidance.coefficients[{step}]", values, min_length=width)
            if len(values) != width:
                raise PolicyError(f"guidance.coefficients[{step}]: expected {width} numbers for history "
                                  f"{self.history} (a_0, a_1..a_h, b_1..b_h, γ), got {len(values)}")
            if int(step) < self.history:
                raise PolicyError(f"guidance.coefficients[{step}]: a step below history={self.history} has no "
                                  "past estimates to combine")
            clean[int(step)] = [float(v) for v in values]
        object.__setattr__(self, "coefficients", clean)

    @property
    def needs_calibration(self) -> bool:
        return self.coefficients is None


class LinearAG:
    """The LinearAG decisions: which steps are replaced, and the prediction û_t."""

    def __init__(self, config: LinearAGConfig, cfg_layout: str, order: str | None) -> None:
        if config.coefficients is None:
            raise PolicyError("guidance.coefficients is required for linear_ag: run dit_accel.calibrate(pipe, "
                              "prompts, policy) first")
        self.config = config
        self.cfg_layout = cfg_layout
        self.order = order

    def describe(self) -> str:
        c = self.config
        return f"linear_ag(history={c.history}, steps={len(c.coefficients)}" + \
            (f", cfg_order={self.order}" if self.order else "") + ")"

    def calibrated_step(self, step: int, steps: int | None) -> int:
        """The calibrated step at ``step``'s relative position in a call of ``steps`` steps."""
        n = self.config.calibrated_steps
        if n is None or steps is None or steps == n:
            return step
        return min(n - 1, int(round(step * (n - 1) / max(steps - 1, 1))))

    def replaces(self, step: int, steps: int | None, history_len: int) -> bool:
        """Whether the unconditional evaluation of ``step`` is replaced (needs ``history`` past steps)."""
        if history_len < self.config.history:
            return False
        return self.calibrated_step(step, steps) in self.config.coefficients

    def predict(self, cond: torch.Tensor, history: list[tuple[torch.Tensor, torch.Tensor]], step: int,
                steps: int | None) -> torch.Tensor:
        """û_t from c_t and the last ``history`` (c, u) pairs (most recent last)."""
        coef = self.config.coefficients[self.calibrated_step(step, steps)]
        return combine(coef, cond, history[-self.config.history:])


def regressors(cond: torch.Tensor, history: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor | None]:
    """[c_t, c_{t−1}, …, c_{t−h}, u_{t−1}, …, u_{t−h}, None (the constant)] for ``history`` ordered oldest first."""
    past = list(reversed(history))
    return [cond, *(c for c, _ in past), *(u for _, u in past), None]


def combine(coef: list[float], cond: torch.Tensor, history: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    out = torch.zeros_like(cond, dtype=torch.float32)
    for a, x in zip(coef, regressors(cond, history)):
        out = out + a if x is None else out + a * x.float()
    return out.to(cond.dtype)


class NormalEquations:
    """Σ XᵀX and Σ Xᵀy per step, accumulated over calibration generations, and their least-squares solution."""

    def __init__(self) -> None:
        self.gram: dict[int, np.ndarray] = {}
        self.rhs: dict[int, np.ndarray] = {}

    def add(self, step: int, cond: torch.Tensor, history: list, target: torch.Tensor) -> None:
        cols = [x.double().reshape(-1) if x is not None else None for x in regressors(cond, history)]
        n = target.numel()
        ones = torch.ones(n, dtype=torch.float64, device=target.device)
        cols = [ones if x is None else x for x in cols]
        X = torch.stack(cols, 1)
        y = target.double().reshape(-1)
        g, r = (X.T @ X).cpu().numpy(), (X.T @ y).cpu().numpy()
        self.gram[step] = self.gram.get(step, 0) + g
        self.rhs[step] = self.rhs.get(step, 0) + r

    def solve(self) -> dict[int, list[float]]:
        out = {}
        for step, g in sorted(self.gram.items()):
            ridge = RIDGE * max(float(np.trace(g)) / len(g), 1e-30)
            coef = np.linalg.solve(g + ridge * np.eye(len(g)), self.rhs[step])
            out[step] = [float(v) for v in coef]
        return out


def replaced_steps(config: LinearAGConfig, steps: int) -> list[int]:
    """The steps a calibration for ``steps`` steps fits coefficients for."""
    stop = steps if config.stop is None else min(config.stop, steps)
    first = max(config.start, config.history)
    return [t for t in range(first, stop) if (t - config.start) % config.every == 0]


def calibrated_config(config: LinearAGConfig, equations: NormalEquations, steps: int) -> LinearAGConfig:
    from dataclasses import replace

    coefficients = equations.solve()
    if not coefficients:
        raise PolicyError("linear_ag calibration recorded no replaceable step (too few steps, or no CFG?)")
    return replace(config, coefficients=coefficients, calibrated_steps=steps)




register_guidance_method("linear_ag", LinearAGConfig)
