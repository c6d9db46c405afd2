"""Adapters of the image families beyond tier 1 (coverage families).

Same contract as :mod:`dit_accel.adapters.families`: each ``*_modulated`` function recomputes what the
first block's self-attention receives, with the block's own modules, and ``tests/test_adapters.py`` checks
it equals the tensor the attention module gets on a tiny pipeline of the family
(``dit_accel.testing.image_families``). Block metadata comes from diffusers' ``TransformerBlockRegistry``
where it knows the block class; ``block_returns`` (``group_returns`` per block group) names the outputs
otherwise. FLUX.2, Chroma and AuraFlow join their text and image streams after their double-stream blocks
(``join_group``); the cache feature keeps a residual across the join in the joined layout, so both block
groups are cacheable.
"""

from __future__ import annotations

from ._grids import image_grid, packed_grid
from .base import ModelAdapter, call_argument, register_adapter
from .families import _hidden


def qwen_modulated(block, meta, args, kwargs):
    """QwenImageTransformerBlock: ``img_mod(temb)``'s first half modulates ``img_norm1(hidden)``."""
    mod1 = block.img_mod(call_argument(meta, "temb", args, kwargs)).chunk(2, dim=-1)[0]
    index = call_argument(meta, "modulate_index", args, kwargs)
    return block._modulate(block.img_norm1(_hidden(meta, args, kwargs)), mod1, index)[0]


def qwen_grid(transformer, args, kwargs):
    """Packed 2x2 latents; ``img_shapes`` holds (frames, height, width) in tokens per sample (first: the target)."""
    shapes = kwargs.get("img_shapes")
    if not shapes:
        raise ValueError("img_shapes is needed to know the token grid of a QwenImage call")
    first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
    return tuple(int(s) for s in first)


