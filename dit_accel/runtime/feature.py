"""The one protocol every capability (caching, guidance, sparse attention, quantization, compilation) plugs in by.

The runtime core (:mod:`dit_accel.runtime.core`) owns the transformer's lifecycle — generations,
CFG branches, per-(branch, shape) state, the block gates — and calls its features, in order, at:

* ``attach`` / ``detach``: put on / take off what the feature needs on the modules (all or nothing);
* ``new_generation`` / ``release``: a new generation starts / a pipeline call ended (free tensors,
  keep statistics);
* ``prepare(call)``: before the call's state exists; may replace the call's arguments (a batched CFG
  call cut to its conditional rows) or pass the whole call through (a dropped unconditional call);
* ``new_state(ctx)``: the feature's typed state for a new (generation, branch, shape);
* ``before_call(call)`` / ``after_call(call, output)``: around the transformer call (``after_call`` in
  reverse order; it may return a replaced output);
* ``stats()``: the fields of :class:`~dit_accel.stats.Stats` it fills.

Features see the call's read-only :class:`~dit_accel.runtime.context.StepContext` and their own
state, not the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..context import StepContext

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..adapters.base import BlockInfo, ModelAdapter


COMPUTE = object()  # what ``Feature.enter_block`` returns when the block must run


@dataclass(frozen=True)
class Host:
    """What a feature is attached to: the transformer, its adapter and blocks, its pipeline component name."""

    transformer: "torch.nn.Module"
    adapter: "ModelAdapter"
    blocks: list["BlockInfo"]
    component: str = "transformer"


@dataclass(eq=False)
class Call:
    """The transformer call in progress.

    Args:
        branch: its CFG branch.
        args, kwargs: its arguments (``replaced`` once a feature changed them).
        pipeline: the pipeline whose ``__call__`` runs it, or None (custom loop).
        passthrough: every block returns its input (the call's output is replaced afterwards).
        ctx: its step context (None for a passthrough call).
        slots: each feature's state for this call's (branch, shape), by feature name.
        block: the index of the gated block entered last (set before any compiled code of the block runs;
            features that need it name the blocks in ``watched_blocks``).
        computed: the gated blocks that computed on this call, in order.
    """

    branch: str
    args: tuple
    kwargs: dict
    pipeline: Any | None = None
    passthrough: bool = False
    replaced: bool = False
    ctx: StepContext | None = None
    slots: dict[str, Any] = field(default_factory=dict)
    block: int | None = None
    computed: list[int] = field(default_factory=list)
    _rekey: Callable[[tuple | None, Callable[[Any], Any]], None] | None = field(default=None, repr=False)
    _flag_inplace: Callable[[], None] | None = field(default=None, repr=False)

    def replace_arguments(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs, self.replaced = args, kwargs, True

    def move_state(self, shape: tuple | None, transform: Callable[[Any], Any]) -> None:
        """Keep this branch's state for calls of ``shape`` from now on, each feature's state passed through
        ``transform`` (a batched CFG branch that continues on its conditional rows only)."""
        self._rekey(shape, transform)

    def inputs_modified_in_place(self) -> None:
        """A block wrote into a kept input: the runtime copies block inputs from now on."""
        self._flag_inplace()


class Feature:
    """Base of the runtime's features: every hook point is a no-op until overridden."""

    name: ClassVar[str] = ""
    passes_through: ClassVar[bool] = False  # may turn a whole call into a passthrough of every block

    def attach(self, host: Host) -> None:
        """Register what the feature needs on the modules (undo everything on an error)."""

    def detach(self) -> None:
        """Remove everything ``attach`` registered."""

    def gated_blocks(self) -> set[int]:
        """Blocks whose calls the feature decides (the runtime gates them before any compiled code)."""
        return set()

    def watched_blocks(self) -> set[int]:
        """Blocks whose entry the feature needs to know (``Call.block``) without deciding them."""
        return set()

    def enter_block(self, index: int, args: tuple, kwargs: dict, call: Call) -> Any:
        """Before gated block ``index`` runs on ``call``: its output (the block is skipped), or :data:`COMPUTE`."""
        return COMPUTE

    def exit_block(self, index: int, output: Any, call: Call) -> Any:
        """After gated block ``index`` computed ``output``: what the block returns (default: ``output``)."""
        return output

    def new_generation(self) -> None:
        """A new generation starts: forget per-generation counters."""

    def release(self) -> None:
        """A pipeline call ended: free cached tensors, keep the statistics."""

    def new_state(self, ctx: StepContext) -> Any:
        """This feature's state for a new (generation, branch, shape), or None."""
        return None

    def prepare(self, call: Call) -> None:
        """Before the call's state exists (see the module docstring)."""

    def before_call(self, call: Call) -> None:
        """The call's context and state are set."""

    def after_call(self, call: Call, output: Any) -> Any | None:
        """The call returned ``output``; return a replacement or None."""
        return None

    def stats(self) -> dict[str, Any]:
        """Fields of :class:`~dit_accel.stats.Stats` this feature fills for the last generation."""
        return {}
