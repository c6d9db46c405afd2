"""What a calibration was made for, and the checks that keep it from being applied to something else.

``dit_accel.calibrate`` stores, beside the calibrated fields, the transformer class, its number of
blocks, the CFG branches it saw, the transformer calls per branch and the scheduler class. A policy
carrying that record (``calibrated_for:`` in YAML) is checked when it is attached and at every call:

* another transformer class or block count: a :class:`~dit_accel.config.PolicyError` at ``accelerate``
  (a curve or schedule of a 4-block model means nothing for a 10-block one);
* a CFG branch the calibration never saw (a curve recorded on batched CFG, served on Wan's separate
  ``cond`` / ``uncond`` calls): a PolicyError at the first call of that branch;
* another number of calls per branch or another scheduler class: a warning, once (step-indexed
  tables are read at the same relative position of the schedule, which is an approximation).

Delete the ``calibrated_for`` section of a policy file to apply it regardless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from .config import ConfigBase, PolicyError, option

logger = logging.getLogger(__name__)  # under the "dit_accel" logger (dit_accel.logging)


@dataclass(frozen=True)
class CalibratedFor(ConfigBase):
    section: ClassVar[str] = "calibrated_for"
    model: str = option("", doc="transformer class the calibration ran on")
    blocks: int = option(1, ge=1, doc="its number of blocks")
    branches: tuple[str, ...] = option((), doc="CFG branches seen (default: batched or no CFG; cond/uncond: "
                                               "separate calls)")
    calls: int | None = option(None, ge=1, doc="transformer calls per branch of one calibration generation")
    scheduler: str | None = option(None, doc="scheduler class of the calibration pipeline")

    def validate(self) -> None:
        if isinstance(self.branches, str) or not isinstance(self.branches, (list, tuple)) or not all(
                isinstance(b, str) and b for b in self.branches):
            raise PolicyError(f"calibrated_for.branches: expected a list of branch names, got {self.branches!r}")
        object.__setattr__(self, "branches", tuple(self.branches))
        if not isinstance(self.model, str) or not self.model:
            raise PolicyError(f"calibrated_for.model: expected a transformer class name, got {self.model!r}")
        super().validate()

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "branches": list(self.branches)}

    def check_model(self, transformer: Any, num_blocks: int) -> None:
        """Refuse a transformer of another class or depth than the calibration's."""
        model = type(transformer).__name__
        if model != self.model or num_blocks != self.blocks:
            raise PolicyError(
                f"this policy was calibrated on a {self.model} with {self.blocks} blocks; the transformer is a {model} "
                f"with {num_blocks} blocks. Calibrate it for this model (dit_accel.calibrate), or delete the policy's "
                "calibrated_for section to apply it anyway")

    def check_branch(self, branch: str) -> None:
        """Refuse a CFG branch the calibration never saw."""
        if self.branches and branch not in self.branches:
            raise PolicyError(
                f"this policy was calibrated on CFG branch(es) {list(self.branches)}; this call runs branch {branch!r} "
                "(a different CFG layout: batched vs separate cond/uncond calls, or guidance switched on/off). "
                "Calibrate with the call arguments you serve")

    def warnings(self, calls: int | None, scheduler: str | None) -> list[str]:
        """What differs from the calibration without making it meaningless (said once by the runtime)."""
        out = []
        if calls is not None and self.calls is not None and calls != self.calls:
            out.append(f"dit_accel: this policy was calibrated for {self.calls} transformer calls per branch, this "
                       f"generation makes {calls}: calibrated tables are read at the same relative position "
                       "(recalibrate at the step count you serve for exact schedules)")
        if scheduler is not None and self.scheduler is not None and scheduler != self.scheduler:
            out.append(f"dit_accel: this policy was calibrated with {self.scheduler}, the pipeline uses {scheduler}: "
                       "step-indexed tables may not fit (recalibrate with the scheduler you serve)")
        return out
