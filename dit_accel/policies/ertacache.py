"""ERTACache — error rectification and timestep adjustment (2025, "ERTACache: Error Rectification
and Timesteps Adjustment for Efficient Diffusion"; cited from memory: authors and exact equations
not re-checked).

The paper has three parts: (1) offline residual profiling picks which steps may reuse the
cached model features (a static schedule instead of an online gate); (2) a closed-form
linearisation of the cache-induced error rectifies the reused features; (3) a trajectory-aware
timestep adjustment changes the integration interval of reused steps to compensate the
remaining drift. What is implemented here:

* **Offline schedule** (part 1): calibration (``dit_accel.calibrate``) records the whole-stack
  residual R_t (output of the last block − input of the first) and, for every pair of steps
  a < t, the error of reusing R_a at step t. ``budget`` is the share of steps computed: the
  schedule computes exactly k = round(budget · steps) steps (step 0 and the first
  ``warmup_steps`` included) chosen to minimise the total reuse error over the call, by the same
  exact dynamic programme as BAC's scheduler (:func:`dit_accel.policies.bac.acs`). The paper
  selects reusable steps with a threshold on the profiled error; a budget makes the speed-up
  exact and comparable (our departure).
* **Residual rectification** (part 2): on a reused step t whose cached residual is from step
  a(t), the stack's output is x + α_t·R_a + β_t, with (α_t, β_t) the least-squares fit
  R_t ≈ α_t·R_a + β_t averaged over the calibration generations (closed form, one scalar pair
  per step). With ``rectify: true`` the schedule minimises the error *after* rectification.
  This is a scalar-per-step simplification of the paper's residual linearisation (which, as we
  recall it, models the cache-induced error as a linear function; its exact form is not
  reproduced). The encoder-stream residual (dual-stream models) is reused as cached.
* **Timestep adjustment** (part 3) is **not implemented**: it changes the timestep/step size
  the sampler integrates with on a reused step, which lives in the scheduler loop outside the
  transformer; this interface (block hooks deciding reuse) cannot change what the sampler does.

The decision reads only the calibrated tables (no host sync). A call with another step count
than the calibration maps each step to the calibrated one at the same relative position and
reuses without rectification (the fitted pairs belong to the calibrated step gaps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..config import ConfigBase, PolicyError, option
from .bac import acs, position
from .base import BranchState, CacheMethod, CachePlan

logger = logging.getLogger("dit_accel")


def _numbers(value, where: str, positive: bool = False) -> None:
    if not isinstance(value, dict) or not value:
        raise PolicyError(f"{where}: expected a mapping {{branch: [...]}} (run dit_accel.calibrate)")
    for branch, values in value.items():
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in values):
            raise PolicyError(f"{where}[{branch!r}]: expected a non-empty list of numbers")
        if positive and not all(isinstance(v, int) and v >= 0 for v in values):
            raise PolicyError(f"{where}[{branch!r}]: expected step indices (integers >= 0)")


@dataclass(frozen=True)
class ERTACacheConfig(ConfigBase):
    section: ClassVar[str] = "cache"
    method: str = option("ertacache", choices=("ertacache",))
    budget: float = option(0.5, gt=0.0, le=1.0, doc="share of steps computed (exact, per branch)")
    warmup_steps: int = option(1, ge=1, doc="leading steps always computed")
    rectify: bool = option(True, doc="rectify reused residuals with the calibrated α_t·R + β_t")
    compute_steps: dict | None = option(None, doc="calibrated compute steps per branch {branch: [steps]}")
    scale: dict | None = option(None, doc="calibrated α_t per branch and step (1 on computed steps)")
    shift: dict | None = option(None, doc="calibrated β_t per branch and step (0 on computed steps)")

    def validate(self) -> None:
        if self.compute_steps is not None:
            _numbers(self.compute_steps, "cache.compute_steps", positive=True)
        for name in ("scale", "shift"):
            if getattr(self, name) is not None:
                _numbers(getattr(self, name), f"cache.{name}")
        super().validate()


class ERTACache(CacheMethod):
    name = "ertacache"
    config_cls = ERTACacheConfig
    record_options = {"per_block": True}

    def __init__(self, config: ERTACacheConfig, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        if config.compute_steps is None or config.scale is None or config.shift is None:
            raise PolicyError("cache.compute_steps, cache.scale and cache.shift are required: run "
                              "dit_accel.calibrate(pipe, prompts, policy) first")
        self._warned = False

    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=((0, num_blocks),))

    def _table(self, table: dict, state: BranchState):
        return table.get(state.key[0]) or next(iter(table.values()))

    def _calibrated_step(self, state: BranchState) -> tuple[int, bool]:
        calibrated = len(self._table(self.config.scale, state))
        steps = state.num_steps or calibrated
        if steps != calibrated and not self._warned:
            logger.warning("dit_accel: ERTACache calibrated for %d steps, used for %d: steps are mapped by relative "
                           "position and reused residuals are not rectified (recalibrate)", calibrated, steps)
            self._warned = True
        return position(state.step, steps, calibrated), steps == calibrated

    def should_reuse(self, range_id: int, state: BranchState) -> bool:
        if state.step < self.config.warmup_steps or range_id not in state.residuals:
            return False
        t, _ = self._calibrated_step(state)
        return t not in self._table(self.config.compute_steps, state)

    def reused_output(self, range_id, hidden, encoder, state):
        res_h, res_e, enc_none = state.residuals[range_id]
        t, exact = self._calibrated_step(state)
        if self.config.rectify and exact:
            alpha, beta = self._table(self.config.scale, state)[t], self._table(self.config.shift, state)[t]
            out = hidden + res_h * alpha + beta if (alpha, beta) != (1.0, 0.0) else hidden + res_h
        else:
            out = hidden + res_h
        if enc_none:
            return out, None
        return out, (encoder + res_e if res_e is not None else encoder)

    @staticmethod
    def calibrated(config: ERTACacheConfig, records: list[dict], family: str) -> ERTACacheConfig:
        """Profile the whole-stack residual: the optimal schedule under the budget, then α_t, β_t."""
        from ..calibrate import pairwise_tables, require_per_block

        require_per_block(records, "ertacache")
        if config.rectify:
            errors = pairwise_tables(records, lambda row: [f[2] for f in row["stack_fit"]])
        else:
            errors = pairwise_tables(records, lambda row: row["stack_dist"])
        alphas = pairwise_tables(records, lambda row: [f[0] for f in row["stack_fit"]])
        betas = pairwise_tables(records, lambda row: [f[1] for f in row["stack_fit"]])
        compute, scale, shift = {}, {}, {}
        for branch, table in errors.items():
            steps = table.shape[0]
            warmup = list(range(min(config.warmup_steps, steps)))
            k = min(max(int(round(config.budget * steps)), len(warmup), 1), steps)
            chosen = acs(table, k, warmup)
            compute[branch] = chosen
            scale[branch], shift[branch] = [1.0] * steps, [0.0] * steps
            last = 0
            for t in range(steps):
                if t in chosen:
                    last = t
                elif config.rectify:
                    a, b = alphas[branch][t, last], betas[branch][t, last]
                    scale[branch][t] = float(a) if np.isfinite(a) else 1.0
                    shift[branch][t] = float(b) if np.isfinite(b) else 0.0
        return ERTACacheConfig(**{**config.to_dict(), "compute_steps": compute, "scale": scale, "shift": shift})
