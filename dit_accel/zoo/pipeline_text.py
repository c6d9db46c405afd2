"""Pixel-space text-to-image and text-to-video pipelines of the text-conditional reference models.

Both run fully offline: the tokenizer and text encoder are the models' own (``text.py``), there is no VAE,
and the scheduler is ``FlowMatchEulerDiscreteScheduler`` (the transformers predict the flow velocity).
Classifier-free guidance follows the diffusers pipeline of each architecture, so that ``dit_accel``'s
adapters see the same call pattern as on the real models:

* :class:`TextToImagePipeline` (``SD3Transformer2DModel``): one transformer call per step on the batch
  ``[uncond, cond]``, like ``StableDiffusion3Pipeline``;
* :class:`TextToVideoPipeline` (``WanTransformer3DModel``): a conditional call, then an unconditional
  call per step, each inside ``transformer.cache_context("cond" / "uncond")``, like ``WanPipeline``.

The unconditional prompt is the empty string (the models were trained with 10 % empty captions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput

from .sampling import FlowSamplerMixin, to_output
from .text import encode_prompts, unknown_words

logger = logging.getLogger(__name__)  # under the "dit_accel" logger (dit_accel.logging)


@dataclass
class VideoPipelineOutput(BaseOutput):
    """``frames``: ``np`` ``[B, F, H, W, 3]`` in [0, 1], a list of lists of PIL frames, or a tensor."""

    frames: Any


class _TextPipelineMixin(FlowSamplerMixin):
    """Prompt handling and the sampler loop shared by the two text-conditional pipelines."""

    def _register_text_components(self, transformer, scheduler, text_encoder, tokenizer) -> None:
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.defaults = dict(self.fallback_defaults)
        self._warned_words: set[str] = set()

    def _prompts(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty")
        if negative_prompt is None:
            negative_prompt = ""
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return prompts, negatives

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [B, L, D], pooled [B, D])`` in ``dtype``. Words outside the model's small vocabulary
        are encoded as ``[UNK]``; a warning names them (once per word and pipeline)."""
        unknown = [w for w in unknown_words(self.tokenizer, prompts) if w not in self._warned_words]
        if unknown:
            self._warned_words.update(unknown)
            logger.warning("dit_accel.zoo: %s not in this model's vocabulary (encoded as [UNK]); known words: "
                           "pipe.tokenizer.get_vocab()", ", ".join(repr(w) for w in unknown))
        hidden, pooled = encode_prompts(self.tokenizer, self.text_encoder, prompts, device)
        return hidden.to(dtype), pooled.to(dtype)

