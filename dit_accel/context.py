"""What a feature may know about the transformer call in progress: a read-only step context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepContext:
    """One transformer call, as the runtime sees it.

    Args:
        branch: the CFG branch: ``"cond"`` / ``"uncond"`` for separate CFG calls (diffusers'
            ``cache_context``), ``"default"`` where pipelines batch CFG or run one branch.
        shape: the shape of the call's ``hidden_states`` (state is kept apart per shape).
        step: this branch's transformer calls so far in the generation (0 on its first call).
        num_steps: the calls this branch plans in the generation (:mod:`dit_accel.runtime.generation`);
            None in custom loops without ``dit_accel.reset(model, num_inference_steps=N)``.
        schedule_offset: where those calls start in the full schedule (img2img's begin index, the
            second expert of a two-transformer pipeline); tables calibrated over a full schedule are
            read at :meth:`schedule_position`.
        clone_inputs: block inputs must be copied before they are kept (a block modified its input in
            place earlier in this runtime's life).
        clone_unverifiable: inputs without a version counter (``torch.inference_mode``) must be copied,
            because the adapter does not know the blocks to be in-place safe.
        shards: the context-parallel group when diffusers shards the sequence across ranks
            (:class:`dit_accel.runtime.parallel.ShardGroup`; its ``sum`` reduces a gate's statistics so
            that every rank decides alike), None on one process.
    """

    branch: str
    shape: tuple[int, ...] | None
    step: int = 0
    num_steps: int | None = None
    schedule_offset: int = 0
    clone_inputs: bool = False
    clone_unverifiable: bool = False
    shards: Any = None

    @property
    def key(self) -> tuple:
        """(branch, shape): what state is kept apart by."""
        return self.branch, self.shape

    @property
    def batch(self) -> int | None:
        return self.shape[0] if self.shape else None

    def schedule_position(self) -> tuple[int, int | None]:
        """(index of this call in the full schedule, the full schedule's length or None)."""
        length = None if self.num_steps is None else self.schedule_offset + self.num_steps
        return self.schedule_offset + self.step, length
