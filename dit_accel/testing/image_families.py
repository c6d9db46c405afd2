"""Tiny records of the image coverage families (tier 2): one ``register_family`` per family.

These pipelines are called with seeded random text embeddings (``prompt_embeds=True``: no text encoder or
tokenizer is built) and ``output_type="latent"``; pipelines that can do without a VAE get none (their
``vae_scale_factor`` falls back to 8, so 64 px gives an 8x8 latent). Each family keeps a 4x4 token grid at
least by default and 8x8 (64 tokens, four 16-token blocks) for sparse attention (``attention_size``).
Adapters: :mod:`dit_accel.adapters.image`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .components import TEXT_LEN, text_embeds
from .registry import TinyFamily, register_family

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Embeds", "coverage_family", "merged"]

BIG = {"height": 128, "width": 128}  # the sparse-attention size: 8x8 tokens after VAE 8 / patch 2


class Embeds:
    """The text-embedding call arguments of one text encoder of a pipeline, under the pipeline's names.

    ``prompt`` / ``negative``: names of the prompt and negative-prompt embeddings [batch, tokens, dim]
    (``negative=None``: the pipeline takes none); ``masks``: names of their attention masks (all ones, same
    order; ``mask_dtype`` names their torch dtype), or (); ``pooled``: names of pooled [batch, pooled_dim]
    embeddings (prompt, negative) and their dim.
    Calling it with the prompts' seeds and the negative prompts' seeds gives the call arguments
    (``offset`` shifts every seed, so that two encoders of one pipeline differ).
    """

    def __init__(self, dim: int, prompt: str = "prompt_embeds", negative: str | None = "negative_prompt_embeds",
                 masks: tuple[str, ...] = (), tokens: int = TEXT_LEN,
                 pooled: tuple[str, str | None, int] | None = None, offset: int = 0, mask_dtype: str = "long") -> None:
        self.dim, self.prompt, self.negative, self.masks, self.tokens = dim, prompt, negative, masks, tokens
        self.pooled, self.offset, self.mask_dtype = pooled, offset, mask_dtype

    def __call__(self, seeds: tuple[int, ...] = (0,), negative_seeds: tuple[int, ...] = (1,)) -> dict[str, Any]:
        import torch

        def rows(dim: int, tokens: int, of: tuple[int, ...], shift: int = 0) -> "torch.Tensor":
            return torch.cat([text_embeds(dim, tokens, seed=s + self.offset + shift) for s in of])

        out: dict[str, Any] = {self.prompt: rows(self.dim, self.tokens, seeds)}
        if self.negative is not None:
            out[self.negative] = rows(self.dim, self.tokens, negative_seeds)
        if self.pooled is not None:
            name, negative, dim = self.pooled
            out[name] = rows(dim, 1, seeds, 50)[:, 0]
            if negative is not None:
                out[negative] = rows(dim, 1, negative_seeds, 50)[:, 0]
        for mask, of in zip(self.masks, (self.prompt, self.negative)):
            out[mask] = torch.ones(out[of].shape[:2], dtype=getattr(torch, self.mask_dtype))
        return out


def merged(*encoders: Embeds) -> Callable[..., dict[str, Any]]:
    """The call arguments of several text encoders' embeddings together."""
    def call(seeds: tuple[int, ...] = (0,), negative_seeds: tuple[int, ...] = (1,)) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for encoder in encoders:
            out.update(encoder(seeds, negative_seeds))
        return out
    return call


def coverage_family(name: str, transformer_class: str, pipeline_class: str,
                    transformer: Callable[[], "torch.nn.Module"], pipeline: Callable[["torch.nn.Module"], Any],
                    embeds: Callable[..., dict[str, Any]], call: dict[str, Any], cfg_layout: str,
                    output_shape: tuple[int, ...], **fields: Any) -> TinyFamily:
    """Register a coverage family called with ``embeds()`` plus ``call`` (sizes, guidance, ...): calibration
    prompts are the embeddings of seeds 2, 3, 4, the batch change those of seeds 0 and 5."""
    return register_family(TinyFamily(
        name=name, transformer_class=transformer_class, pipeline_class=pipeline_class, transformer=transformer,
        pipeline=pipeline, call_kwargs=lambda: {**embeds(), **call}, cfg_layout=cfg_layout,
        output_shape=output_shape, calibration_prompts=lambda: tuple(embeds((seed,)) for seed in (2, 3, 4)),
        batch=lambda: embeds((0, 5), (1, 1)), tier=2, conformance=False, prompt_embeds=True, **fields))


def _flow_scheduler(**config: Any):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


# ---------------------------------------------------------------------------------------------------
# Qwen-Image (packed 2x2 latents, joint attention [text, image], true CFG as separate calls)
# ---------------------------------------------------------------------------------------------------


def _qwenimage_transformer() -> "torch.nn.Module":
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=4,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       axes_dims_rope=(4, 6, 6))


