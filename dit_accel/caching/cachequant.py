"""CacheQuant — joint caching and quantization (Liu, Li, Gu, CVPR 2025, "CacheQuant: Comprehensively Accelerated
Diffusion Models", arXiv:2503.01323; the authors' code: github.com/BienLuky/CacheQuant).

The paper's point: caching (temporal) and quantization (structural) errors are not orthogonal — optimised
separately and combined, they compound. It has two parts, both implemented here:

* **Dynamic Programming Schedule (DPS).** The T steps are split into K = ⌈T/N⌉ consecutive groups; the first
  step of each group is computed and the rest reuse its cached features. The split is the one with the least
  total error, found exactly by dynamic programming over group boundaries (O(K·T·N)); group lengths lie between
  ⌈N/2⌉ and 2N, as in the authors' code (``quant/utils.py``, ``Fisher.feature_to_interval_seq_optimal``).
  The error is the *combined* caching + quantization error against the full-precision trajectory:
  calibration (``dit_accel.calibrate`` with the policy's ``quant:`` section) records each calibration generation
  twice from the same random state — on the full-precision model (F) and on the quantized one it will serve (Q)
  — and the cost of a group computed at step a is Σ_{t in group} E[t, a] with
  E[a, a] = ‖F_a − Q_a‖₁ / ‖F_a‖₁ (the computed step's quantization error) and, for a reused step t > a,
  E[t, a] = ‖F_t − R̂_t‖₁ / ‖F_t‖₁, R̂_t the corrected reused residual below. ``interval`` is N.
* **Decoupled Error Correction (DEC).** Reused features are corrected per channel, the two errors separately:
  the quantization error of the cached residual by (s^q_a, b^q_a), the least-squares per-channel fit
  F_a ≈ s^q_a ⊙ Q_a + b^q_a at its computed step a (``correct_quant``); the caching error by (s^c_t, b^c_t), the
  per-channel fit F_t ≈ s^c_t ⊙ F_a + b^c_t between full-precision features (``correct_cache``). A reused step
  t serves R̂_t = s^c_t ⊙ (s^q_a ⊙ Q_a + b^q_a) + b^c_t. Fits are over the calibration generations on a fixed
  sample of token rows (all channels) of the residual (``RecordConfig(stack_rows=128)``).

The cached feature is the block stack's residual (output of the last block − input of the first; one cacheable
range): a reused step skips every block and adds R̂_t to its fresh input. The schedule and corrections are
static (no host sync); the corrections cost one multiply-add on reused steps.

**Without a quant section** the method is CacheQuant's caching half: F = Q, the quantization terms vanish, DPS
minimises the caching error alone and only the caching correction applies. A policy calibrated with one
``quant.linear`` mode must be served with it (``quant_mode`` is checked against the policy's quant section).

Where we depart from the paper:

* **Features and layer.** The paper (U-Net and DiT models) caches DeepCache's deep branch features and applies
  its quantization correction at the layer that consumes the cached feature, on every step. Here the cached
  feature is the whole block-stack residual, and its quantization is that of the torchao linears inside the
  blocks (``dit_accel.quant``; on the CPU ``int8_weight_only``) rather than the paper's PTQ (weights and
  activations, with reconstruction). Computed steps run the quantized blocks as they are: our runtime corrects
  reused residuals only, so the quantization correction is fitted at the cached step and carried into its
  group, and E[a, a] enters the DP uncorrected.
* **Order of the corrections.** The paper corrects the caching error first and fits the quantization correction
  on the corrected cache; our cached residual is itself the quantized model's, so its quantization error is
  corrected first (Q_a → F_a) and the caching correction (F_a → F_t, fitted on full-precision features) after.
* **Error measure.** The paper's DPS cost is the L1 distance of full-precision features to the group's first
  (its code's "class diameter"); ours is the relative L1 error after the corrections, with the quantized model,
  the combined error the paper argues should be minimised.
* The two passes follow the full-precision and the quantized trajectories from the same noise; the encoder
  stream of dual-stream models is reused uncorrected; another step count than the calibrated one maps steps by
  relative position and reuses without corrections (one warning).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import PolicyError, finite_numbers, option
from .base import (CacheConfig, CacheMethod, CachePlan, CacheState, Residual, branch_table, register_cache_method,
                   StepMapping, replace_config, require_calibrated)
from .records import Records


#: token rows (all channels) of the stack residual the calibration keeps per call for the per-channel fits
FIT_ROWS = 128
_TABLES = ("cache_scale", "cache_shift", "quant_scale", "quant_shift")


def _steps(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not value:
        raise PolicyError(f"{where}: expected a mapping {{branch: [steps]}} (run dit_accel.calibrate)")
    for branch, steps in value.items():
        if not isinstance(steps, list) or not steps or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
            raise PolicyError(f"{where}[{branch!r}]: expected a non-empty list of step indices")


def _table(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not value:
        raise PolicyError(f"{where}: expected a mapping {{branch: [[one number per channel] per step]}} (run "
                          "dit_accel.calibrate)")
    for branch, rows in value.items():
        if not isinstance(rows, list) or not rows:
            raise PolicyError(f"{where}[{branch!r}]: expected one list of per-channel numbers per step")
        width = len(rows[0]) if isinstance(rows[0], list) else -1
        for t, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != width:
                raise PolicyError(f"{where}[{branch!r}][{t}]: expected {width} per-channel numbers like step 0")
            finite_numbers(f"{where}[{branch!r}][{t}]", row)


@dataclass(frozen=True)
class CacheQuantConfig(CacheConfig):
    """CacheQuant: a DP refresh schedule minimising the combined caching + quantization error, and decoupled
    per-channel corrections of the two errors on reused steps."""

    interval: int = option(2, ge=1, le=1000, doc="N: ceil(steps / N) computed steps, each reused for a group of "
                                                 "ceil(N/2) to 2N steps (1: compute every step)")
    correct_cache: bool = option(True, doc="correct the caching error of reused residuals per channel (DEC)")
    correct_quant: bool = option(True, doc="correct the quantization error of cached residuals per channel (DEC; "
                                           "only with a quant section)")
    compute_steps: dict | None = option(None, doc="calibrated computed steps per branch {branch: [steps]}")
    cache_scale: dict | None = option(None, doc="calibrated per-channel scale s^c_t per branch and step (1 on "
                                                "computed steps)")
    cache_shift: dict | None = option(None, doc="calibrated per-channel shift b^c_t per branch and step (0 on "
                                                "computed steps)")
    quant_scale: dict | None = option(None, doc="calibrated per-channel scale s^q_a of the residual cached at step "
                                                "a, per branch and step (null: calibrated without quantization)")
    quant_shift: dict | None = option(None, doc="calibrated per-channel shift b^q_a, per branch and step")
    quant_mode: str | None = option(None, doc="the quant.linear mode the calibration ran with (null: full "
                                              "precision); the policy's quant section must match it")
    step_error: dict | None = option(None, doc="calibrated combined error E[t, a(t)] of each step under the "
                                               "schedule, per branch (what DPS minimised; for inspection)")

    def validate(self) -> None:
        if self.compute_steps is not None:
            _steps(self.compute_steps, "cache.compute_steps")
        for name in _TABLES:
            if getattr(self, name) is not None:
                _table(getattr(self, name), f"cache.{name}")
        if (self.quant_scale is None) != (self.quant_shift is None):
            raise PolicyError("cache.quant_scale and cache.quant_shift are calibrated together: give both or neither")
        if self.step_error is not None:
            if not isinstance(self.step_error, dict):
                raise PolicyError("cache.step_error: expected a mapping {branch: [errors]}")
            for branch, values in self.step_error.items():
                finite_numbers(f"cache.step_error[{branch!r}]", values)
        tables = {n: getattr(self, n) for n in _TABLES if getattr(self, n) is not None}
        if self.compute_steps is not None:
            for name, table in tables.items():
                if set(table) != set(self.compute_steps):
                    raise PolicyError(f"cache.{name} has branches {sorted(table)}, cache.compute_steps has "
                                      f"{sorted(self.compute_steps)}; calibrate again")
                for branch, rows in table.items():
                    if max(self.compute_steps[branch]) >= len(rows):
                        raise PolicyError(f"cache.compute_steps[{branch!r}]: step {max(self.compute_steps[branch])} "
                                          f"is out of range; cache.{name}[{branch!r}] has {len(rows)} steps")
        super().validate()

    def check_sections(self, quant: Any) -> None:
        """The calibration's quantization must be the one served: a policy's quant section against ``quant_mode``."""
        if self.compute_steps is None:
            return
        served = None if quant is None else quant.linear
        if served != self.quant_mode:
            calibrated = "full precision (no quant section)" if self.quant_mode is None else \
                f"quant.linear={self.quant_mode}"
            serving = "no quant section" if served is None else f"quant.linear={served}"
            raise PolicyError(f"cache: cachequant was calibrated with {calibrated}, but the policy has {serving}; its "
                              "schedule and corrections belong to that quantization: calibrate with the quant section "
                              "you serve")


# ---------------------------------------------------------------------------------------------------
# Fits, errors and the dynamic programme (pure functions)
# ---------------------------------------------------------------------------------------------------


def channel_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel least squares y ≈ s ⊙ x + b over the rows of (N, C) tensors: (s, b), each (C,) float64.
    A channel without variance in x keeps s = 1 (b absorbs the mean difference)."""
    x, y = x.double(), y.double()
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    var = (xc * xc).mean(0)
    cov = (xc * (y - ym)).mean(0)
    scale = torch.where(var > 1e-24, cov / var.clamp_min(1e-300), torch.ones_like(var))
    return scale, ym - scale * xm


