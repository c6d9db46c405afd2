"""Runtime guardrails of the cache feature: compute instead of reuse on calls unlike the calibration's.

What is checked and why: :mod:`dit_accel.guardrail_config`. The cache feature (:mod:`dit_accel.runtime.cache`)
owns one :class:`Guard` when the policy has an enabled ``guardrails:`` section and asks it at one place —
after the method decided to reuse a range — whether that reuse may stand; it also hands it the first
block's input of every call (the statistic) and, after a call that reused work, its output (non-finite
check). The guard never changes an output of a call it lets through, so with guardrails on, calls in
range give bit-identical outputs.

The statistic costs one L1 reduction of the first block's input per call and one host read (where the
range is checked or recorded).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..guardrail_config import GuardrailConfig
from ..outputs import output_sample
from .feature import Call, Host

logger = logging.getLogger("dit_accel")

REASONS = ("mismatch", "out_of_range", "nonfinite")


@dataclass
class _Branch:
    """What the guard knows about one (generation, CFG branch, shape)."""

    mismatch: str | None = None
    previous: torch.Tensor | None = None
    previous_version: int | None = None
    previous_l1: torch.Tensor | None = None


@dataclass
class GuardCounts:
    """Fallbacks of the last generation: calls that computed although the method would have reused."""

    mismatch: int = 0
    out_of_range: int = 0
    nonfinite: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        return self.mismatch + self.out_of_range + self.nonfinite

    def to_dict(self) -> dict[str, Any]:
        return {"fallbacks": self.fallbacks, "mismatch": self.mismatch, "out_of_range": self.out_of_range,
                "nonfinite": self.nonfinite, "reasons": list(self.reasons)}


def input_change(current: torch.Tensor, previous: torch.Tensor, previous_l1: torch.Tensor | None = None) -> float:
    """Relative L1 change ``Σ|current − previous| / Σ|previous|`` over the whole call (pooled over the batch)."""
    base = previous_l1 if previous_l1 is not None else previous.abs().sum(dtype=torch.float32)
    return float((current - previous).abs().sum(dtype=torch.float32) / base.clamp_min(torch.finfo(torch.float32).tiny))


class Guard:
    """One transformer's guardrails (see the module docstring). ``records`` keeps ``(branch, step, statistic)`` of
    every call of the current generation, for :func:`dit_accel.calibration.record_guardrails`."""

    def __init__(self, config: GuardrailConfig) -> None:
        self.config = config
        self.host: Host | None = None
        self.records: list[tuple[str, int, float]] = []  # this generation's (branch, step, statistic)
        self._warned: set[str] = set()
        self.new_generation()

    def attach(self, host: Host) -> None:
        self.host = host

    def new_generation(self) -> None:
        self.records = []
        self.sample_shapes: set[tuple[int, ...]] = set()  # per-sample hidden-state shapes of this generation
        self.counts = GuardCounts()
        self.branches: dict[tuple, _Branch] = {}
        self._reason: str | None = None

    def release(self) -> None:
        self.branches = {}

    # ---- per call ---------------------------------------------------------------------------------
    def before_call(self, call: Call) -> None:
        """The call's verdict starts empty; a (branch, shape) seen for the first time is checked against the
        recorded fields."""
        self._reason = None
        ctx = call.ctx
        if ctx is None:
            return
        if ctx.shape is not None:
            self.sample_shapes.add(tuple(ctx.shape[1:]))
        branch = self.branches.get(ctx.key)
        if branch is None:
            branch = self.branches[ctx.key] = _Branch(mismatch=self._mismatch(call))
            if branch.mismatch:
                self._warn(f"dit_accel: guardrails: {branch.mismatch}; branch {ctx.branch!r} computes every step")
        if branch.mismatch:
            self._reason = "mismatch"

    def _mismatch(self, call: Call) -> str | None:
        c, ctx, host = self.config, call.ctx, self.host
        model = type(host.transformer).__name__
        if c.model is not None and model != c.model:
            return f"the transformer is a {model}, the policy was recorded on a {c.model}"
        if c.blocks is not None and len(host.blocks) != c.blocks:
            return f"the transformer has {len(host.blocks)} blocks, the policy was recorded on {c.blocks}"
        if c.calls is not None and ctx.num_steps is not None and ctx.num_steps != c.calls:
            return f"this generation makes {ctx.num_steps} calls per branch, the policy was recorded at {c.calls}"
        shape = None if ctx.shape is None else tuple(ctx.shape[1:])
        if c.sample_shape is not None and shape is not None and shape != c.sample_shape:
            return f"the hidden states have shape {list(shape)} per sample, the policy was recorded at " \
                   f"{list(c.sample_shape)} (another resolution or frame count)"
        scheduler = getattr(call.pipeline, "scheduler", None)
        if c.scheduler is not None and scheduler is not None and type(scheduler).__name__ != c.scheduler:
            return f"the pipeline's scheduler is {type(scheduler).__name__}, the policy was recorded with {c.scheduler}"
        return None

    def observe_input(self, hidden: torch.Tensor, call: Call) -> None:
        """The first block's input of this call: the statistic against the previous call of the branch."""
        ctx = call.ctx
        branch = self.branches.get(ctx.key) if ctx is not None else None
        if branch is None or not isinstance(hidden, torch.Tensor):
            return
        previous = branch.previous
        value = math.nan
        intact = previous is not None and (branch.previous_version is None
                                           or previous._version == branch.previous_version)
        if intact and previous.shape == hidden.shape:
            value = input_change(hidden, previous, branch.previous_l1)
        # kept by reference (no copy of a large activation); a later in-place change is seen by its version
        # counter and only skips that statistic. Inference tensors have none: they are copied.
        kept = hidden.detach()
        branch.previous = kept.clone() if kept.is_inference() else kept
        branch.previous_version = None if kept.is_inference() else kept._version
        branch.previous_l1 = kept.abs().sum(dtype=torch.float32)
        self.records.append((ctx.branch, ctx.step, value))
        if self._reason is None and not math.isnan(value):
            bounds = self.config.bounds(ctx.branch, ctx.step)
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                self._reason = "out_of_range"

    def allow_reuse(self) -> bool:
        """The one question the cache feature asks after its method chose to reuse a range on this call."""
        return self._reason is None

    def count_fallback(self, call: Call) -> None:
        """``call`` computed (at least one range) because of the guard."""
        reason = self._reason
        if reason is None:
            return
        setattr(self.counts, reason, getattr(self.counts, reason) + 1)
        if reason == "mismatch":
            reason = self.branches[call.ctx.key].mismatch
        if reason not in self.counts.reasons:
            self.counts.reasons.append(reason)

    def needs_recompute(self, output: Any) -> bool:
        """Whether a call that reused work must run again: its output holds NaN / inf."""
        if not self.config.recompute_nonfinite:
            return False
        tensor = output_sample(output)
        return tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())

    def count_recompute(self) -> None:
        self.counts.nonfinite += 1
        if "nonfinite" not in self.counts.reasons:
            self.counts.reasons.append("nonfinite")
        self._warn("dit_accel: guardrails: a call that reused cached work returned NaN/inf; it was computed again")

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def stats(self) -> dict[str, Any]:
        return self.counts.to_dict()

