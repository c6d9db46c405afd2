"""Block gates: every call of a gated block is decided before any compiled code of that block runs.

A block module is called through ``nn.Module._wrapped_call_impl``, which runs
``module._compiled_call_impl`` when the block was compiled (``module.compile()``, diffusers'
``compile_repeated_blocks``) and ``module._call_impl`` (hooks, then ``forward``) otherwise.

* **Eager blocks** get a :class:`BlockGate`, a ``diffusers.hooks.ModelHook`` whose ``new_forward``
  decides and calls the block's own forward only when it computes.
* **Compiled blocks** get the gate *in front of* the compiled call: ``_compiled_call_impl`` becomes a
  :class:`CompiledEntry` (an instance attribute; the user's compiled callable is put back by
  ``detach``) that decides in eager Python and calls the compiled callable only for blocks that
  compute, with no dit_accel code inside the compiled frame. So a reused step enters no compiled
  region for its skipped blocks, and ``compile_repeated_blocks(fullgraph=True)`` traces a block with
  no graph break. Compiling before or after ``accelerate`` both end there: :meth:`Gates.follow` runs
  before every transformer call and routes a block that was compiled (or un-compiled) since.

Under a compiled *whole* transformer (``torch.compile(transformer)``) the gates run as
``torch.compiler.disable(recursive=False)`` functions: one graph break per gated block, the block's own
forward compiled as its own frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from diffusers.hooks import ModelHook

from ..adapters.base import BlockInfo, call_argument
from .feature import COMPUTE
from .hooks import BLOCK_HOOK, register, unregister
from .parallel import keep_inside_split, split_hook_names

if TYPE_CHECKING:  # pragma: no cover
    from .core import Runtime
    from .feature import Feature


def block_inputs(block: BlockInfo, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, encoder) inputs of a block call (encoder None for single-stream blocks)."""
    meta = block.meta
    hidden = call_argument(meta, meta.hidden_states_argument_name, args, kwargs)
    if meta.return_encoder_hidden_states_index is None:
        return hidden, None
    return hidden, call_argument(meta, meta.encoder_hidden_states_argument_name, args, kwargs)


def block_outputs(block: BlockInfo, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, encoder) of a block's return value."""
    if not isinstance(output, tuple):
        return output, None
    enc_i = block.meta.return_encoder_hidden_states_index
    return output[block.meta.return_hidden_states_index], (output[enc_i] if enc_i is not None else None)


def pack_outputs(block: BlockInfo, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    """(hidden, encoder) in the block's return layout."""
    meta = block.meta
    if meta.return_encoder_hidden_states_index is None:
        return hidden
    out = [None, None]
    out[meta.return_hidden_states_index] = hidden
    out[meta.return_encoder_hidden_states_index] = encoder
    return tuple(out)


class BlockGate(ModelHook):
    """Decides one block's calls: passthrough, the deciding feature's program, or the block as it is."""

    def __init__(self, runtime: "Runtime", block: BlockInfo, feature: "Feature | None") -> None:
        super().__init__()
        self.runtime = runtime
        self.block = block
        self.feature = feature
        self.entry: CompiledEntry | None = None
        self.seen: Any = None  # the block's compiled call when it was last routed

    @torch.compiler.disable
    def enter(self, args: tuple, kwargs: dict) -> Any:
        """The block's output if it is skipped on this call, else COMPUTE (eager: decisions never trace)."""
        call = self.runtime.call
        if call is None:
            return COMPUTE  # outside a transformer forward
        call.block = self.block.index
        if call.passthrough:  # a dropped call: every block returns its input
            return pack_outputs(self.block, *block_inputs(self.block, args, kwargs))
        decided = COMPUTE if self.feature is None else self.feature.enter_block(self.block.index, args, kwargs, call)
        if decided is COMPUTE:
            call.computed.append(self.block.index)
        return decided

    @torch.compiler.disable
    def exit(self, output: Any) -> Any:
        call = self.runtime.call
        if call is None or self.feature is None:
            return output
        return self.feature.exit_block(self.block.index, output, call)

    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        # this frame is never traced; the block's own forward is (as its own frame) under a compiled
        # whole transformer, between two eager calls that decide and record
        early = self.enter(args, kwargs)
        if early is not COMPUTE:
            return early
        return self.exit(self.fn_ref.original_forward(*args, **kwargs))


class CompiledEntry:
    """``_compiled_call_impl`` of a compiled, gated block: decide eagerly, run compiled code only to compute."""

    def __init__(self, gate: BlockGate, compiled: Callable) -> None:
        self.gate = gate
        self.compiled = compiled

    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        early = self.gate.enter(args, kwargs)
        if early is not COMPUTE:
            return early
        return self.gate.exit(self.compiled(*args, **kwargs))


def _compiled_call(module: torch.nn.Module) -> Callable | None:
    return module.__dict__.get("_compiled_call_impl")


class Gates:
    """The gates of one runtime's blocks, eager or in front of compiled calls (see the module docstring)."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self.gates: list[BlockGate] = []

    def install(self, blocks: list[BlockInfo], deciding: dict[int, "Feature"]) -> None:
        for block in blocks:
            gate = BlockGate(self.runtime, block, deciding.get(block.index))
            self.gates.append(gate)
            self._route(gate)

    def _route(self, gate: BlockGate) -> None:
        module = gate.block.module
        compiled = _compiled_call(module)
        hooked = BLOCK_HOOK in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
        # A block that context parallelism splits at keeps the eager gate inside the split, compiled or not
        # (its compiled region then holds our gate: one graph break there).
        if compiled is not None and not isinstance(compiled, CompiledEntry) and not split_hook_names(module):
            if hooked:
                unregister(module, BLOCK_HOOK)
            gate.entry = CompiledEntry(gate, compiled)
            module._compiled_call_impl = gate.entry
        elif not isinstance(compiled, CompiledEntry):
            gate.entry = None
            if not hooked:
                register(module, gate, BLOCK_HOOK)
                keep_inside_split(module, BLOCK_HOOK)
        gate.seen = _compiled_call(module)

    def follow(self) -> None:
        """Route blocks compiled, re-compiled or un-compiled since the last call (cheap: an attribute read each)."""
        for gate in self.gates:
            if _compiled_call(gate.block.module) is not gate.seen:
                self._route(gate)

    @property
    def compiled(self) -> int:
        """Gated blocks whose compiled call runs behind a gate."""
        return sum(gate.entry is not None for gate in self.gates)

    def remove(self) -> None:
        for gate in reversed(self.gates):
            module = gate.block.module
            if gate.entry is not None:
                if _compiled_call(module) is gate.entry:
                    module._compiled_call_impl = gate.entry.compiled  # the user's compiled call, as it was
            else:
                unregister(module, BLOCK_HOOK)
        self.gates = []
