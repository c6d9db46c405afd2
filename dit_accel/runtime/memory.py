"""The memory feature: Feature Slicer / Operator Grouping (the ``memory:`` policy section).

Streamlined Inference (Zhan, Wu, Gong et al., 2024, "Fast and Memory-Efficient Video Diffusion Using
Streamlined Inference", NeurIPS 2024, arXiv:2411.01171) observes that the peak
activation memory of video diffusion is set by a few wide intermediates and that the operators between two
narrow tensors work on each token (or frame) alone: **Feature Slicer** cuts the token dimension into slices,
**Operator Grouping** runs a group of consecutive such operators (norm → FFN up → activation → FFN down) on one
slice before the next, so the wide intermediate exists for one slice at a time. The outputs are those of the
unsliced operators up to rounding (a matrix product of a slice of rows computes the same row-wise sums; blocked
GEMM kernels may round differently); the FLOPs are the same. The paper applies it to U-Net video models
(AnimateDiff, SVD); applying it to the FFN of DiT blocks (4× the hidden size in most DiTs, 5.8× in Wan 2.1) is
our transfer.

Here the group is the block's FFN sub-module, declared by the adapter (``ModelAdapter.ffn_module``: an
attribute of the block, e.g. ``ff`` / ``ffn``; FLUX-like single-stream blocks fuse their MLP with attention
and keep no such module, so they run unsliced). An override of each FFN module's ``forward`` (not a
``diffusers.hooks.ModelHook``: see :mod:`dit_accel.runtime.overrides` for why regional compile needs that) runs the
module's own forward on slices of ``slice_tokens`` tokens (``slice_by: frames``: whole frames of the call's token grid)
and writes each slice's output into one preallocated output. A sequence of at most ``slice_tokens`` tokens
runs the module as it is.

**Where we depart.** The norm and timestep modulation before the FFN and the gated residual add after it stay
whole-sequence operations inside the block's own forward (each is a 1× hidden-size tensor; grouping them
too would mean rewriting every family's block). Attention is not sliced (the paper slices it by frames for
its own attention; SDPA / FlashAttention already never materialises the score matrix). Families whose FFN
is not token-wise (Sana's GLUMBConv convolves over the token grid) are refused.

The slicing decision reads only the input's shape (and, for ``frames``, the grid of the call, set before
the blocks run): under regional ``torch.compile`` the override traces into the block's graph with no graph break,
one graph for all blocks, compiled once per resolution. ``detach`` removes every override (the modules are as
they were).
"""

from __future__ import annotations

from typing import Any

import torch
from ..config import PolicyError
from ..memory_config import MemoryConfig
from .feature import Call, Feature, Host
from .overrides import call_inner, override_forward, owner_of, restore_forward

KEY = "memory"


def sliced_forward(module: torch.nn.Module, *args, **kwargs):
    """The FFN module's forward over slices of its input's token dimension (see the module docstring)."""
    feature: "MemoryFeature" = owner_of(module, KEY)
    if args:
        x, rest = args[0], args[1:]
        call = lambda part: call_inner(module, KEY, part, *rest, **kwargs)  # noqa: E731
    else:
        name = next((k for k in ("hidden_states", "x") if k in kwargs), None)
        x = kwargs.get(name) if name is not None else None
        call = lambda part: call_inner(module, KEY, **{**kwargs, name: part})  # noqa: E731
    size = feature.slice_length(x)
    if size is None:
        return call_inner(module, KEY, *args, **kwargs)
    tokens = x.shape[1]
    first = call(x.narrow(1, 0, size))
    if not isinstance(first, torch.Tensor) or first.dim() != 3 or first.shape[:2] != (x.shape[0], size):
        raise PolicyError(f"memory: {type(module).__name__} is not token-wise (a slice of {size} tokens gave "
                          f"{type(first).__name__} {tuple(getattr(first, 'shape', ()))}); remove the memory section")
    out = first.new_empty((x.shape[0], tokens, first.shape[2]))
    out.narrow(1, 0, size).copy_(first)
    del first
    for start in range(size, tokens, size):
        length = min(size, tokens - start)
        out.narrow(1, start, length).copy_(call(x.narrow(1, start, length)))
    return out


class MemoryFeature(Feature):
    """Slices the adapter's FFN sub-modules over the token dimension (see the module docstring)."""

    name = "memory"

    def __init__(self, config: MemoryConfig) -> None:
        self.config = config
        self.host: Host | None = None
        self.modules: list[torch.nn.Module] = []
        self.frame_tokens: int | None = None  # tokens per frame of the call in progress (slice_by: frames)

    def attach(self, host: Host) -> None:
        adapter = host.adapter
        if adapter.ffn_module is None:
            why = adapter.ffn_unsupported or "its adapter declares no FFN sub-module (ModelAdapter.ffn_module)"
            raise PolicyError(f"memory: the {adapter.family} family cannot be sliced: {why}; remove the memory "
                              "section")
        targets = [m for m in (adapter.sub_module(b, "ffn") for b in host.blocks) if m is not None]
        if not targets:
            raise PolicyError(f"memory: no block of {type(host.transformer).__name__} has an FFN sub-module "
                              f"{adapter.ffn_module!r}; remove the memory section")
        if self.config.slice_by == "frames" and adapter.grid_fn is None:
            raise PolicyError(f"memory.slice_by: 'frames' needs the token grid, which the {adapter.family} adapter "
                              "does not know; use slice_by: tokens")
        try:
            for module in targets:
                override_forward(module, KEY, sliced_forward, self)
                self.modules.append(module)
        except Exception:
            self.detach()
            raise
        self.host = host

    def detach(self) -> None:
        for module in reversed(self.modules):
            restore_forward(module, KEY)
        self.modules = []
        self.host = None

    def before_call(self, call: Call) -> None:
        if self.config.slice_by == "frames" and self.host is not None:
            _, height, width = self.host.adapter.token_layout(self.host.transformer, call.args, call.kwargs).grid
            self.frame_tokens = max(1, height * width)

    def release(self) -> None:
        self.frame_tokens = None

    def slice_length(self, x: Any) -> int | None:
        """Tokens per slice for an FFN input ``x`` ([B, S, C]), or None to run it unsliced."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return None
        size = self.config.slice_tokens
        if self.config.slice_by == "frames" and self.frame_tokens is not None:
            size = max(1, size // self.frame_tokens) * self.frame_tokens
        return size if x.shape[1] > size else None

    def stats(self) -> dict[str, Any]:
        return {"memory": {"slice_tokens": self.config.slice_tokens, "slice_by": self.config.slice_by,
                           "sliced_modules": len(self.modules)}}