def _qwenimage_pipeline(transformer: "torch.nn.Module"):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=_flow_scheduler(use_dynamic_shifting=True), vae=None, text_encoder=None,
                             tokenizer=None, transformer=transformer)


coverage_family(
    "qwenimage", "QwenImageTransformer2DModel", "QwenImagePipeline", _qwenimage_transformer, _qwenimage_pipeline,
    Embeds(32, masks=("prompt_embeds_mask", "negative_prompt_embeds_mask")),
    dict(height=64, width=64, true_cfg_scale=4.0), "separate", (1, 16, 16),
    resolution={"height": 96, "width": 96}, per_prompt_argument="num_images_per_prompt", attention_size=BIG)


# ---------------------------------------------------------------------------------------------------
# Sana (linear self-attention, cross-attention to Gemma states, batched CFG)
# ---------------------------------------------------------------------------------------------------


def _sana_transformer() -> "torch.nn.Module":
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=4, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=32, sample_size=4, patch_size=1)


def _sana_pipeline(transformer: "torch.nn.Module"):
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                              flow_shift=3.0))


coverage_family(
    "sana", "SanaTransformer2DModel", "SanaPipeline", _sana_transformer, _sana_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
    dict(height=128, width=128, guidance_scale=4.5, negative_prompt=None, use_resolution_binning=False,
         clean_caption=False),
    "batched", (1, 4, 4, 4),  # no VAE: Sana's vae_scale_factor falls back to 32
    resolution={"height": 192, "width": 192}, per_prompt_argument="num_images_per_prompt")


# ---------------------------------------------------------------------------------------------------
# CogView 4 (joint attention [text, image], separate CFG calls)
# ---------------------------------------------------------------------------------------------------


def _cogview4_transformer() -> "torch.nn.Module":
    from diffusers import CogView4Transformer2DModel

    return CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                      attention_head_dim=8, num_attention_heads=2, text_embed_dim=32,
                                      time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
                                      rope_axes_dim=(4, 4))


def _cogview4_pipeline(transformer: "torch.nn.Module"):
    from diffusers import CogView4Pipeline

    return CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=_flow_scheduler(use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
                                                      time_shift_type="linear"))


coverage_family(
    "cogview4", "CogView4Transformer2DModel", "CogView4Pipeline", _cogview4_transformer, _cogview4_pipeline,
    Embeds(32), dict(height=64, width=64, guidance_scale=5.0), "separate", (1, 4, 8, 8),
    resolution={"height": 96, "width": 96}, per_prompt_argument="num_images_per_prompt", attention_size=BIG)


# ---------------------------------------------------------------------------------------------------
# Flux-like packed-latent families: Chroma, FLUX.2, Bria (64 px, no VAE -> 8x8 latent -> 4x4 packed tokens)
# ---------------------------------------------------------------------------------------------------

PACKED = dict(resolution={"height": 96, "width": 96}, per_prompt_argument="num_images_per_prompt", attention_size=BIG)


def _chroma_transformer() -> "torch.nn.Module":
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=4,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                                    approximator_hidden_dim=16, approximator_layers=1)


def _chroma_pipeline(transformer: "torch.nn.Module"):
    from diffusers import ChromaPipeline

    return ChromaPipeline(scheduler=_flow_scheduler(use_dynamic_shifting=True), vae=None, text_encoder=None,
                          tokenizer=None, transformer=transformer)


coverage_family(
    "chroma", "ChromaTransformer2DModel", "ChromaPipeline", _chroma_transformer, _chroma_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask"), mask_dtype="bool"),
    # CFG outside diffusers' cache_context: the runtime tells cond from uncond by their order (adapter cfg_context)
    dict(height=64, width=64, guidance_scale=4.0), "separate", (1, 16, 16), **PACKED)


def _flux2_transformer() -> "torch.nn.Module":
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=4,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))


def _flux2_pipeline(transformer: "torch.nn.Module"):
    from diffusers import Flux2Pipeline

    return Flux2Pipeline(scheduler=_flow_scheduler(use_dynamic_shifting=True), vae=None, text_encoder=None,
                         tokenizer=None, transformer=transformer)


coverage_family(
    "flux2", "Flux2Transformer2DModel", "Flux2Pipeline", _flux2_transformer, _flux2_pipeline,
    Embeds(32, negative=None), dict(height=64, width=64, guidance_scale=4.0), "none", (1, 16, 16), **PACKED)


def _bria_transformer() -> "torch.nn.Module":
    from diffusers import BriaTransformer2DModel

    return BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  axes_dims_rope=[4, 6, 6])


def _bria_pipeline(transformer: "torch.nn.Module"):
    from diffusers import BriaPipeline

    from .components import NO_QUANT_CONV, kl_vae

    return BriaPipeline(transformer=transformer, scheduler=_flow_scheduler(), vae=kl_vae(**NO_QUANT_CONV),
                        text_encoder=None, tokenizer=None)