def sana_modulated(block, meta, args, kwargs):
    """SanaTransformerBlock: ``scale_shift_table + timestep`` modulates ``norm1(hidden)``."""
    x = _hidden(meta, args, kwargs)
    t = call_argument(meta, "timestep", args, kwargs)
    shift, scale = (block.scale_shift_table[None] + t.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    return (block.norm1(x) * (1 + scale) + shift).to(x.dtype)


def cogview4_modulated(block, meta, args, kwargs):
    """CogView4TransformerBlock: ``norm1(hidden, encoder, temb)`` modulates both streams; the visual one first."""
    return block.norm1(_hidden(meta, args, kwargs), call_argument(meta, "encoder_hidden_states", args, kwargs),
                       call_argument(meta, "temb", args, kwargs))[0]


QWEN_IMAGE = register_adapter(ModelAdapter(
    family="qwenimage", model_classes=("QwenImageTransformer2DModel",), block_groups=("transformer_blocks",),
    text_position="joint_first", cfg_layout="separate", attention_module="attn", ffn_module="img_mlp",
    modulated_input_fn=qwen_modulated, grid_fn=qwen_grid,
    notes="true CFG (true_cfg_scale > 1) runs separate cond/uncond calls; the Edit pipelines append the "
          "reference image's tokens after the target's (sparse attention then runs dense)"))

SANA = register_adapter(ModelAdapter(
    family="sana", model_classes=("SanaTransformer2DModel",), block_groups=("transformer_blocks",),
    text_position="cross", cfg_layout="batched", block_returns=("hidden",), modulated_input_fn=sana_modulated,
    grid_fn=image_grid, sparse_unsupported="linear self-attention (ReLU kernel, no softmax)",
    ffn_unsupported="its FFN (GLUMBConv) is a 3x3 convolution over the token grid: it mixes neighbouring "
                    "tokens, so slices of the token sequence are not independent"))

COGVIEW4 = register_adapter(ModelAdapter(
    family="cogview4", model_classes=("CogView4Transformer2DModel",), block_groups=("transformer_blocks",),
    text_position="joint_first", cfg_layout="separate", ffn_module="ff", modulated_input_fn=cogview4_modulated,
    grid_fn=image_grid,
    notes="CogView4Pipeline runs the conditional and unconditional calls separately"))


def norm1_emb_modulated(block, meta, args, kwargs):
    """Blocks whose ``norm1(hidden, emb=temb)`` (AdaLayerNormZero) returns the modulated input first (AuraFlow's
    joint and single blocks, Bria, Ovis-Image)."""
    return block.norm1(_hidden(meta, args, kwargs), emb=call_argument(meta, "temb", args, kwargs))[0]


def chroma_modulated(block, meta, args, kwargs):
    """Chroma blocks: the double-stream block's ``norm1(hidden, emb=temb[:, :6])`` (its image half of the pruned
    modulation), the single-stream block's ``norm(hidden, emb=temb)`` over the joined [text, image] stream."""
    temb = call_argument(meta, "temb", args, kwargs)
    if hasattr(block, "norm1_context"):
        return block.norm1(_hidden(meta, args, kwargs), emb=temb[:, :6])[0]
    return block.norm(_hidden(meta, args, kwargs), emb=temb)[0]


def flux2_modulated(block, meta, args, kwargs):
    """FLUX.2 blocks: ``(1 + scale) * norm(hidden) + shift`` from the shared modulation the transformer passes in
    (``temb_mod_img`` of a double-stream block, ``temb_mod`` of a single-stream block over the joined stream)."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    if hasattr(block, "norm1_context"):
        shift, scale, _ = Flux2Modulation.split(call_argument(meta, "temb_mod_img", args, kwargs), 2)[0]
        return (1 + scale) * block.norm1(_hidden(meta, args, kwargs)) + shift
    shift, scale, _ = Flux2Modulation.split(call_argument(meta, "temb_mod", args, kwargs), 1)[0]
    return (1 + scale) * block.norm(_hidden(meta, args, kwargs)) + shift


def cogview3plus_modulated(block, meta, args, kwargs):
    """CogView3PlusTransformerBlock: ``norm1(hidden, encoder, emb)`` modulates both streams; the visual one first."""
    return block.norm1(_hidden(meta, args, kwargs), call_argument(meta, "encoder_hidden_states", args, kwargs),
                       call_argument(meta, "emb", args, kwargs))[0]


def hunyuandit_modulated(block, meta, args, kwargs):
    """HunyuanDiTBlock (the first block has no long skip): ``norm1(hidden, temb)``."""
    return block.norm1(_hidden(meta, args, kwargs), call_argument(meta, "temb", args, kwargs))


def auraflow_text(transformer, args, kwargs):
    """AuraFlow prepends its learned register tokens to the text tokens."""
    return kwargs["encoder_hidden_states"].shape[1] + transformer.register_tokens.shape[1]


_DOUBLE_SINGLE = (("transformer_blocks", ("encoder", "hidden")), ("single_transformer_blocks", ("hidden",)))

CHROMA = register_adapter(ModelAdapter(
    family="chroma", model_classes=("ChromaTransformer2DModel",),
    block_groups=("transformer_blocks", "single_transformer_blocks"), text_position="joint_first",
    cfg_layout="separate", attention_module="attn", ffn_module="ff", group_returns=_DOUBLE_SINGLE,
    join_group="single_transformer_blocks", cfg_context=False, modulated_input_fn=chroma_modulated,
    grid_fn=packed_grid,
    sparse_unsupported="attends with a pairwise [S, S] padding mask, which the sparse path does not take",
    notes="ChromaPipeline (diffusers 0.42.1) runs its cond/uncond calls without cache_context: the runtime tells "
          "them apart by their order within a step (the first call at a timestep is cond)"))

FLUX2 = register_adapter(ModelAdapter(
    family="flux2", model_classes=("Flux2Transformer2DModel",),
    block_groups=("transformer_blocks", "single_transformer_blocks"), text_position="joint_first",
    cfg_layout="none", attention_module="attn", ffn_module="ff", join_group="single_transformer_blocks",
    modulated_input_fn=flux2_modulated, grid_fn=packed_grid,
    notes="FLUX.2-dev is guidance-distilled (Flux2KleinPipeline's base models run batched CFG)"))

AURAFLOW = register_adapter(ModelAdapter(
    family="auraflow", model_classes=("AuraFlowTransformer2DModel",),
    block_groups=("joint_transformer_blocks", "single_transformer_blocks"), text_position="joint_first",
    cfg_layout="batched", attention_module="attn", ffn_module="ff",
    group_returns=(("joint_transformer_blocks", ("encoder", "hidden")), ("single_transformer_blocks", ("hidden",))),
    join_group="single_transformer_blocks", modulated_input_fn=norm1_emb_modulated, grid_fn=image_grid,
    text_fn=auraflow_text))

BRIA = register_adapter(ModelAdapter(
    family="bria", model_classes=("BriaTransformer2DModel",),
    block_groups=("transformer_blocks", "single_transformer_blocks"), text_position="joint_first",
    cfg_layout="batched", attention_module="attn", ffn_module="ff", block_returns=("encoder", "hidden"),
    modulated_input_fn=norm1_emb_modulated, grid_fn=packed_grid))

COGVIEW3PLUS = register_adapter(ModelAdapter(
    family="cogview3plus", model_classes=("CogView3PlusTransformer2DModel",), block_groups=("transformer_blocks",),
    text_position="joint_first", cfg_layout="batched", block_returns=("hidden", "encoder"), ffn_module="ff",
    modulated_input_fn=cogview3plus_modulated, grid_fn=image_grid))

HUNYUAN_DIT = register_adapter(ModelAdapter(
    family="hunyuan_dit", model_classes=("HunyuanDiT2DModel",), block_groups=("blocks",),
    text_position="cross", cfg_layout="batched", block_returns=("hidden",), ffn_module="ff",
    modulated_input_fn=hunyuandit_modulated, grid_fn=image_grid,
    notes="U-Net-like long skips: the second half of the blocks also takes an earlier block's output"))

OVIS_IMAGE = register_adapter(ModelAdapter(
    family="ovis_image", model_classes=("OvisImageTransformer2DModel",),
    block_groups=("transformer_blocks", "single_transformer_blocks"), text_position="joint_first",
    cfg_layout="separate", attention_module="attn", ffn_module="ff", block_returns=("encoder", "hidden"),
    modulated_input_fn=norm1_emb_modulated, grid_fn=packed_grid))


def lumina2_modulated(block, meta, args, kwargs):
    """Lumina2TransformerBlock (``modulation=True``): ``norm1(hidden, temb)`` (LuminaRMSNormZero) returns the
    scaled RMS-normed input first."""
    return block.norm1(_hidden(meta, args, kwargs), call_argument(meta, "temb", args, kwargs))[0]


def lumina2_text(transformer, args, kwargs):
    """Lumina 2 builds its joint [text, image] sequence per sample from the *valid* text tokens (the mask's sum,
    the longest prompt's count for the batch); one host sync per call."""
    mask = kwargs.get("encoder_attention_mask")
    return kwargs["encoder_hidden_states"].shape[1] if mask is None else int(mask.sum(dim=1).max())


LUMINA2 = register_adapter(ModelAdapter(
    family="lumina2", model_classes=("Lumina2Transformer2DModel",), block_groups=("layers",),
    text_position="joint_first", cfg_layout="separate", attention_module="attn", block_returns=("hidden",),
    ffn_module="feed_forward", cfg_context=False, modulated_input_fn=lumina2_modulated, grid_fn=image_grid,
    text_fn=lumina2_text,
    notes="Lumina-Image 2.0 (diffusers' transformer_lumina2.py): the context and noise refiner blocks (each stream "
          "alone, before the join) run uncached; Lumina2Pipeline runs its cond/uncond calls without cache_context "
          "(told apart by their order within a step) and only cond calls after cfg_trunc_ratio; prompts of "
          "different valid lengths in one batch attend under a padding mask (sparse attention then runs dense)"))
