"""Token-grid helpers shared by the adapters: (frames, height, width) in tokens from latents."""

from __future__ import annotations

import torch


def _pair(p) -> tuple[int, int]:
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


def image_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """Latents [B, C, H, W] patchified by ``config.patch_size``."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    ph, pw = _pair(transformer.config.patch_size)
    return 1, x.shape[-2] // ph, x.shape[-1] // pw


def video_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict, frames_dim: int = 2) -> tuple[int, int, int]:
    """Latents [B, C, F, H, W] (``frames_dim=2``) or [B, F, C, H, W] (``frames_dim=1``)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    cfg = transformer.config
    patch = cfg.patch_size
    if isinstance(patch, (tuple, list)) and len(patch) == 3:
        pt, ph, pw = patch
    else:
        pt = getattr(cfg, "patch_size_t", None) or 1
        ph, pw = _pair(patch)
    return x.shape[frames_dim] // pt, x.shape[-2] // ph, x.shape[-1] // pw


def packed_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """Flux-style packed tokens: the grid is read from ``img_ids`` (one host sync; call once per shape)."""
    ids = kwargs.get("img_ids")
    if ids is None:
        raise ValueError("img_ids is needed to know the token grid of a packed (Flux-style) call")
    ids = ids[0] if ids.ndim == 3 else ids
    return 1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