def relative_l1(target: torch.Tensor, estimate: torch.Tensor) -> float:
    """‖target − estimate‖₁ / ‖target‖₁."""
    return float((target.double() - estimate.double()).abs().sum() / target.double().abs().sum().clamp_min(1e-30))


def group_bounds(steps: int, interval: int) -> tuple[int, int, int]:
    """(groups K, shortest, longest group) for ``steps`` steps at interval N: K = ⌈T/N⌉, lengths ⌈N/2⌉..2N
    (the shortest capped at ⌊T/K⌋ so that a split exists)."""
    groups = max(1, math.ceil(steps / interval))
    return groups, min(math.ceil(interval / 2), steps // groups), max(2 * interval, math.ceil(steps / groups))


def segment_cost(error: np.ndarray, start: int, end: int) -> float:
    """Σ_{start ≤ t < end} error[t, start]: a group computed at ``start`` and reused until ``end``."""
    return float(np.nan_to_num(error[start:end, start], nan=0.0).sum())


def dps(error: np.ndarray, groups: int, shortest: int, longest: int) -> list[int]:
    """The computed steps (the first of each group) of the split of ``error.shape[0]`` steps into ``groups``
    consecutive groups of ``shortest``..``longest`` steps with the least Σ :func:`segment_cost` (exact DP)."""
    steps = error.shape[0]
    if not (groups * shortest <= steps <= groups * longest and 1 <= shortest <= longest):
        raise PolicyError(f"cache.interval: {steps} steps cannot be split into {groups} groups of "
                          f"{shortest}..{longest} steps")
    best = np.full((groups + 1, steps + 1), np.inf)
    back = np.zeros((groups + 1, steps + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for j in range(1, groups + 1):
        for end in range(j * shortest, min(j * longest, steps) + 1):
            for start in range(max(0, end - longest), end - shortest + 1):
                if not np.isfinite(best[j - 1, start]):
                    continue
                total = best[j - 1, start] + segment_cost(error, start, end)
                if total < best[j, end]:
                    best[j, end], back[j, end] = total, start
    if not np.isfinite(best[groups, steps]):
        raise PolicyError(f"cache.interval: no split of {steps} steps into {groups} groups of {shortest}..{longest}")
    starts, end = [], steps
    for j in range(groups, 0, -1):
        end = int(back[j, end])
        starts.append(end)
    return sorted(starts)


def schedule_cost(error: np.ndarray, computed: list[int]) -> float:
    """Σ over groups of :func:`segment_cost` for the groups that start at ``computed`` (step 0 included)."""
    bounds = [*sorted(computed), error.shape[0]]
    return sum(segment_cost(error, a, b) for a, b in zip(bounds, bounds[1:]))


def _per_step(records: Records) -> dict[str, list[torch.Tensor]]:
    """{branch: [rows of step t over every generation, (N, C)]} from the records' ``stack_rows``."""
    table: dict[str, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for row in records:
        table[row["branch"]][row["step"]].append(row["stack_rows"])
    out = {}
    for branch, steps in table.items():
        count = max(steps) + 1
        missing = [t for t in range(count) if t not in steps]
        if missing:
            raise PolicyError(f"cachequant: no residual recorded at steps {missing} of branch {branch!r}; calibrate "
                              "again")
        out[branch] = [torch.cat(steps[t]) for t in range(count)]
    return out


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CacheQuantState(CacheState):
    """Args:
        source: the calibrated step whose residual is cached (None: none yet, or not on the calibrated schedule).
        corrections: per reused step, the composed (scale, shift) on this branch's device and dtype.
    """

    source: int | None = None
    corrections: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@register_cache_method("cachequant", CacheQuantConfig)
class CacheQuant(CacheMethod):
    State = CacheQuantState
    record_options = {"stack_rows": FIT_ROWS}
    reference_pass = True  # calibration records on the full-precision and on the quantized model
    exact = {"interval": 1}
    reusing = {"interval": 2}

    def __init__(self, config: CacheQuantConfig, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        require_calibrated(config, "compute_steps")
        if config.correct_cache and config.cache_scale is None:
            raise PolicyError("cache.cache_scale is required with correct_cache: true: run dit_accel.calibrate (or set "
                              "correct_cache: false)")
        self.compute = {b: frozenset(s) for b, s in config.compute_steps.items()}
        self.steps = {b: (len(config.cache_scale[b]) if config.cache_scale is not None else max(s) + 1)
                      for b, s in config.compute_steps.items()}
        self.source_of = {b: [max(s for s in self.compute[b] if s <= t) for t in range(self.steps[b])]
                          for b in self.compute}  # the computed step each step's cached residual comes from
        self.composed = {b: self._compose(b) for b in self.compute}
        self._steps = StepMapping("dit_accel: CacheQuant calibrated for %d steps, used for %d: steps are mapped by "
                                  "relative position and reused residuals are not corrected (recalibrate)")

    def _compose(self, branch: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per reused step t: (scale, shift) of R̂_t = s^c_t ⊙ (s^q_a ⊙ R + b^q_a) + b^c_t (float32, CPU)."""
        c = self.config
        out = {}
        for t, last in enumerate(self.source_of[branch]):
            if t in self.compute[branch]:
                continue
            scale, shift = None, None
            if c.correct_quant and c.quant_scale is not None:
                scale = torch.tensor(c.quant_scale[branch][last], dtype=torch.float64)
                shift = torch.tensor(c.quant_shift[branch][last], dtype=torch.float64)
            if c.correct_cache:
                cs = torch.tensor(c.cache_scale[branch][t], dtype=torch.float64)
                cb = torch.tensor(c.cache_shift[branch][t], dtype=torch.float64)
                scale, shift = (cs, cb) if scale is None else (cs * scale, cs * shift + cb)
            if scale is not None:
                out[t] = (scale.float(), shift.float())
        return out

    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=((0, num_blocks),))

    def compute_steps(self, branch: str) -> list[int]:
        return sorted(self.compute[branch])

    def _position(self, state: CacheState) -> tuple[int, bool]:
        """The calibrated step at this call's position, and whether the step counts match (corrections apply)."""
        return self._steps(state, branch_table(self.steps, state, "compute_steps"))

    def should_reuse(self, range_id: int, state: CacheState) -> bool:
        if state.step == 0 or range_id not in state.residuals:
            return False
        t, _ = self._position(state)
        return t not in branch_table(self.compute, state, "compute_steps")

    def on_range_computed(self, range_id: int, residual: Residual, state: CacheQuantState) -> None:
        state.residuals[range_id] = residual
        t, exact = self._position(state)
        state.source = t if exact else None

    def reused_output(self, range_id, hidden, encoder, state: CacheQuantState):
        res = state.residuals[range_id]
        t, exact = self._position(state)
        branch = state.branch
        correction = None
        if exact and state.source is not None:
            if self.source_of[branch][t] == state.source:
                correction = self._correction(t, res.hidden, state)
        out = hidden + (res.hidden if correction is None else res.hidden * correction[0] + correction[1])
        if res.encoder_is_none:
            return out, None
        return out, (encoder + res.encoder if res.encoder is not None else encoder)

    def _correction(self, t: int, like: torch.Tensor, state: CacheQuantState):
        if t in state.corrections:
            return state.corrections[t]
        composed = self.composed[state.branch].get(t)
        if composed is None:
            return None
        scale, shift = composed
        if scale.shape[0] != like.shape[-1]:
            raise PolicyError(f"cache: cachequant's corrections have {scale.shape[0]} channels, the block stack's "
                              f"residual has {like.shape[-1]} (calibrate on this model)")
        state.corrections[t] = (scale.to(like.device, like.dtype), shift.to(like.device, like.dtype))
        return state.corrections[t]

    @staticmethod
    def calibrated(config: CacheQuantConfig, records: Records, family: str) -> CacheQuantConfig:
        """DPS on the combined error table, then the per-channel corrections of the chosen schedule."""
        records.require("stack_rows", "cachequant", f"record with RecordConfig(stack_rows={FIT_ROWS})")
        quantized = records.quantized
        served = _per_step(records)
        full = _per_step(records.reference) if records.reference is not None else served
        if set(full) != set(served):
            raise PolicyError(f"cachequant: the full-precision pass saw branches {sorted(full)}, the quantized pass "
                              f"{sorted(served)}")
        tables: dict[str, dict] = {n: {} for n in (*_TABLES, "compute_steps", "step_error")}
        for branch in sorted(served):
            fp, q = full[branch], served[branch]
            if len(fp) != len(q) or any(a.shape != b.shape for a, b in zip(fp, q)):
                raise PolicyError(f"cachequant: the two calibration passes recorded different steps or shapes on "
                                  f"branch {branch!r}")
            steps = len(fp)
            quant_fit = [channel_fit(q[a], fp[a]) if quantized is not None else None for a in range(steps)]
            cached = [q[a] if fit is None or not config.correct_quant else q[a].double() * fit[0] + fit[1]
                      for a, fit in enumerate(quant_fit)]
            error = np.full((steps, steps), np.nan)
            for t in range(steps):
                error[t, t] = relative_l1(fp[t], q[t]) if quantized is not None else 0.0
                for a in range(t):
                    estimate = cached[a]
                    if config.correct_cache:
                        scale, shift = channel_fit(fp[a], fp[t])
                        estimate = estimate.double() * scale + shift
                    error[t, a] = relative_l1(fp[t], estimate)
            computed = dps(error, *group_bounds(steps, config.interval))
            width = fp[0].shape[-1]
            ones, zeros = [1.0] * width, [0.0] * width
            cache_scale, cache_shift, quant_scale, quant_shift, step_error = [], [], [], [], []
            last = 0
            for t in range(steps):
                if t in computed:
                    last = t
                    cache_scale.append(ones)
                    cache_shift.append(zeros)
                else:
                    scale, shift = channel_fit(fp[last], fp[t])
                    cache_scale.append([float(v) for v in scale])
                    cache_shift.append([float(v) for v in shift])
                fit = quant_fit[t]
                quant_scale.append(ones if fit is None or t not in computed else [float(v) for v in fit[0]])
                quant_shift.append(zeros if fit is None or t not in computed else [float(v) for v in fit[1]])
                step_error.append(round(float(error[t, last]), 6))
            tables["compute_steps"][branch] = computed
            tables["cache_scale"][branch], tables["cache_shift"][branch] = cache_scale, cache_shift
            tables["quant_scale"][branch], tables["quant_shift"][branch] = quant_scale, quant_shift
            tables["step_error"][branch] = step_error
        if quantized is None:
            tables["quant_scale"] = tables["quant_shift"] = None
        return replace_config(config, quant_mode=quantized, **tables)
