"""The interface every caching algorithm implements, and the per-branch state it works on.

A caching method never sees a model class: the runtime (``dit_accel.hooks``) hands it the
flat list of transformer blocks as indices, the hidden/encoder-hidden states at the block
inputs and outputs it asked to watch, and asks it, at the start of each cacheable block
range, whether to reuse the range's cached residual for this step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..adapters.base import BlockInfo, ModelAdapter, call_argument
from ..config import ConfigBase, PolicyError


@dataclass(frozen=True)
class CachePlan:
    """Which block ranges are cacheable and which block inputs/outputs the method watches.

    ``ranges`` are half-open ``(start, end)`` index pairs into the flat block list; when a range
    is reused every block in it is skipped and its cached residual (output − input) is added to
    the range's input at the last block.
    """

    ranges: tuple[tuple[int, int], ...]
    watch_inputs: frozenset[int] = frozenset()
    watch_outputs: frozenset[int] = frozenset()


@dataclass
class BlockCall:
    """One call of a watched block: the block, its arguments, and its hidden/encoder inputs."""

    block: BlockInfo
    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        meta = self.block.meta
        return call_argument(meta, meta.hidden_states_argument_name, self.args, self.kwargs)

    @property
    def encoder(self) -> torch.Tensor | None:
        meta = self.block.meta
        if meta.return_encoder_hidden_states_index is None:
            return None
        return call_argument(meta, meta.encoder_hidden_states_argument_name, self.args, self.kwargs)


class RangeLinks:
    """What the transformer adds to the streams *between* the blocks of one range, on a computed step.

    diffusers' Flux and SD3 add ControlNet residuals inside their block loop
    (``hidden_states = hidden_states + controlnet_block_samples[i]``); other models may add their own
    per-step inputs there. A range's cached residual must not contain them: on a reused step the
    skipped blocks pass their input through, the loop adds *this* step's additions again, and the
    range's last block adds the cached residual. So the residual cached for a range is the sum of its
    blocks' own residuals: (output − input of the range) − (what was added between its blocks).

    Detection costs nothing without such additions: a block's input is the very tensor object the
    previous block returned. Otherwise the difference is accumulated. A change between blocks that is
    not an addition (another shape, or the previous output modified in place) marks the range broken:
    its residual is not cached that step.
    """

    __slots__ = ("last", "versions", "hidden", "encoder", "broken")

    def __init__(self) -> None:
        self.last: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        self.versions: tuple[int | None, int | None] = (None, None)
        self.hidden: torch.Tensor | None = None
        self.encoder: torch.Tensor | None = None
        self.broken = False

    @staticmethod
    def _version(t: torch.Tensor | None) -> int | None:
        return None if t is None or t.is_inference() else t._version

    def block_returned(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        self.last = (hidden, encoder)
        self.versions = (self._version(hidden), self._version(encoder))

    def block_called(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        if self.last is None or self.broken:
            return
        (last_h, last_e), (ver_h, ver_e) = self.last, self.versions
        self.hidden = self._add(self.hidden, hidden, last_h, ver_h)
        if encoder is not None and last_e is not None:
            self.encoder = self._add(self.encoder, encoder, last_e, ver_e)
        self.last = None

    def _add(self, total: torch.Tensor | None, now: torch.Tensor, before: torch.Tensor, version: int | None):
        if now is before and (version is None or before._version == version):
            return total
        if now.shape != before.shape or (version is not None and before._version != version):
            self.broken = True
            return total
        gap = now - before
        return gap if total is None else total + gap


@dataclass
class BranchState:
    """Everything cached for one (generation, CFG branch, input shape): reset at every new call.

    ``step`` counts this branch's transformer calls in the generation; ``num_steps`` is the number
    of calls it plans (:func:`dit_accel.generation.planned_calls`: second-order samplers evaluate
    twice per step, img2img starts part-way; None in custom loops without ``dit_accel.reset``).
    ``schedule_offset`` is where these calls start in the full schedule (img2img's begin index),
    so tables calibrated over a full schedule are read at :meth:`schedule_position`.
    """

    key: tuple
    step: int = 0
    num_steps: int | None = None
    schedule_offset: int = 0
    clone_inputs: bool = False
    clone_unverifiable: bool = False
    residuals: dict[int, tuple] = field(default_factory=dict)
    reuse: dict[int, bool] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    links: dict[int, "RangeLinks"] = field(default_factory=dict)  # within one call: see RangeLinks

    def schedule_position(self) -> tuple[int, int | None]:
        """(index of this call in the full schedule, the full schedule's length or None)."""
        length = None if self.num_steps is None else self.schedule_offset + self.num_steps
        return self.schedule_offset + self.step, length

    def cache_bytes(self) -> int:
        total = 0
        for tensors in list(self.residuals.values()) + list(self.method.values()):
            for t in tensors if isinstance(tensors, (tuple, list)) else (tensors,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


_HOOK_POINTS = ("should_reuse", "on_input", "on_output", "on_range_computed", "reused_output")


class CacheMethod(ABC):
    """A caching algorithm bound to one transformer with ``num_blocks`` blocks.

    The hook points run outside ``torch.compile`` (per-step Python decisions would otherwise
    become guards and recompile every step); the blocks' own forwards stay compiled.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[ConfigBase]]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for point in _HOOK_POINTS:
            if point in cls.__dict__:
                setattr(cls, point, torch.compiler.disable(cls.__dict__[point]))

    def __init__(self, config: ConfigBase, blocks: list[BlockInfo], adapter: ModelAdapter) -> None:
        self.config = config
        self.blocks = blocks
        self.adapter = adapter
        self.num_blocks = num_blocks = len(blocks)
        self.plan = self.make_plan(num_blocks)
        for start, end in self.plan.ranges:
            if not 0 <= start < end <= num_blocks:
                raise PolicyError(f"cache: block range ({start}, {end}) is outside the model's {num_blocks} blocks")

    @abstractmethod
    def make_plan(self, num_blocks: int) -> CachePlan:
        """Return the cacheable ranges and watched points for a model with ``num_blocks`` blocks."""

    @abstractmethod
    def should_reuse(self, range_id: int, state: BranchState) -> bool:
        """Decide, at the start of range ``range_id``, whether to reuse its cached residual."""

    def on_input(self, call: BlockCall, state: BranchState) -> None:
        """Called before each block in ``plan.watch_inputs`` runs — at a range start, before ``should_reuse``."""

    def on_output(self, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None, state: BranchState) -> None:
        """Called with the outputs of each block in ``plan.watch_outputs`` (after it ran)."""

    def on_range_computed(self, range_id: int, residual: torch.Tensor, encoder_residual: torch.Tensor | None,
                          encoder_out_is_none: bool, state: BranchState) -> None:
        """A range was computed: its residual (output − input). Default: cache it for reuse."""
        state.residuals[range_id] = (residual, encoder_residual, encoder_out_is_none)

    def reused_output(self, range_id: int, hidden: torch.Tensor, encoder: torch.Tensor | None,
                      state: BranchState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The range's output when it is skipped, from its input. Default: input + cached residual."""
        res_h, res_e, enc_none = state.residuals[range_id]
        if enc_none:
            return hidden + res_h, None
        return hidden + res_h, (encoder + res_e if res_e is not None else encoder)

    def describe(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.config.to_dict().items())})"


def branch_table(table: dict, state: BranchState, field: str) -> Any:
    """The calibrated table of this call's CFG branch from ``{branch: table}``.

    A branch the calibration never saw is a PolicyError (a curve recorded on batched CFG says nothing
    about Wan's separate ``cond`` / ``uncond`` calls), not a silent fallback onto another branch's table."""
    branch = state.key[0]
    if branch in table:
        return table[branch]
    raise PolicyError(f"cache.{field} was calibrated for CFG branch(es) {sorted(table)}; this call runs branch "
                      f"{branch!r} (another CFG layout). Calibrate with the call arguments you serve")


def require_calibrated(config: ConfigBase, field: str, hint: str = "") -> None:
    """Raise a PolicyError naming ``cache.<field>`` if calibration has not filled it in yet."""
    if getattr(config, field) is None:
        raise PolicyError(f"cache.{field} is required: run dit_accel.calibrate(pipe, prompts, policy) first{hint}")


def per_block_ranges(num_blocks: int, fn_compute: int, bn_compute: int) -> tuple[tuple[int, int], ...]:
    """One cacheable range per block, leaving the first ``fn_compute`` and last ``bn_compute`` blocks out."""
    if fn_compute + bn_compute >= num_blocks:
        raise PolicyError(f"cache.fn_compute ({fn_compute}) + cache.bn_compute ({bn_compute}) must be less than the "
                          f"model's number of blocks ({num_blocks})")
    return tuple((i, i + 1) for i in range(fn_compute, num_blocks - bn_compute))


GRANULARITIES = ("stack", "block")


def cache_ranges(num_blocks: int, fn_compute: int, bn_compute: int, granularity: str) -> tuple[tuple[int, int], ...]:
    """The cacheable ranges of a schedule-driven method: one range over all cached blocks (``"stack"``:
    one residual, one add on a reused step) or one per block (``"block"``). When every cached block is
    reused together the two are the same computation up to rounding (the block residuals telescope),
    and the stack costs less per step."""
    ranges = per_block_ranges(num_blocks, fn_compute, bn_compute)
    if granularity == "block":
        return ranges
    return ((ranges[0][0], ranges[-1][1]),)


def batch_agrees(below: torch.Tensor, state: BranchState) -> bool:
    """True if every sample's gate says reuse (``below`` is a bool tensor, one per sample or pooled).

    The one host sync of a residual gate. A batch whose samples disagree is computed, and
    counted in ``state.method["mixed_batch"]`` (reported by ``dit_accel.stats``).
    """
    agree = int(below.sum())
    if 0 < agree < below.numel():
        state.method["mixed_batch"] = state.method.get("mixed_batch", 0) + 1
    return agree == below.numel()


for _point in _HOOK_POINTS[1:]:  # the base class's own defaults (should_reuse is abstract)
    setattr(CacheMethod, _point, torch.compiler.disable(getattr(CacheMethod, _point)))


@torch.compiler.disable
def keep(state: BranchState, name: str, tensor: torch.Tensor | None) -> None:
    """Remember ``tensor`` under ``name`` for a later residual, with its in-place version counter.

    Blocks that modify their input in place would otherwise turn ``output − input`` into zero;
    ``take`` notices through the version counter, and the runtime clones inputs from then on.
    Tensors made under ``torch.inference_mode`` have no version counter: they are cloned when
    the blocks are not known to be in-place safe (``clone_unverifiable``, the generic adapter).
    """
    if tensor is None:
        state.method[name] = None
        return
    if tensor.is_inference():
        state.method[name] = (tensor.clone() if state.clone_inputs or state.clone_unverifiable else tensor, None)
    else:
        kept = tensor.clone() if state.clone_inputs else tensor
        state.method[name] = (kept, kept._version)


@torch.compiler.disable
def take(state: BranchState, name: str) -> torch.Tensor | None:
    """Return what ``keep`` stored, or None (and flag the state) if a block modified it in place since."""
    kept = state.method.pop(name, None)
    if kept is None:
        return None
    tensor, version = kept
    if version is not None and tensor._version != version:
        state.method["modified_inplace"] = True
        return None
    return tensor
