"""The ``guardrails:`` policy section: when a calibrated or tuned cache policy falls back to computing.

A policy's reuse decisions were validated on the calls it was calibrated or tuned on. The guardrails
record what those calls looked like and, when attached, make the cache compute instead of reuse where
a call looks different (counted in ``dit_accel.stats(pipe).extra["guardrails"]``):

* **mismatch** — the transformer class, its block count, the calls per CFG branch (steps), the sample
  shape of the hidden states (resolution, frames) or the scheduler class differ from the recorded ones:
  every call of that branch computes (a warning says which, once);
* **out of range** — the gate statistic leaves the range recorded at that step (widened by
  ``margin``): that call computes;
* **non-finite** — a call that reused cached work returned NaN / inf: the call is run again with
  every block computed.

The gate statistic is one that every method can be checked against: the relative L1 change of the
first block's input hidden states since the previous call of the same branch (the quantity TeaCache's
gate rescales; for schedule-driven methods — FORA, TaylorSeer, MagCache, ERTACache — it is the
trajectory their fixed or calibrated schedule assumes). Method-internal statistics are not read.

``dit_accel.calibration.record_guardrails`` fills ``input_change`` and the recorded fields by running
the policy on calibration prompts; ``dit_accel.tune`` does it for every policy it returns. An empty
section (``guardrails: {}``) checks only the fields that are set and records nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .config import ConfigBase, PolicyError, document_options, is_number, option


@document_options
@dataclass(frozen=True)
class GuardrailConfig(ConfigBase):
    """Fall back to computing when a call differs from the calls the policy was calibrated or tuned on."""

    section: ClassVar[str] = "guardrails"
    enabled: bool = option(True, doc="apply the guardrails (false: keep the record, check nothing)")
    margin: float = option(0.5, ge=0.0, le=1000.0,
                           doc="tolerance of the range check: a live statistic s at step t is in range when "
                               "lo[t] / (1 + margin) <= s <= hi[t] * (1 + margin)")
    input_change: dict | None = option(
        None, doc="recorded range of the gate statistic per CFG branch and step {branch: {lo: [...], hi: [...]}} "
                  "(null: no range check)")
    recompute_nonfinite: bool = option(True, doc="run a call again with every block computed when it reused "
                                                 "cached work and returned NaN / inf")
    model: str | None = option(None, doc="transformer class recorded (null: not checked)")
    blocks: int | None = option(None, ge=1, doc="its number of blocks (null: not checked)")
    calls: int | None = option(None, ge=1, doc="transformer calls per CFG branch of one generation (null: not "
                                              "checked)")
    sample_shape: tuple[int, ...] | None = option(None, doc="shape of the hidden states without the batch dimension "
                                                           "(resolution, frames; null: not checked)")
    scheduler: str | None = option(None, doc="scheduler class recorded (null: not checked)")

    def validate(self) -> None:
        if self.sample_shape is not None:
            shape = self.sample_shape
            if isinstance(shape, (str, bytes)) or not isinstance(shape, (list, tuple)) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
                raise PolicyError(f"guardrails.sample_shape: expected a list of positive integers, got {shape!r}")
            object.__setattr__(self, "sample_shape", tuple(shape))
        if self.input_change is not None:
            object.__setattr__(self, "input_change", _ranges(self.input_change))
        super().validate()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["sample_shape"] = None if self.sample_shape is None else list(self.sample_shape)
        if self.input_change is not None:
            d["input_change"] = {b: {"lo": list(r["lo"]), "hi": list(r["hi"])} for b, r in self.input_change.items()}
        return d

    def bounds(self, branch: str, step: int) -> tuple[float, float] | None:
        """The allowed range of the statistic at ``step`` of ``branch`` (margin applied), or None when nothing was
        recorded there (no check)."""
        if self.input_change is None or branch not in self.input_change:
            return None
        table = self.input_change[branch]
        if step >= len(table["lo"]):
            return None
        lo, hi = table["lo"][step], table["hi"][step]
        if not (math.isfinite(lo) and math.isfinite(hi)):  # no statistic there (step 0: no previous call)
            return None
        return lo / (1.0 + self.margin), hi * (1.0 + self.margin)


def _number(value: float) -> float:
    """``value`` as a float, every nan as the one object ``math.nan``: containers compare items by identity before
    equality, so two configs with "no statistic" at the same steps compare equal (a saved and loaded policy equals
    the original)."""
    return math.nan if math.isnan(value) else float(value)


def _ranges(value: Any) -> dict:
    """``{branch: {"lo": [...], "hi": [...]}}`` checked: equal lengths, lo <= hi; ``nan`` marks a step without a
    statistic (YAML ``.nan``)."""
    where = "guardrails.input_change"
    if not isinstance(value, dict) or not value:
        raise PolicyError(f"{where}: expected a mapping {{branch: {{lo: [...], hi: [...]}}}}, got {value!r:.80}")
    out = {}
    for branch, table in value.items():
        if not isinstance(branch, str) or not isinstance(table, dict) or set(table) != {"lo", "hi"}:
            raise PolicyError(f"{where}[{branch!r}]: expected a mapping with exactly 'lo' and 'hi' lists")
        lo, hi = table["lo"], table["hi"]
        for name, seq in (("lo", lo), ("hi", hi)):
            if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)) or not seq or not all(
                    is_number(v) and not math.isinf(v) for v in seq):
                raise PolicyError(f"{where}[{branch!r}].{name}: expected a non-empty list of numbers (nan: no "
                                  "statistic at that step)")
        if len(lo) != len(hi):
            raise PolicyError(f"{where}[{branch!r}]: 'lo' has {len(lo)} steps, 'hi' {len(hi)}")
        for t, (a, b) in enumerate(zip(lo, hi)):
            if math.isnan(a) != math.isnan(b) or (not math.isnan(a) and a > b):
                raise PolicyError(f"{where}[{branch!r}]: step {t} has lo {a} > hi {b} (or only one of them nan)")
        out[branch] = {"lo": tuple(_number(v) for v in lo), "hi": tuple(_number(v) for v in hi)}
    return out
