"""What an algorithm may ask about a model: the ``ModelAdapter`` interface and its registry.

An adapter says, for one transformer family: the block groups in execution order and how each
block returns (hidden / encoder-hidden states, from diffusers' ``TransformerBlockRegistry``
where it knows the block class), the timestep-modulated input of the first block (the quantity
TeaCache-style gates watch), the token layout of a call (text tokens, their place in attention,
the image/video token grid) and the CFG layout of the family's pipelines.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

from ..config import PolicyError

TEXT_POSITIONS = ("joint_first", "joint_last", "cross", "none")
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")  # where pipelines keep their denoisers (Wan 2.2: two)
CFG_LAYOUTS = ("batched", "separate", "none")


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: its qualified name, the module and how it takes/returns states."""

    index: int
    name: str
    module: torch.nn.Module
    meta: TransformerBlockMetadata


@dataclass(frozen=True)
class SubBlock:
    """One sub-block of a block, in execution order over the whole stack: its ``index`` among all sub-blocks,
    the ``block`` index, its ``kind`` ("attention" or "ffn") and the sub-module."""

    index: int
    block: int
    kind: str
    module: torch.nn.Module


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one transformer call: ``grid`` is (frames, height, width) in tokens."""

    text_tokens: int
    text_position: str
    grid: tuple[int, int, int]

    @property
    def visual_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w


def block_metadata(block: torch.nn.Module) -> TransformerBlockMetadata | None:
    """diffusers' metadata for a block class (or one of its bases), if diffusers registered it."""
    for cls in type(block).__mro__:
        try:
            return TransformerBlockRegistry.get(cls)
        except ValueError:
            continue
    return None


def metadata_from_returns(block_cls: type, returns: Sequence[str]) -> TransformerBlockMetadata:
    """Metadata for a block whose forward returns ``returns`` (e.g. ("hidden",) or ("encoder", "hidden"))."""
    allowed = {"hidden", "encoder"}
    if not returns or any(r not in allowed for r in returns) or "hidden" not in returns:
        raise PolicyError(f"block_returns: {list(returns)!r} must name the outputs in order, from {sorted(allowed)}, "
                          "and include 'hidden'")
    meta = TransformerBlockMetadata(
        return_hidden_states_index=returns.index("hidden") if len(returns) > 1 else 0,
        return_encoder_hidden_states_index=returns.index("encoder") if "encoder" in returns else None)
    meta._cls = block_cls
    return meta


def call_argument(meta: TransformerBlockMetadata, name: str, args: tuple, kwargs: dict, default: Any = None) -> Any:
    """The argument ``name`` of a block call, whether passed by keyword or position."""
    if name in kwargs:
        return kwargs[name]
    if meta._cached_parameter_indices is None:
        params = list(inspect.signature(meta._cls.forward).parameters)[1:]
        meta._cached_parameter_indices = {p: i for i, p in enumerate(params)}
    index = meta._cached_parameter_indices.get(name)
    if index is None or index >= len(args):
        return default
    return args[index]


