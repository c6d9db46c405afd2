"""Per-sub-block reuse errors for sub-block BAC (``RecordConfig(sub_blocks=True)``, with ``per_block``).

Temporary forward hooks on every block's attention and FFN sub-modules (``ModelAdapter.sub_blocks``: the
adapter's ``attention_module`` / ``ffn_module``) keep a fixed random sketch of each sub-module's output (its
first tensor: the visual stream); after the block, each step's row gains ``sub_dist[u][a]`` for every earlier
step ``a`` of the branch: ‖o_t − o_a‖₁ / ‖out_t‖₁, the L1 change of sub-block ``u``'s output relative to its
block's output (the stream it is added to — what reusing step a's output injects, before the block's gate), and
``sub_kinds`` (``"attention"`` / ``"ffn"`` per sub-block, in execution order). The hooks go away with the
recorder (``Recorder.close``); the outputs are unchanged.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch

from ..adapters.base import BlockInfo, ModelAdapter


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class SubBlockTap:
    """Sketches of the sub-modules' outputs per call, turned into ``sub_dist`` rows after each block."""

    def __init__(self, blocks: Sequence[BlockInfo], adapter: ModelAdapter, sketch_size: int) -> None:
        self.units = adapter.sub_blocks(blocks)
        self.kinds = [u.kind for u in self.units]
        self.of_block: dict[int, list[int]] = {}
        for unit in self.units:
            self.of_block.setdefault(unit.block, []).append(unit.index)
        self.sketch_size = sketch_size
        self.outputs: dict[int, torch.Tensor] = {}
        self.history: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # recorder state -> {unit: [sketch]}
        self._index: dict[int, torch.Tensor] = {}  # numel -> fixed random element indices
        self.handles = [unit.module.register_forward_hook(
            lambda module, args, output, u=unit.index: self._keep(u, output)) for unit in self.units]

    @torch.no_grad()
    def _sketch(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.detach().reshape(-1)
        idx = self._index.get(flat.numel())
        if idx is None or idx.device != flat.device:
            g = torch.Generator().manual_seed(0)
            n = min(self.sketch_size, flat.numel())
            idx = torch.randperm(flat.numel(), generator=g)[:n] if flat.numel() <= 1 << 22 else \
                torch.randint(flat.numel(), (n,), generator=g)
            idx = self._index[flat.numel()] = idx.to(flat.device)
        return flat.index_select(0, idx).float()

    def _keep(self, unit: int, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is not None:
            self.outputs[unit] = self._sketch(tensor)

    def block_done(self, block: int, state: Any, row: dict, norm: float) -> None:
        """Block ``block`` returned (its output's sketched L1 norm ``norm``): fill its sub-blocks' ``sub_dist``."""
        if "sub_dist" not in row:
            row["sub_dist"], row["sub_kinds"] = [None] * len(self.units), list(self.kinds)
        history = self.history.setdefault(state, {})
        for u in self.of_block.get(block, ()):
            current = self.outputs.pop(u, None)
            if current is None:
                continue
            earlier = history.setdefault(u, [])
            row["sub_dist"][u] = [float((current - previous).abs().sum()) / norm
                                  if previous.shape == current.shape else None for previous in earlier]
            earlier.append(current)
