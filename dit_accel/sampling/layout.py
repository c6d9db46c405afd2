"""How a pipeline lays out its latents, for drivers that call it several times at different resolutions.

A sampler-level driver (:mod:`dit_accel.sampling.bottleneck`) works on the latent *grid*
``[B, C, H, W]`` (images) or ``[B, C, F, H, W]`` (video) and hands each pipeline call ``latents=`` in the
pipeline's own layout together with the matching size arguments (``height`` / ``width`` in pixels). What
differs between pipelines, and is read from the pipeline rather than from a list of classes:

* **packing**: a pipeline with the static ``_pack_latents`` / ``_unpack_latents`` pair (FLUX.1 and its
  derivatives) takes 2×2-packed latents ``[B, H/2·W/2, 4C]``; its own methods convert (the token
  positions, ``img_ids``, are rebuilt by the pipeline from ``height`` / ``width``);
* **pixels per latent**: ``vae_scale_factor_spatial`` (Wan), else ``vae_scale_factor``, else 1 (the
  pixel-space reference models);
* **latent frames** of a video: ``(num_frames − 1) // vae_scale_factor_temporal + 1`` (Wan's causal VAE),
  or ``num_frames`` for a pipeline without a temporal VAE factor;
* **the output type that returns latents**: ``"raw"`` for the reference models (model space), ``"latent"``
  for diffusers pipelines.

Only spatial sizes change between stages; video frames are kept. Sizes are rounded to multiples of the
transformer's spatial patch (×2 when packed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..config import PolicyError

BATCH_ARGUMENTS = ("prompt", "class_labels")  # the argument whose length is the batch
PER_PROMPT_ARGUMENTS = ("num_images_per_prompt", "num_videos_per_prompt")


def _call_default(pipe: Any, name: str) -> Any:
    try:
        parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def accepts(pipe: Any, name: str) -> bool:
    """Whether ``pipe.__call__`` takes an argument ``name``."""
    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True)
class LatentLayout:
    """The latent layout of one pipeline (see the module docstring)."""

    channels: int
    video: bool
    packed: bool
    pixels_per_latent: int
    temporal_factor: int | None
    patch: int  # latent multiple of every spatial size (the patch, x2 when packed)
    latent_output: str  # the output_type that returns latents

    @classmethod
    def of(cls, pipe: Any) -> "LatentLayout":
        transformer = getattr(pipe, "transformer", None)
        config = getattr(transformer, "config", None)
        if config is None or "in_channels" not in config:
            raise PolicyError(f"{type(pipe).__name__}: expected a pipeline with a transformer whose config has "
                              "in_channels")
        packed = callable(getattr(pipe, "_pack_latents", None)) and callable(getattr(pipe, "_unpack_latents", None))
        patch_size = config.get("patch_size", 1) or 1
        video = isinstance(patch_size, (tuple, list)) and len(patch_size) == 3
        spatial = int(patch_size[-1]) if isinstance(patch_size, (tuple, list)) else int(patch_size)
        channels = int(config["in_channels"]) // (4 if packed else 1)
        ppl = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 1
        temporal = getattr(pipe, "vae_scale_factor_temporal", None) if video else None
        from ..zoo.sampling import FlowSamplerMixin

        latent_output = "raw" if isinstance(pipe, FlowSamplerMixin) else "latent"
        return cls(channels, video, packed, int(ppl), int(temporal) if temporal else None,
                   spatial * (2 if packed else 1), latent_output)

    # ---- sizes ----------------------------------------------------------------------------------
    def requested_size(self, pipe: Any, kwargs: dict) -> tuple[int, int, int | None]:
        """(height, width, num_frames) in pixels of the call ``kwargs`` describe (pipeline defaults filled)."""
        def value(name: str) -> Any:
            v = kwargs.get(name)
            return v if v is not None else _call_default(pipe, name)

        height, width = value("height"), value("width")
        frames = value("num_frames") if self.video else None
        video_size = getattr(pipe, "video_size", None)  # the reference video model: (frames, height, width)
        if video_size is not None:
            frames, height, width = frames or video_size[0], height or video_size[1], width or video_size[2]
        if height is None or width is None:
            default = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.get("sample_size")
            if default is None:
                raise PolicyError(f"{type(pipe).__name__}: pass height= and width= (no default size found)")
            height = height or int(default) * self.pixels_per_latent
            width = width or int(default) * self.pixels_per_latent
        if self.video and frames is None:
            raise PolicyError(f"{type(pipe).__name__}: pass num_frames= (no default found)")
        return int(height), int(width), (int(frames) if frames is not None else None)

    def grid_shape(self, batch: int, height: int, width: int, frames: int | None) -> tuple[int, ...]:
        """The latent grid ``[B, C, (F,) H, W]`` of a call at this pixel size."""
        h, w = height // self.pixels_per_latent, width // self.pixels_per_latent
        if h % self.patch or w % self.patch or h < self.patch or w < self.patch:
            raise PolicyError(f"size {height}x{width} gives a {h}x{w} latent grid; it must be a positive multiple "
                              f"of {self.patch} latents ({self.patch * self.pixels_per_latent} pixels) per side")
        if not self.video:
            return (batch, self.channels, h, w)
        f = (frames - 1) // self.temporal_factor + 1 if self.temporal_factor else frames
        return (batch, self.channels, f, h, w)

    def scaled_hw(self, grid: tuple[int, ...], scale: float) -> tuple[int, int]:
        """The latent (H, W) of a stage at ``scale`` of ``grid``'s sides, rounded to the patch multiple."""
        out = []
        for side in grid[-2:]:
            n = max(1, int(round(side * scale / self.patch))) * self.patch
            out.append(min(n, side))
        return out[0], out[1]

    def size_arguments(self, grid: tuple[int, ...], frames: int | None) -> dict:
        """The pixel-size call arguments of a call on latents of shape ``grid``."""
        out = {"height": grid[-2] * self.pixels_per_latent, "width": grid[-1] * self.pixels_per_latent}
        if self.video and frames is not None:
            out["num_frames"] = frames
        return out

    # ---- conversions ----------------------------------------------------------------------------
    def to_pipeline(self, pipe: Any, grid: torch.Tensor) -> torch.Tensor:
        """Grid latents in the layout ``pipe(latents=...)`` takes."""
        if not self.packed:
            return grid
        b, c, h, w = grid.shape
        return pipe._pack_latents(grid, b, c, h, w)

    def from_pipeline(self, pipe: Any, latents: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Latents a pipeline returned (its layout) as a grid of shape ``grid``."""
        if self.packed:
            latents = pipe._unpack_latents(latents, grid[-2] * self.pixels_per_latent,
                                           grid[-1] * self.pixels_per_latent, self.pixels_per_latent)
        if tuple(latents.shape) != tuple(grid):
            raise RuntimeError(f"{type(pipe).__name__} returned latents of shape {tuple(latents.shape)}, expected "
                               f"{tuple(grid)}")
        return latents

    def initial_noise(self, grid: tuple[int, ...], generator: Any, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
        """Gaussian noise on the grid, drawn as the pipelines draw theirs (the same generator gives the same noise
        as a plain call)."""
        return randn_tensor(grid, generator=generator, device=device, dtype=dtype)


def resize(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Spatially resize a grid ``[B, C, H, W]`` or ``[B, C, F, H, W]`` (frames kept) with
    ``torch.nn.functional.interpolate``."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    kwargs = {} if mode in ("area", "nearest", "nearest-exact") else {"align_corners": False}
    if x.ndim == 5:
        b, c, f, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        out = F.interpolate(flat.float(), size=hw, mode=mode, **kwargs).to(x.dtype)
        return out.reshape(b, f, c, *hw).permute(0, 2, 1, 3, 4).contiguous()
    return F.interpolate(x.float(), size=hw, mode=mode, **kwargs).to(x.dtype)


def resize_noise(noise: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Gaussian noise resized by area averaging and rescaled to unit variance (an average of k i.i.d. unit
    Gaussians has variance 1/k)."""
    if tuple(noise.shape[-2:]) == tuple(hw):
        return noise
    ratio = (noise.shape[-2] * noise.shape[-1]) / (hw[0] * hw[1])
    return resize(noise, hw, "area") * ratio ** 0.5


def batch_size(kwargs: dict) -> int:
    """Samples of one call: the length of its prompt / class labels times the per-prompt count."""
    batch = 1
    for name in BATCH_ARGUMENTS:
        value = kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, (str, int)):
            batch = 1
        elif isinstance(value, torch.Tensor):
            batch = value.numel()
        else:
            batch = len(value)
        break
    for name in PER_PROMPT_ARGUMENTS:
        if kwargs.get(name):
            batch *= int(kwargs[name])
    return batch