@dataclass(frozen=True)
class ModelAdapter:
    """Describes one transformer family to the algorithms (see module docstring).

    ``inplace_safe``: the family's blocks never modify their inputs in place (checked for the
    tier-1 diffusers blocks), so inputs made under ``torch.inference_mode`` need no defensive copy.
    ``sparse_unsupported``: why block-sparse attention does not apply to the family (None: it does — the
    blocks' ``attention_module`` is softmax self-attention over the visual tokens through SDPA, with a
    processor that can be replaced), e.g. linear attention (Sana).
    ``text_fn``: the number of text tokens in the blocks' joint attention sequence, when it is not the
    length of the call's ``encoder_hidden_states`` (e.g. a model that reads its text from another argument).
    ``group_returns``: ``block_returns`` of individual block groups, as (group, returns) pairs, for transformers
    whose groups return differently and are not in diffusers' registry (Chroma: ``(encoder, hidden)``
    double-stream blocks, then ``hidden``-only single-stream blocks).
    ``join_group``: the block group from which the blocks take one joined stream that the transformer builds
    from the text and image streams of the groups before it (``torch.cat`` in ``text_position`` order:
    FLUX.2, Chroma, AuraFlow). A cached range across the join keeps its residual in the joined layout.
    ``cfg_context``: False when the family's separate-CFG pipelines call the transformer outside diffusers'
    ``cache_context`` (ChromaPipeline, Lumina2Pipeline in diffusers 0.42.1): the runtime then tells the
    branches apart by their order within a denoising step (:class:`dit_accel.runtime.hooks.BranchOrder`).
    ``ffn_module``: the attribute of a block holding its (visual-stream) feed-forward sub-module, a token-wise
    module (norm and modulation stay in the block) that takes the hidden states ``[B, S, C]`` as its first
    argument and returns ``[B, S, C']``; blocks without the attribute have no separate FFN (FLUX's
    single-stream blocks fuse it with attention). None: the family declares none (``ffn_unsupported`` says why).
    ``attention_module`` is the blocks' self-attention sub-module (also read for sub-block caching).
    """

    family: str
    model_classes: tuple[str, ...]
    block_groups: tuple[str, ...]
    text_position: str
    cfg_layout: str
    attention_module: str = "attn1"
    block_returns: tuple[str, ...] | None = None
    modulated_input_fn: Callable[[torch.nn.Module, TransformerBlockMetadata, tuple, dict], torch.Tensor] | None = None
    grid_fn: Callable[[torch.nn.Module, tuple, dict], tuple[int, int, int]] | None = None
    inplace_safe: bool = True
    sparse_unsupported: str | None = None
    text_fn: Callable[[torch.nn.Module, tuple, dict], int] | None = None
    group_returns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    join_group: str | None = None
    cfg_context: bool = True
    ffn_module: str | None = None
    ffn_unsupported: str | None = None
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        groups = [g for g, _ in self.group_returns]
        if any(g not in self.block_groups for g in groups) or len(set(groups)) != len(groups):
            raise PolicyError(f"{self.family}: group_returns names {groups}, expected distinct groups of "
                              f"{list(self.block_groups)}")
        if self.join_group is not None and (self.join_group not in self.block_groups[1:]
                                            or self.text_position not in ("joint_first", "joint_last")):
            raise PolicyError(f"{self.family}: join_group {self.join_group!r} must be a block group after the first "
                              "of a joint-attention family (text_position joint_first / joint_last)")

    def join_index(self, blocks: Sequence[BlockInfo]) -> int | None:
        """Index of the first block that takes the joined stream (see ``join_group``), or None."""
        if self.join_group is None:
            return None
        prefix = self.join_group + "."
        return next((b.index for b in blocks if b.name.startswith(prefix)), None)

    def sub_module(self, block: BlockInfo, kind: str) -> torch.nn.Module | None:
        """The block's ``"attention"`` (``attention_module``) or ``"ffn"`` (``ffn_module``) sub-module, or None
        when the family declares none or this block has none."""
        if kind not in ("attention", "ffn"):
            raise ValueError(f"sub-module kind {kind!r}: expected 'attention' or 'ffn'")
        name = self.attention_module if kind == "attention" else self.ffn_module
        module = getattr(block.module, name, None) if name else None
        return module if isinstance(module, torch.nn.Module) else None

    def sub_blocks(self, blocks: Sequence[BlockInfo]) -> list[SubBlock]:
        """Each block's self-attention, then its FFN (where it has them), in execution order: the units of
        sub-block caching. A block whose MLP runs in parallel with attention (FLUX's single-stream blocks) has
        only its attention unit."""
        out: list[SubBlock] = []
        for block in blocks:
            for kind in ("attention", "ffn"):
                module = self.sub_module(block, kind)
                if module is not None:
                    out.append(SubBlock(len(out), block.index, kind, module))
        return out

    def blocks(self, transformer: torch.nn.Module) -> list[BlockInfo]:
        """The transformer's blocks in execution order, flattened across groups."""
        out: list[BlockInfo] = []
        for group in self.block_groups:
            modules = transformer
            for part in group.split("."):
                modules = getattr(modules, part, None)
            if not isinstance(modules, torch.nn.ModuleList):
                raise PolicyError(f"{type(transformer).__name__} has no block list {group!r} "
                                  f"(expected a torch.nn.ModuleList for the {self.family} adapter)")
            returns = dict(self.group_returns).get(group, self.block_returns)
            for i, block in enumerate(modules):
                if returns is not None:
                    meta = metadata_from_returns(type(block), returns)
                else:
                    meta = block_metadata(block)
                    if meta is None:
                        raise PolicyError(
                            f"block class {type(block).__name__} ({group}.{i}) is not in diffusers' "
                            "TransformerBlockRegistry; name its outputs with block_returns=('hidden',) or "
                            "('encoder', 'hidden') etc.")
                out.append(BlockInfo(len(out), f"{group}.{i}", block, meta))
        if not out:
            raise PolicyError(f"{type(transformer).__name__}: the block groups {list(self.block_groups)} are empty")
        return out

    def modulated_input(self, block: BlockInfo, args: tuple, kwargs: dict) -> torch.Tensor:
        """The timestep-modulated input that ``block``'s attention sees, computed without running the block."""
        if self.modulated_input_fn is None:
            raise PolicyError(f"the {self.family} adapter cannot compute the modulated input of a block")
        return self.modulated_input_fn(block.module, block.meta, args, kwargs)

    def token_layout(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> TokenLayout:
        """Text tokens, their place in attention, and the (frames, height, width) token grid of a call."""
        if self.text_position == "none":
            text = 0
        elif self.text_fn is not None:
            text = int(self.text_fn(transformer, args, kwargs))
        else:
            enc = kwargs.get("encoder_hidden_states")
            text = 0 if enc is None else int(enc.shape[1])
        if self.grid_fn is None:
            raise PolicyError(f"the {self.family} adapter does not know the token grid")
        return TokenLayout(text, self.text_position, self.grid_fn(transformer, args, kwargs))


ADAPTERS: dict[str, ModelAdapter] = {}

# Transformers refused even with hand-named block lists: what their blocks update is more than a hidden and an
# encoder stream, so a cached residual (or a passed-through block) would leave part of the state stale or break
# the transformer's unpacking of the block outputs.
REFUSED: dict[str, str] = {
    "LTX2VideoTransformer3DModel": "LTX-2 runs joint audio-video blocks: each block updates a video and an audio "
                                   "stream (audio-video cross-attention between them) and its pipelines are two-stage "
                                   "(a latent upsampler, then a second denoising pass)",
    "SanaWMLTX2RefinerTransformer3DModel": "the Sana-WM refiner stage has LTX-2-style audio-video blocks",
}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    for name in adapter.model_classes:
        ADAPTERS[name] = adapter
    return adapter


def supported_classes() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(transformer: torch.nn.Module, blocks: Sequence[str] | None = None,
                block_returns: Sequence[str] | None = None) -> ModelAdapter:
    """The adapter for ``transformer``; ``blocks`` names the block lists by hand (generic adapter)."""
    refused = next((REFUSED[c.__name__] for c in type(transformer).__mro__ if c.__name__ in REFUSED), None)
    if refused is not None:
        raise PolicyError(f"{type(transformer).__name__} is not supported, also not through blocks=[...]: {refused}. "
                          f"Supported classes: {', '.join(supported_classes())}")
    if blocks is not None:
        if isinstance(blocks, str) or not blocks or not all(isinstance(b, str) for b in blocks):
            raise PolicyError(f"blocks: expected a list of attribute names of block lists, got {blocks!r}")
        if len(set(blocks)) != len(blocks):
            raise PolicyError(f"blocks: {list(blocks)!r} names a block list more than once")
        known = next((ADAPTERS[c.__name__] for c in type(transformer).__mro__ if c.__name__ in ADAPTERS), None)
        return ModelAdapter(family=known.family if known else "generic", model_classes=(),
                            block_groups=tuple(blocks), text_position=known.text_position if known else "none",
                            cfg_layout=known.cfg_layout if known else "none",
                            block_returns=tuple(block_returns) if block_returns else None,
                            modulated_input_fn=known.modulated_input_fn if known else None,
                            grid_fn=known.grid_fn if known else None, inplace_safe=known is not None,
                            sparse_unsupported=known.sparse_unsupported if known else None,
                            text_fn=known.text_fn if known else None,
                            group_returns=tuple((g, r) for g, r in known.group_returns if g in blocks)
                            if known and not block_returns else (),
                            join_group=known.join_group if known and known.join_group in blocks[1:] else None,
                            cfg_context=known.cfg_context if known else True,
                            attention_module=known.attention_module if known else "attn1",
                            ffn_module=known.ffn_module if known else None,
                            ffn_unsupported=known.ffn_unsupported if known
                            else "a hand-named block list declares no FFN sub-module")
    for cls in type(transformer).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise PolicyError(
        f"{type(transformer).__name__} is not a supported transformer. Supported classes: "
        f"{', '.join(supported_classes())}. For another model, name its block lists by hand: "
        "dit_accel.accelerate(model, policy, blocks=['transformer_blocks'], block_returns=('hidden',)) — "
        "block_returns gives the order of each block's outputs, e.g. ('encoder', 'hidden') for Flux-style blocks.")
