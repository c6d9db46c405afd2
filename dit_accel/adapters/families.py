"""Adapters of the tier-1 families: FLUX.1, SD3/3.5, PixArt-α/Σ, DiT, Wan 2.1/2.2, HunyuanVideo, CogVideoX.

Each ``*_modulated`` function recomputes what the first block's self-attention receives
(norm + timestep modulation), the input TeaCache watches; tests check it equals the tensor the
attention module actually gets.
"""

from __future__ import annotations

from functools import partial

from ._grids import image_grid, packed_grid, video_grid
from .base import ModelAdapter, call_argument, register_adapter


def _hidden(meta, args, kwargs):
    return call_argument(meta, meta.hidden_states_argument_name, args, kwargs)


def adaln_zero_modulated(block, meta, args, kwargs):
    """Blocks whose ``norm1(hidden, emb=temb)`` returns the modulated input first (Flux, SD3, HunyuanVideo)."""
    return block.norm1(_hidden(meta, args, kwargs), emb=call_argument(meta, "temb", args, kwargs))[0]


def pixart_modulated(block, meta, args, kwargs):
    """BasicTransformerBlock with ``ada_norm_single``: scale/shift table + timestep embedding."""
    x = _hidden(meta, args, kwargs)
    t = call_argument(meta, "timestep", args, kwargs)
    shift, scale = (block.scale_shift_table[None] + t.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    out = block.norm1(x) * (1 + scale) + shift
    return out.squeeze(1) if out.ndim == 4 else out


def dit_modulated(block, meta, args, kwargs):
    """BasicTransformerBlock with ``ada_norm_zero`` (class-conditional DiT)."""
    x = _hidden(meta, args, kwargs)
    return block.norm1(x, call_argument(meta, "timestep", args, kwargs),
                       call_argument(meta, "class_labels", args, kwargs), hidden_dtype=x.dtype)[0]


def wan_modulated(block, meta, args, kwargs):
    """WanTransformerBlock: fp32 LayerNorm, modulation from ``scale_shift_table + temb``."""
    x = _hidden(meta, args, kwargs)
    temb = call_argument(meta, "temb", args, kwargs)
    if temb.ndim == 4:  # Wan 2.2 TI2V: per-token modulation [B, S, 6, C]
        shift, scale = [c.squeeze(2) for c in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]]
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)


def cogvideox_modulated(block, meta, args, kwargs):
    """CogVideoXBlock: ``norm1(hidden, encoder_hidden, temb)`` modulates both streams; the visual one is returned."""
    return block.norm1(_hidden(meta, args, kwargs), call_argument(meta, "encoder_hidden_states", args, kwargs),
                       call_argument(meta, "temb", args, kwargs))[0]


FLUX = register_adapter(ModelAdapter(
    family="flux", model_classes=("FluxTransformer2DModel",),
    block_groups=("transformer_blocks", "single_transformer_blocks"),
    text_position="joint_first", cfg_layout="separate", attention_module="attn", ffn_module="ff",
    modulated_input_fn=adaln_zero_modulated, grid_fn=packed_grid,
    notes="guidance-distilled FLUX.1-dev runs one branch; true CFG (true_cfg_scale>1) runs cond/uncond calls"))

SD3 = register_adapter(ModelAdapter(
    family="sd3", model_classes=("SD3Transformer2DModel",), block_groups=("transformer_blocks",),
    text_position="joint_last", cfg_layout="batched", attention_module="attn", ffn_module="ff",
    modulated_input_fn=adaln_zero_modulated, grid_fn=image_grid,
    notes="the last block is context_pre_only: it returns no encoder states"))

PIXART = register_adapter(ModelAdapter(
    family="pixart", model_classes=("PixArtTransformer2DModel",), block_groups=("transformer_blocks",),
    text_position="cross", cfg_layout="batched", ffn_module="ff", modulated_input_fn=pixart_modulated,
    grid_fn=image_grid))

DIT = register_adapter(ModelAdapter(
    family="dit", model_classes=("DiTTransformer2DModel",), block_groups=("transformer_blocks",),
    text_position="none", cfg_layout="batched", ffn_module="ff", modulated_input_fn=dit_modulated, grid_fn=image_grid))

WAN = register_adapter(ModelAdapter(
    family="wan", model_classes=("WanTransformer3DModel",), block_groups=("blocks",),
    text_position="cross", cfg_layout="separate", ffn_module="ffn", modulated_input_fn=wan_modulated,
    grid_fn=video_grid,
    notes="Wan 2.2 A14B pipelines hold two transformers (transformer, transformer_2); each gets its own runtime"))

HUNYUAN_VIDEO = register_adapter(ModelAdapter(
    family="hunyuan_video", model_classes=("HunyuanVideoTransformer3DModel",),
    block_groups=("transformer_blocks", "single_transformer_blocks"),
    text_position="joint_last", cfg_layout="separate", attention_module="attn", ffn_module="ff",
    modulated_input_fn=adaln_zero_modulated, grid_fn=video_grid))

COGVIDEOX = register_adapter(ModelAdapter(
    family="cogvideox", model_classes=("CogVideoXTransformer3DModel",), block_groups=("transformer_blocks",),
    text_position="joint_first", cfg_layout="batched", ffn_module="ff", modulated_input_fn=cogvideox_modulated,
    grid_fn=partial(video_grid, frames_dim=1)))

TIER1 = (FLUX, SD3, PIXART, DIT, WAN, HUNYUAN_VIDEO, COGVIDEOX)