coverage_family(  # BriaPipeline needs a VAE (its config): the tiny 2x one, as Flux's
    "bria", "BriaTransformer2DModel", "BriaPipeline", _bria_transformer, _bria_pipeline,
    Embeds(32), dict(height=16, width=16, guidance_scale=5.0), "batched", (1, 16, 16),
    resolution={"height": 48, "width": 48}, per_prompt_argument="num_images_per_prompt",
    attention_size={"height": 32, "width": 32})


# ---------------------------------------------------------------------------------------------------
# AuraFlow, CogView 3 Plus, Hunyuan-DiT (latents [B, C, H, W], patch 2)
# ---------------------------------------------------------------------------------------------------

LATENT2D = dict(resolution={"height": 96, "width": 96}, per_prompt_argument="num_images_per_prompt", attention_size=BIG)


def _auraflow_transformer() -> "torch.nn.Module":
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                      num_single_dit_layers=4, attention_head_dim=8, num_attention_heads=2,
                                      joint_attention_dim=32, caption_projection_dim=16, out_channels=4,
                                      pos_embed_max_size=64)  # positions, not a side


def _auraflow_pipeline(transformer: "torch.nn.Module"):
    from diffusers import AuraFlowPipeline

    return AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=_flow_scheduler())


coverage_family(
    "auraflow", "AuraFlowTransformer2DModel", "AuraFlowPipeline", _auraflow_transformer, _auraflow_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
    dict(height=64, width=64, guidance_scale=3.5), "batched", (1, 4, 8, 8), **LATENT2D)


def _cogview3plus_transformer() -> "torch.nn.Module":
    from diffusers import CogView3PlusTransformer2DModel

    return CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                                          num_attention_heads=2, out_channels=4, text_embed_dim=32,
                                          time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8)


def _cogview3plus_pipeline(transformer: "torch.nn.Module"):
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline

    return CogView3PlusPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                scheduler=CogVideoXDDIMScheduler())


coverage_family(
    "cogview3plus", "CogView3PlusTransformer2DModel", "CogView3PlusPipeline", _cogview3plus_transformer,
    _cogview3plus_pipeline, Embeds(32), dict(height=64, width=64, guidance_scale=5.0), "batched", (1, 4, 8, 8),
    **LATENT2D)


def _hunyuan_dit_transformer() -> "torch.nn.Module":
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                             sample_size=8, hidden_size=16, num_layers=4, cross_attention_dim=16,
                             cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=TEXT_LEN,
                             text_len_t5=TEXT_LEN)


def _hunyuan_dit_pipeline(transformer: "torch.nn.Module"):
    from diffusers import DDPMScheduler, HunyuanDiTPipeline

    return HunyuanDiTPipeline(vae=None, text_encoder=None, tokenizer=None, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)


coverage_family(
    "hunyuan_dit", "HunyuanDiT2DModel", "HunyuanDiTPipeline", _hunyuan_dit_transformer, _hunyuan_dit_pipeline,
    merged(Embeds(16, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
           Embeds(32, "prompt_embeds_2", "negative_prompt_embeds_2",
                  masks=("prompt_attention_mask_2", "negative_prompt_attention_mask_2"), offset=100)),
    dict(height=64, width=64, guidance_scale=5.0, use_resolution_binning=False), "batched", (1, 8, 8, 8),
    **LATENT2D)


def _ovis_transformer() -> "torch.nn.Module":
    from diffusers import OvisImageTransformer2DModel

    return OvisImageTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                                       num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def _ovis_pipeline(transformer: "torch.nn.Module"):
    from diffusers import OvisImagePipeline

    return OvisImagePipeline(scheduler=_flow_scheduler(use_dynamic_shifting=True), vae=None, text_encoder=None,
                             tokenizer=None, transformer=transformer)


coverage_family(
    "ovis_image", "OvisImageTransformer2DModel", "OvisImagePipeline", _ovis_transformer, _ovis_pipeline,
    Embeds(32), dict(height=64, width=64, guidance_scale=5.0, negative_prompt=None), "separate", (1, 16, 16),
    **PACKED)


# ---------------------------------------------------------------------------------------------------
# Lumina 2 (refiner blocks per stream, then joint [text, image] blocks; separate CFG outside cache_context)
# ---------------------------------------------------------------------------------------------------


def _lumina2_transformer() -> "torch.nn.Module":
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=4,
                                     num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                     axes_dim_rope=(4, 4, 4), cap_feat_dim=32)


def _lumina2_pipeline(transformer: "torch.nn.Module"):
    from diffusers import Lumina2Pipeline

    return Lumina2Pipeline(transformer=transformer, scheduler=_flow_scheduler(), vae=None, text_encoder=None,
                           tokenizer=None)


coverage_family(
    "lumina2", "Lumina2Transformer2DModel", "Lumina2Pipeline", _lumina2_transformer, _lumina2_pipeline,
    Embeds(32, masks=("prompt_attention_mask", "negative_prompt_attention_mask")),
    dict(height=64, width=64, guidance_scale=4.0), "separate", (1, 4, 8, 8), **LATENT2D)
