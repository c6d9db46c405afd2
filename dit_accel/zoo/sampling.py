"""What the reference-model pipelines share: the flow-matching sampler loop with classifier-free guidance
settings and initial noise, and the conversion of model-space outputs (images or clips) to the requested type."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


class FlowSamplerMixin:
    """For a ``DiffusionPipeline`` with a ``scheduler`` (``FlowMatchEulerDiscreteScheduler``, or any scheduler
    whose ``step`` takes the network's prediction and needs no input scaling, e.g. ``DDIMScheduler``) and ``defaults``
    (``num_inference_steps``, ``guidance_scale``; ``fallback_defaults`` when a key is missing)."""

    fallback_defaults: dict = {"num_inference_steps": 28, "guidance_scale": 2.0}

    def _settings(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        defaults = {**self.fallback_defaults, **(getattr(self, "defaults", None) or {})}
        steps = int(num_inference_steps if num_inference_steps is not None else defaults["num_inference_steps"])
        scale = float(guidance_scale if guidance_scale is not None else defaults["guidance_scale"])
        return steps, scale

    def _initial(self, shape: tuple, generator, latents, device, dtype) -> torch.Tensor:
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)  # DDIM: 1.0; FlowMatchEuler has none
            return noise if sigma == 1.0 else noise * sigma
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype)

    def _sample(self, latents: torch.Tensor, steps: int, guidance_scale: float,
                velocity: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
                callback_on_step_end: Callable | None) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=latents.device)
        self._num_timesteps = len(self.scheduler.timesteps)
        self._guidance_scale = guidance_scale
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            v = velocity(latents, t, guidance_scale > 1.0)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = out.get("latents", latents)
        self.maybe_free_model_hooks()
        return latents


def to_output(x: torch.Tensor, output_type: str):
    """Model-space images ``[B, C, H, W]`` or clips ``[B, C, F, H, W]`` (about [-1, 1]) as ``output_type``:
    ``"raw"`` (unchanged), ``"pt"`` (float in [0, 1], same layout), ``"np"`` (channels last, grey as RGB:
    ``[B, H, W, 3]`` / ``[B, F, H, W, 3]``) or ``"pil"`` (list of images / list of lists of frames)."""
    if output_type == "raw":
        return x
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x
    arr = x.movedim(1, -1).cpu().numpy()
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if output_type == "np":
        return arr
    if output_type == "pil":
        u8 = (arr * 255).round().astype(np.uint8)
        if u8.ndim == 4:
            return [Image.fromarray(a) for a in u8]
        return [[Image.fromarray(fr) for fr in clip] for clip in u8]
    raise ValueError(f"unknown output_type {output_type!r} (pil, np, pt, raw)")