class TextToImagePipeline(_TextPipelineMixin, DiffusionPipeline):
    r"""Text-to-image with an MM-DiT (``SD3Transformer2DModel``): ``pipe("a photo of a cat").images``.

    Components: ``transformer``, ``scheduler``, ``text_encoder`` (``CLIPTextModel``), ``tokenizer``
    (``PreTrainedTokenizerFast``). Guidance is batched ``[uncond, cond]`` as in ``StableDiffusion3Pipeline``.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    fallback_defaults = {"num_inference_steps": 28, "guidance_scale": 2.0}

    def __init__(self, transformer, scheduler: FlowMatchEulerDiscreteScheduler, text_encoder, tokenizer):
        super().__init__()
        self._register_text_components(transformer, scheduler, text_encoder, tokenizer)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""One image per prompt.

        Args:
            prompt: text(s) in the model's vocabulary (``pipe.tokenizer.get_vocab()``; other words are ``[UNK]``).
            negative_prompt: unconditional text (default ``""``, what the model was trained with).
            num_inference_steps, guidance_scale: Euler steps and CFG scale ``v = v_u + w (v_c - v_u)``
                (``w <= 1``: conditional branch alone); defaults from ``pipe.defaults``.
            output_type: ``"pil"``, ``"np"`` (``B x H x W x 3`` in [0, 1]), ``"pt"`` (``B x 3 x H x W`` in [0, 1])
                or ``"raw"`` (model space).
            height, width: image size (default: the training size ``sample_size``; other sizes are out of
                distribution).
        """
        steps, scale = self._settings(num_inference_steps, guidance_scale)
        prompts, negatives = self._prompts(prompt, negative_prompt)
        device, tr = self._execution_device, self.transformer
        do_cfg = scale > 1.0
        hidden, pooled = self.encode_prompt(negatives + prompts if do_cfg else prompts, device, tr.dtype)
        size, channels = int(tr.config.sample_size), int(tr.config.in_channels)
        x = self._initial((len(prompts), channels, height or size, width or size), generator, latents, device,
                          tr.dtype)

        def velocity(x: torch.Tensor, t: torch.Tensor, cfg: bool) -> torch.Tensor:
            x_in = torch.cat([x, x]) if cfg else x
            v = tr(hidden_states=x_in, encoder_hidden_states=hidden, pooled_projections=pooled,
                   timestep=t.expand(x_in.shape[0]), return_dict=False)[0]
            if not cfg:
                return v
            v_u, v_c = v.chunk(2)
            return v_u + scale * (v_c - v_u)

        x = self._sample(x, steps, scale, velocity, callback_on_step_end)
        images = to_output(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class TextToVideoPipeline(_TextPipelineMixin, DiffusionPipeline):
    r"""Text-to-video with a Wan-style DiT (``WanTransformer3DModel``): ``pipe("the digit 3 bouncing").frames``.

    Guidance runs as two transformer calls per step, conditional first, as in ``WanPipeline``.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    fallback_defaults = {"num_inference_steps": 28, "guidance_scale": 3.0}

    def __init__(self, transformer, scheduler: FlowMatchEulerDiscreteScheduler, text_encoder, tokenizer):
        super().__init__()
        self._register_text_components(transformer, scheduler, text_encoder, tokenizer)
        self.video_size = (16, 32, 32)  # frames, height, width of the training clips

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ) -> VideoPipelineOutput | tuple:
        r"""One clip per prompt (default 16 frames of 32 x 32, the training size; other sizes work through
        the 3D RoPE but are out of distribution).

        ``output_type``: ``"np"`` (``[B, F, H, W, 3]`` in [0, 1]), ``"pil"`` (list of lists of frames),
        ``"pt"`` (``[B, C, F, H, W]`` in [0, 1]) or ``"raw"`` (model space).
        """
        steps, scale = self._settings(num_inference_steps, guidance_scale)
        prompts, negatives = self._prompts(prompt, negative_prompt)
        device, tr = self._execution_device, self.transformer
        f, h, w = num_frames or self.video_size[0], height or self.video_size[1], width or self.video_size[2]
        pt, ph, pw = tr.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"(frames, height, width) = {(f, h, w)} must be multiples of the patch size "
                             f"{(pt, ph, pw)}")
        cond, _ = self.encode_prompt(prompts, device, tr.dtype)
        uncond = self.encode_prompt(negatives, device, tr.dtype)[0] if scale > 1.0 else None
        x = self._initial((len(prompts), int(tr.config.in_channels), f, h, w), generator, latents, device, tr.dtype)

        def velocity(x: torch.Tensor, t: torch.Tensor, cfg: bool) -> torch.Tensor:
            t_in = t.expand(x.shape[0])
            # named branches, as WanPipeline: caches and step counters stay per branch (diffusers' CacheMixin)
            with tr.cache_context("cond"):
                v_c = tr(hidden_states=x, timestep=t_in, encoder_hidden_states=cond, return_dict=False)[0]
            if not cfg:
                return v_c
            with tr.cache_context("uncond"):
                v_u = tr(hidden_states=x, timestep=t_in, encoder_hidden_states=uncond, return_dict=False)[0]
            return v_u + scale * (v_c - v_u)

        x = self._sample(x, steps, scale, velocity, callback_on_step_end)
        frames = self.postprocess_video(x, output_type)
        return VideoPipelineOutput(frames=frames) if return_dict else (frames,)

    @staticmethod
    def postprocess_video(x: torch.Tensor, output_type: str = "np"):
        """Model space ``[B, C, F, H, W]`` -> ``output_type`` (``raw``, ``pt``, ``np``, ``pil``)."""
        return to_output(x, output_type)
