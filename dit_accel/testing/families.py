"""The tiny families: one ``register_family(TinyFamily(...))`` per family, nothing else to edit.

Sizes are chosen so a 4-step call takes milliseconds on CPU while every family still sees a 2x2 grid of
image tokens per (latent) frame at least, and video families at least two latent frames:
Flux/SD3/PixArt: 16 px / VAE 2 / patch 2 -> 4x4 tokens; DiT: sample_size 8 latent -> 4x4 tokens;
Wan/HunyuanVideo/CogVideoX: 32 px / VAE 8 / patch 2 -> 2x2 tokens; Wan/HunyuanVideo: 5 frames -> 2
latent frames; CogVideoX: 9 frames -> 3 latent frames (its VAE decodes an odd latent count to 4k + 1).

Adding a family: its adapter in ``dit_accel/adapters/`` (``families.py`` tier 1, ``image.py`` / ``video.py``
the coverage families), a record here or in ``image_families.py`` / ``video_families.py`` (the builders import
diffusers inside, so importing this module stays cheap), then regenerate the coverage report:
``python -m dit_accel.testing.coverage --write docs/models.md``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from .components import (CLIP_LEN, NEGATIVE_PROMPT, NO_QUANT_CONV, TEXT_LEN, clip_text_encoder, kl_vae,
                         llama_text_encoder, t5_text_encoder, tokenizer)
from .registry import TinyFamily, register_family

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import DiffusionPipeline

IMAGE_RESOLUTION = {"height": 48, "width": 48}  # the "resolution" call change (3x the default side)


# ---------------------------------------------------------------------------------------------------
# FLUX.1 (guidance-distilled: the guidance scale is an embedding input, not a second pass)
# ---------------------------------------------------------------------------------------------------


def _flux_transformer() -> "torch.nn.Module":
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=16,  # CLIP hidden size
        guidance_embeds=True,  # guidance-distilled, like FLUX.1-dev
        axes_dims_rope=(4, 6, 6),
    )


def _flux_pipeline(transformer: "torch.nn.Module") -> "DiffusionPipeline":
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),  # resolution-dependent shift
        vae=kl_vae(shift_factor=0.0609, scaling_factor=1.5035, **NO_QUANT_CONV),
        text_encoder=clip_text_encoder(16),
        tokenizer=tokenizer("clip", CLIP_LEN),
        text_encoder_2=t5_text_encoder(32),
        tokenizer_2=tokenizer("t5", 512),
        transformer=transformer,
    )


register_family(TinyFamily(
    name="flux", transformer_class="FluxTransformer2DModel", pipeline_class="FluxPipeline",
    transformer=_flux_transformer, pipeline=_flux_pipeline,
    call_kwargs=lambda: dict(height=16, width=16, guidance_scale=3.5, max_sequence_length=TEXT_LEN),
    cfg_layout="none", output_shape=(1, 16, 16),  # packed latents: 4x4 tokens x (4 channels * 2x2)
    resolution=IMAGE_RESOLUTION, per_prompt_argument="num_images_per_prompt",
    attention_size={"height": 32, "width": 32},
))


# ---------------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5 (batched CFG [uncond, cond])
# ---------------------------------------------------------------------------------------------------


def _sd3_transformer() -> "torch.nn.Module":
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model (CLIP states are padded up to it)
        caption_projection_dim=16,  # = inner dim
        pooled_projection_dim=32,  # 2 CLIP projections of 16
        out_channels=4,
        pos_embed_max_size=16,
    )


def _sd3_pipeline(transformer: "torch.nn.Module") -> "DiffusionPipeline":
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=kl_vae(shift_factor=0.0609, scaling_factor=1.5305, **NO_QUANT_CONV),
        text_encoder=clip_text_encoder(16, projection=16),
        tokenizer=tokenizer("clip", CLIP_LEN),
        text_encoder_2=clip_text_encoder(16, projection=16),
        tokenizer_2=tokenizer("clip", CLIP_LEN),
        text_encoder_3=t5_text_encoder(32),
        tokenizer_3=tokenizer("t5", 512),
    )


register_family(TinyFamily(
    name="sd3", transformer_class="SD3Transformer2DModel", pipeline_class="StableDiffusion3Pipeline",
    transformer=_sd3_transformer, pipeline=_sd3_pipeline,
    call_kwargs=lambda: dict(height=16, width=16, guidance_scale=5.0, max_sequence_length=TEXT_LEN),
    cfg_layout="batched", output_shape=(1, 4, 8, 8),
    resolution=IMAGE_RESOLUTION, per_prompt_argument="num_images_per_prompt",
    attention_size={"height": 32, "width": 32},
))


# ---------------------------------------------------------------------------------------------------
# PixArt-α/Σ (batched CFG, cross-attention to T5)
# ---------------------------------------------------------------------------------------------------


def _pixart_transformer() -> "torch.nn.Module":
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=4,
        cross_attention_dim=16,  # = inner dim (captions are projected to it)
        caption_channels=32,  # T5 d_model
        sample_size=8,
        patch_size=2,
    )


def _pixart_pipeline(transformer: "torch.nn.Module") -> "DiffusionPipeline":
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    return PixArtAlphaPipeline(
        tokenizer=tokenizer("t5", 512),
        text_encoder=t5_text_encoder(32),
        vae=kl_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


register_family(TinyFamily(
    name="pixart", transformer_class="PixArtTransformer2DModel", pipeline_class="PixArtAlphaPipeline",
    transformer=_pixart_transformer, pipeline=_pixart_pipeline,
    call_kwargs=lambda: dict(
        height=16,
        width=16,
        guidance_scale=4.5,
        max_sequence_length=TEXT_LEN,
        use_resolution_binning=False,  # binning only knows sample sizes 32/64/128
        clean_caption=False,  # needs bs4 + ftfy
    ),
    cfg_layout="batched", output_shape=(1, 4, 8, 8),
    resolution=IMAGE_RESOLUTION, per_prompt_argument="num_images_per_prompt",
    attention_size={"height": 32, "width": 32},
    conformance=False,  # batched CFG [uncond, cond] like SD3, which the suite runs
))


# ---------------------------------------------------------------------------------------------------
# DiT (class-conditional; batched CFG [cond, uncond]; DDIM; fixed resolution; always decodes)
# ---------------------------------------------------------------------------------------------------


def _dit_transformer() -> "torch.nn.Module":
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=4,
        sample_size=8,
        patch_size=2,
    )


def _dit_pipeline(transformer: "torch.nn.Module") -> "DiffusionPipeline":
    from diffusers import DDIMScheduler, DiTPipeline

    labels = ("tench", "goldfish", "white shark", "tiger shark", "hammerhead", "cat", "dog")
    return DiTPipeline(
        transformer=transformer,
        vae=kl_vae(),
        scheduler=DDIMScheduler(),
        id2label=dict(enumerate(labels)),
    )


register_family(TinyFamily(
    name="dit", transformer_class="DiTTransformer2DModel", pipeline_class="DiTPipeline",
    transformer=_dit_transformer, pipeline=_dit_pipeline,
    call_kwargs=lambda: dict(class_labels=[1], guidance_scale=4.0, output_type="pt"),  # DiT always decodes
    cfg_layout="batched", output_shape=(1, 3, 16, 16),
    class_labels=True,
    calibration_prompts=({"class_labels": [1]}, {"class_labels": [3]}, {"class_labels": [5]}),
    batch={"class_labels": [1, 2]},  # the transformer's 4x4 grid is fixed: no resolution change
))


# ---------------------------------------------------------------------------------------------------
# Wan 2.1/2.2 (separate CFG calls; UMT5 cross-attention)
# ---------------------------------------------------------------------------------------------------


def _wan_transformer() -> "torch.nn.Module":
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits it 4/4/4 over (t, h, w)
        in_channels=16,
        out_channels=16,
        text_dim=32,  # UMT5 d_model
        freq_dim=32,
        ffn_dim=48,
        num_layers=4,
        rope_max_seq_len=32,
    )


def _wan_pipeline(transformer: "torch.nn.Module") -> "DiffusionPipeline":
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = AutoencoderKLWan(  # real Wan 2.1 compression: 8x spatial, 4x temporal, 16 latent channels
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return WanPipeline(
        tokenizer=tokenizer("t5", 512),
        text_encoder=t5_text_encoder(32, umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
    )


register_family(TinyFamily(
    name="wan", transformer_class="WanTransformer3DModel", pipeline_class="WanPipeline",
    transformer=_wan_transformer, pipeline=_wan_pipeline,
    call_kwargs=lambda: dict(
        height=32,
        width=32,
        num_frames=5,
        guidance_scale=5.0,
        negative_prompt=NEGATIVE_PROMPT,
        max_sequence_length=TEXT_LEN,
    ),
    cfg_layout="separate", output_shape=(1, 16, 2, 4, 4),  # (B, C, F, H, W)
    resolution=IMAGE_RESOLUTION, per_prompt_argument="num_videos_per_prompt",
    attention_size={"height": 64, "width": 64, "num_frames": 9},
))


# ---------------------------------------------------------------------------------------------------
# HunyuanVideo (separate true-CFG calls plus embedded guidance; Llama + CLIP text encoders)
# ---------------------------------------------------------------------------------------------------


def _hunyuan_video_transformer() -> "torch.nn.Module":
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,  # Llama hidden size
        pooled_projection_dim=16,  # CLIP hidden size
        rope_axes_dim=(4, 4, 4),
    )


def _hunyuan_video_pipeline(transformer: "torch.nn.Module") -> "DiffusionPipeline":
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    vae = AutoencoderKLHunyuanVideo(  # 8x spatial, 4x temporal (4 levels), 4 latent channels
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=llama_text_encoder(16),
        tokenizer=tokenizer("llama", 1024),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip_text_encoder(16),
        tokenizer_2=tokenizer("clip", CLIP_LEN),
    )


@functools.lru_cache(maxsize=None)
def hunyuan_prompt_template() -> dict[str, Any]:
    """A short Llama chat template for HunyuanVideo with ``crop_start`` counted by the tiny tokenizer.

    The pipeline's default template hard-codes ``crop_start=95`` (the real Llama-3 token count of its
    system prefix); our tokenizer counts differently, so tiny calls pass this template instead.
    """
    template = (
        "<|start_header_id|>system<|end_header_id|>\n\ndescribe the video.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    )
    prefix = template.split("{}")[0]
    crop_start = len(tokenizer("llama", 1024)(prefix)["input_ids"])
    return {"template": template, "crop_start": crop_start}


register_family(TinyFamily(
    name="hunyuan_video", transformer_class="HunyuanVideoTransformer3DModel", pipeline_class="HunyuanVideoPipeline",
    transformer=_hunyuan_video_transformer, pipeline=_hunyuan_video_pipeline,
    call_kwargs=lambda: dict(
        height=32,
        width=32,
        num_frames=5,
        guidance_scale=6.0,  # embedded (distilled) guidance
        true_cfg_scale=2.0,
        negative_prompt=NEGATIVE_PROMPT,
        prompt_template=dict(hunyuan_prompt_template()),
        max_sequence_length=TEXT_LEN,
    ),
    cfg_layout="separate", output_shape=(1, 4, 2, 4, 4),  # (B, C, F, H, W)
    resolution=IMAGE_RESOLUTION, per_prompt_argument="num_videos_per_prompt",
    attention_size={"height": 64, "width": 64, "num_frames": 9},
    conformance=False,  # separate CFG calls like Wan, which the suite runs
    notes="HunyuanVideo does not broadcast a single negative prompt over a list of prompts",
))


# ---------------------------------------------------------------------------------------------------
# CogVideoX (batched CFG; text length baked into the positional embedding)
# ---------------------------------------------------------------------------------------------------


def _cogvideox_transformer() -> "torch.nn.Module":
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,  # T5 d_model
        num_layers=4,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
    )


def _cogvideox_pipeline(transformer: "torch.nn.Module") -> "DiffusionPipeline":
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    vae = AutoencoderKLCogVideoX(  # 8x spatial (4 levels), 4x temporal, 4 latent channels
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer("t5", 512),
        text_encoder=t5_text_encoder(32),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


register_family(TinyFamily(
    name="cogvideox", transformer_class="CogVideoXTransformer3DModel", pipeline_class="CogVideoXPipeline",
    transformer=_cogvideox_transformer, pipeline=_cogvideox_pipeline,
    call_kwargs=lambda: dict(  # CogVideoX wants 8N + 1 frames (odd latent count) to decode cleanly
        height=32, width=32, num_frames=9, guidance_scale=6.0, max_sequence_length=TEXT_LEN
    ),
    cfg_layout="batched", output_shape=(1, 3, 4, 4, 4),  # (B, F, C, H, W)
    resolution=IMAGE_RESOLUTION,  # no per-prompt change: CogVideoXPipeline resets num_videos_per_prompt to 1
    attention_size={"height": 64, "width": 64, "num_frames": 9},
    conformance=False,  # batched CFG like SD3 and DiT, which the suite runs
))
