"""Adapters of the video families beyond tier 1 (coverage families); see :mod:`dit_accel.adapters.image`."""

from __future__ import annotations


from ._grids import video_grid
from .base import ModelAdapter, call_argument, register_adapter
from .families import _hidden, wan_modulated
from .image import sana_modulated


def ltx_modulated(block, meta, args, kwargs):
    """LTXVideoTransformerBlock: per-token ``scale_shift_table + temb`` modulates ``norm1(hidden)``."""
    x = _hidden(meta, args, kwargs)
    temb = call_argument(meta, "temb", args, kwargs)
    table = block.scale_shift_table
    ada = table[None, None].to(temb.device) + temb.reshape(x.shape[0], temb.size(1), table.shape[0], -1)
    shift, scale = ada.unbind(dim=2)[:2]
    return block.norm1(x) * (1 + scale) + shift


def ltx_grid(transformer, args, kwargs):
    """Packed [B, F*H*W, C] tokens; the latent (frames, height, width) are call arguments (patch 1x1x1 in LTX)."""
    cfg = transformer.config
    pt, p = cfg.patch_size_t, cfg.patch_size
    return kwargs["num_frames"] // pt, kwargs["height"] // p, kwargs["width"] // p


def mochi_modulated(block, meta, args, kwargs):
    """MochiTransformerBlock: ``norm1(hidden, temb)`` returns the modulated input first."""
    return block.norm1(_hidden(meta, args, kwargs), call_argument(meta, "temb", args, kwargs))[0]


LTX_VIDEO = register_adapter(ModelAdapter(
    family="ltx_video", model_classes=("LTXVideoTransformer3DModel",), block_groups=("transformer_blocks",),
    text_position="cross", cfg_layout="batched", ffn_module="ff", modulated_input_fn=ltx_modulated, grid_fn=ltx_grid))

MOCHI = register_adapter(ModelAdapter(
    family="mochi", model_classes=("MochiTransformer3DModel",), block_groups=("transformer_blocks",),
    text_position="joint_last", cfg_layout="batched", ffn_module="ff", modulated_input_fn=mochi_modulated,
    grid_fn=video_grid,
    sparse_unsupported="diffusers' MochiAttention has no set_processor (its processor cannot be wrapped)",
    notes="attention runs per sample over the valid text tokens: padded prompts change the joint length"))


def skyreels_modulated(block, meta, args, kwargs):
    """SkyReelsV2TransformerBlock: fp32 LayerNorm, ``scale_shift_table + temb`` (per frame under diffusion forcing)."""
    x = _hidden(meta, args, kwargs)
    temb = call_argument(meta, "temb", args, kwargs)
    if temb.dim() == 4:
        shift, scale = [c.squeeze(1) for c in (block.scale_shift_table.unsqueeze(2) + temb.float()).chunk(6, dim=1)[:2]]
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)


def allegro_modulated(block, meta, args, kwargs):
    """AllegroTransformerBlock: PixArt-style ``scale_shift_table + temb`` on ``norm1(hidden)``."""
    x = _hidden(meta, args, kwargs)
    temb = call_argument(meta, "temb", args, kwargs)
    shift, scale = (block.scale_shift_table[None] + temb.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    return (block.norm1(x) * (1 + scale) + shift).squeeze(1)


SKYREELS_V2 = register_adapter(ModelAdapter(
    family="skyreels_v2", model_classes=("SkyReelsV2Transformer3DModel",), block_groups=("blocks",),
    text_position="cross", cfg_layout="separate", block_returns=("hidden",), ffn_module="ffn",
    modulated_input_fn=skyreels_modulated,
    grid_fn=video_grid))

WAN_VACE = register_adapter(ModelAdapter(
    family="wan_vace", model_classes=("WanVACETransformer3DModel",), block_groups=("blocks",),
    text_position="cross", cfg_layout="separate", ffn_module="ffn", modulated_input_fn=wan_modulated,
    grid_fn=video_grid,
    notes="the VACE blocks (control hints, computed once per call before the main blocks) run uncached; the "
          "hints the main loop adds between blocks stay fresh on reused steps"))

ALLEGRO = register_adapter(ModelAdapter(
    family="allegro", model_classes=("AllegroTransformer3DModel",), block_groups=("transformer_blocks",),
    text_position="cross", cfg_layout="batched", block_returns=("hidden",), ffn_module="ff",
    modulated_input_fn=allegro_modulated,
    grid_fn=video_grid))

SANA_VIDEO = register_adapter(ModelAdapter(
    family="sana_video", model_classes=("SanaVideoTransformer3DModel",), block_groups=("transformer_blocks",),
    text_position="cross", cfg_layout="batched", block_returns=("hidden",), modulated_input_fn=sana_modulated,
    grid_fn=video_grid, sparse_unsupported="linear self-attention (ReLU kernel, no softmax)",
    ffn_unsupported="its FFN (GLUMBTempConv) convolves over the token grid and across frames: it mixes "
                    "neighbouring tokens, so slices of the token sequence are not independent"))


def norm1_emb_modulated(block, meta, args, kwargs):
    """Blocks whose ``norm1(hidden, emb=temb)`` (AdaLayerNormZero) returns the modulated input first."""
    return block.norm1(_hidden(meta, args, kwargs), emb=call_argument(meta, "temb", args, kwargs))[0]


MOTIF_VIDEO = register_adapter(ModelAdapter(
    family="motif_video", model_classes=("MotifVideoTransformer3DModel",),
    block_groups=("transformer_blocks", "single_transformer_blocks"), text_position="joint_last",
    cfg_layout="separate", attention_module="attn", ffn_module="ff", modulated_input_fn=norm1_emb_modulated,
    grid_fn=video_grid, notes="MotifVideoPipeline's guider runs the conditional and unconditional calls separately"))
