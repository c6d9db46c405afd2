"""Synthetic queries and keys with video-DiT-like attention structure (tests and benchmarks).

Each token sits on an (F, H, W) grid. Its query and key are random Fourier features of its
coordinates (Rahimi & Recht 2007), so ``q_i . k_j`` approximates a Gaussian kernel of the distance
between tokens i and j with per-axis length scales; a head's *kind* sets those scales:

* ``"temporal"``: same spatial location across all frames (broad in F, sharp in H and W) — the
  stripes that PARO's "hwf"-type orders make block-diagonal;
* ``"spatial"``: a neighbourhood inside the same frame (sharp in F, local in H and W);
* ``"row"``: the same frame and row (sharp in F and H, broad in W);
* ``"local"``: a small 3-D neighbourhood;
* ``"semantic"``: the tokens of the same object anywhere in the clip (weak positional term).

A semantic term (shared by q and k, weight ``semantic``; 2.5 for semantic heads) assigns tokens to
``objects`` — Voronoi regions of random centres in (H, W), the same in every frame — which SVG2's
k-means can find. Values are standard normal.
"""

from __future__ import annotations

import math

import torch

KINDS = ("temporal", "spatial", "row", "local", "semantic")
_SCALES = {  # length scales (f, h, w) in tokens; inf = no dependence on the axis
    "temporal": (math.inf, 0.7, 0.7),
    "spatial": (0.3, 2.0, 2.0),
    "row": (0.3, 0.3, math.inf),
    "local": (1.0, 1.0, 1.0),
    "semantic": (8.0, 8.0, 8.0),
}
_SEMANTIC_WEIGHT = 2.5


def grid_coordinates(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Float ``[F*H*W, 3]`` (f, h, w) coordinates in row-major token order."""
    f, h, w = grid
    mesh = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([m.flatten() for m in mesh], -1).float().to(device)


def structured_qkv(grid: tuple[int, int, int], heads: int, head_dim: int, *, batch: int = 1,
                   kinds: tuple[str, ...] | None = None, sharpness: float = 12.0, semantic: float = 0.5,
                   objects: int = 8, noise: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, N, D]`` (see the module docstring). ``kinds`` per head cycles through
    :data:`KINDS` by default; ``sharpness`` is the largest logit (after the 1/sqrt(D) scale)."""
    g = torch.Generator().manual_seed(seed)
    kinds = kinds or tuple(KINDS[i % len(KINDS)] for i in range(heads))
    if len(kinds) != heads or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds: expected {heads} of {KINDS}, got {kinds}")
    coords = grid_coordinates(grid)
    n = coords.shape[0]
    centres = torch.rand(objects, 2, generator=g) * torch.tensor([grid[1], grid[2]]).float()
    labels = torch.cdist(coords[:, 1:], centres).argmin(-1)
    amplitude = math.sqrt(sharpness * math.sqrt(head_dim))
    qs, ks = [], []
    for kind in kinds:
        inv = torch.tensor([0.0 if math.isinf(s) else 1.0 / s for s in _SCALES[kind]])
        omega = torch.randn(3, head_dim, generator=g) * inv.view(3, 1)
        phase = torch.rand(head_dim, generator=g) * 2 * math.pi
        phi = math.sqrt(2.0 / head_dim) * torch.cos(coords @ omega + phase)               # [N, D]
        sem = torch.randn(objects, head_dim, generator=g) / math.sqrt(head_dim)
        base = phi + (_SEMANTIC_WEIGHT if kind == "semantic" else semantic) * sem[labels]
        qs.append(amplitude * base + noise * torch.randn(batch, n, head_dim, generator=g))
        ks.append(amplitude * base + noise * torch.randn(batch, n, head_dim, generator=g))
    q = torch.stack(qs, 1)
    k = torch.stack(ks, 1)
    v = torch.randn(batch, heads, n, head_dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]
