"""Tiny records of the video coverage families (tier 2); see :mod:`dit_accel.testing.image_families`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .image_families import Embeds, _flow_scheduler, coverage_family

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ---------------------------------------------------------------------------------------------------
# LTX-Video (packed tokens, cross-attention to T5, batched CFG; no VAE: 32x spatial, 8x temporal)
# ---------------------------------------------------------------------------------------------------


def _ltx_transformer() -> "torch.nn.Module":
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=4, caption_channels=32)


def _ltx_pipeline(transformer: "torch.nn.Module"):
    from diffusers import LTXPipeline

    return LTXPipeline(scheduler=_flow_scheduler(use_dynamic_shifting=True), vae=None, text_encoder=None,
                       tokenizer=None, transformer=transformer)


coverage_family(
    "ltx_video", "LTXVideoTransformer3DModel", "LTXPipeline", _ltx_transformer, _ltx_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
    dict(height=128, width=128, num_frames=9, guidance_scale=3.0), "batched", (1, 32, 8),
    resolution={"height": 192, "width": 192}, per_prompt_argument="num_videos_per_prompt",
    attention_size={"height": 256, "width": 256, "num_frames": 17})


# ---------------------------------------------------------------------------------------------------
# Mochi (joint attention [video, text] per sample, batched CFG; no VAE: 8x spatial, 6x temporal)
# ---------------------------------------------------------------------------------------------------


def _mochi_transformer() -> "torch.nn.Module":
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=12, num_layers=4,
                                   pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                   max_sequence_length=16)


def _mochi_pipeline(transformer: "torch.nn.Module"):
    from diffusers import MochiPipeline

    return MochiPipeline(scheduler=_flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)


coverage_family(
    "mochi", "MochiTransformer3DModel", "MochiPipeline", _mochi_transformer, _mochi_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
    dict(height=32, width=32, num_frames=7, guidance_scale=4.5), "batched", (1, 4, 2, 4, 4),
    resolution={"height": 48, "width": 48}, per_prompt_argument="num_videos_per_prompt",
    attention_size={"height": 64, "width": 64, "num_frames": 13})


VIDEO = dict(resolution={"height": 48, "width": 48}, per_prompt_argument="num_videos_per_prompt",
             attention_size={"height": 64, "width": 64, "num_frames": 9})


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


# ---------------------------------------------------------------------------------------------------
# SkyReels-V2 and Wan VACE (Wan-style blocks, separate CFG calls, UMT5 cross-attention)
# ---------------------------------------------------------------------------------------------------

WAN_SIZES = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                 text_dim=32, freq_dim=32, ffn_dim=48, num_layers=4, rope_max_seq_len=32)


def _skyreels_transformer() -> "torch.nn.Module":
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(**WAN_SIZES)


def _skyreels_pipeline(transformer: "torch.nn.Module"):
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    return SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
                              scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                                flow_shift=8.0))


coverage_family(
    "skyreels_v2", "SkyReelsV2Transformer3DModel", "SkyReelsV2Pipeline", _skyreels_transformer, _skyreels_pipeline,
    Embeds(32), dict(height=32, width=32, num_frames=5, guidance_scale=6.0), "separate", (1, 16, 2, 4, 4), **VIDEO)


def _wan_vace_transformer() -> "torch.nn.Module":
    from diffusers import WanVACETransformer3DModel

    # the control input: 16 latent channels of the inactive and 16 of the reactive video + 8x8 mask channels
    return WanVACETransformer3DModel(**WAN_SIZES, vace_layers=[0, 2], vace_in_channels=96)


def _wan_vace_pipeline(transformer: "torch.nn.Module"):
    from diffusers import WanVACEPipeline

    return WanVACEPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(), scheduler=_flow_scheduler(shift=5.0),
                           transformer=transformer)


coverage_family(  # no control video: VACE encodes a blank one (the tiny Wan VAE, 8x spatial / 4x temporal)
    "wan_vace", "WanVACETransformer3DModel", "WanVACEPipeline", _wan_vace_transformer, _wan_vace_pipeline,
    Embeds(32), dict(height=32, width=32, num_frames=5, guidance_scale=5.0), "separate", (1, 16, 2, 4, 4),
    **VIDEO)


# ---------------------------------------------------------------------------------------------------
# Allegro (cross-attention to T5, batched CFG)
# ---------------------------------------------------------------------------------------------------


def _allegro_transformer() -> "torch.nn.Module":
    from diffusers import AllegroTransformer3DModel

    return AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
                                     in_channels=4, out_channels=4, num_layers=4, cross_attention_dim=24,
                                     sample_height=4, sample_width=4, sample_frames=9, caption_channels=32)


def _allegro_pipeline(transformer: "torch.nn.Module"):
    from diffusers import AllegroPipeline, EulerAncestralDiscreteScheduler

    return AllegroPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                           scheduler=EulerAncestralDiscreteScheduler())


coverage_family(
    "allegro", "AllegroTransformer3DModel", "AllegroPipeline", _allegro_transformer, _allegro_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
    dict(height=32, width=32, num_frames=5, guidance_scale=7.5, negative_prompt=None, clean_caption=False), "batched",
    (1, 4, 2, 4, 4),
    **VIDEO)


# ---------------------------------------------------------------------------------------------------
# Sana-Video (linear self-attention, cross-attention to Gemma states, batched CFG)
# ---------------------------------------------------------------------------------------------------


def _sana_video_transformer() -> "torch.nn.Module":
    from diffusers import SanaVideoTransformer3DModel

    return SanaVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12,
                                       num_layers=4, num_cross_attention_heads=2, cross_attention_head_dim=12,
                                       cross_attention_dim=24, caption_channels=32, sample_size=4,
                                       patch_size=(1, 2, 2), rope_max_seq_len=32)


def _sana_video_pipeline(transformer: "torch.nn.Module"):
    from diffusers import SanaVideoPipeline

    return SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=_flow_scheduler(shift=8.0))


coverage_family(
    "sana_video", "SanaVideoTransformer3DModel", "SanaVideoPipeline", _sana_video_transformer, _sana_video_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
    dict(height=32, width=32, frames=5, guidance_scale=6.0, negative_prompt=None, use_resolution_binning=False,
         clean_caption=False), "batched", (1, 16, 2, 4, 4),
    resolution={"height": 48, "width": 48}, per_prompt_argument="num_videos_per_prompt")


# ---------------------------------------------------------------------------------------------------
# Motif-Video (HunyuanVideo-style double/single blocks, joint attention [video, text])
# ---------------------------------------------------------------------------------------------------


def _motif_transformer() -> "torch.nn.Module":
    from diffusers import MotifVideoTransformer3DModel

    return MotifVideoTransformer3DModel(in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12,
                                        num_layers=2, num_single_layers=2, mlp_ratio=2.0, patch_size=2,
                                        patch_size_t=1, text_embed_dim=32, rope_axes_dim=(4, 4, 4))


def _motif_pipeline(transformer: "torch.nn.Module"):
    from diffusers import ClassifierFreeGuidance, MotifVideoPipeline

    return MotifVideoPipeline(scheduler=_flow_scheduler(shift=7.0), vae=_wan_vae(), text_encoder=None,
                              tokenizer=None, transformer=transformer,
                              guider=ClassifierFreeGuidance(guidance_scale=6.0))


coverage_family(
    "motif_video", "MotifVideoTransformer3DModel", "MotifVideoPipeline", _motif_transformer, _motif_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
    dict(height=32, width=32, num_frames=5, negative_prompt=None), "separate", (1, 16, 2, 4, 4),
    **VIDEO)
