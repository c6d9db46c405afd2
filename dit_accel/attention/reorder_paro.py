"""PARO token reordering (PAROAttention, Zhao et al. 2025): a per-(layer, head) permutation of the
visual tokens that turns a head's scattered but regular attention pattern into a block-dense one.

Video DiT heads attend along one axis of the (F, H, W) token grid (e.g. the same spatial location
across frames). In the row-major F-H-W order that pattern is a set of stripes; reading the grid in
the order that puts the attended axis innermost makes it block-diagonal. PARO therefore tries the
6 orders of the three axes (2 for images: F = 1 leaves only H-W and W-H) per head, chosen offline
from sampled attention maps, and uses the same permutation for queries and keys (so the diagonal
block is the self block). Order names list the axes outermost first: ``"fhw"`` is the identity.

Beyond the paper: ``"tile"`` groups the grid into local 3-D tiles of about ``block_size`` tokens
(one tile per block), for heads whose attention is local in every axis. The selection metric
(``dit_accel.calibration.attention``) is the output error of keeping the target share of blocks in that
order on sampled query blocks (or, without values, the block density needed to keep ``threshold`` of
the attention mass), and the natural order stays unless another beats it by a 5 % margin (PARO
weighs sparsity and the quantisation error of each block instead).
"""

from __future__ import annotations

import itertools
import math

import torch

ORDERS: tuple[str, ...] = tuple("".join(p) for p in itertools.permutations("fhw")) + ("tile",)
IMAGE_ORDERS: tuple[str, ...] = ("fhw", "fwh", "tile")


def candidate_orders(grid: tuple[int, int, int]) -> tuple[str, ...]:
    """The orders worth trying for a grid (6 axis orders + tile for video, 2 + tile for images)."""
    return ORDERS if grid[0] > 1 else IMAGE_ORDERS


def tile_shape(grid: tuple[int, int, int], block_size: int) -> tuple[int, int, int]:
    """Power-of-two (tf, th, tw) with product ``block_size`` (as near cubic as the grid allows)."""
    dims = [1, 1, 1]
    caps = [max(1, g) for g in grid]
    axis_order = (1, 2, 0)  # grow h, w, then f: spatial neighbours first
    remaining = block_size
    while remaining > 1:
        grown = False
        for a in axis_order:
            if remaining > 1 and dims[a] * 2 <= caps[a]:
                dims[a] *= 2
                remaining //= 2
                grown = True
        if not grown:
            break
    return tuple(dims)  # type: ignore[return-value]


def order_permutation(grid: tuple[int, int, int], order: str, block_size: int = 64,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Long ``[F*H*W]``: ``perm[i]`` is the row-major (f, h, w) index of the i-th token in ``order``."""
    f, h, w = grid
    n = f * h * w
    idx = torch.arange(n, device=device).reshape(f, h, w)
    if order == "tile":
        tf, th, tw = tile_shape(grid, block_size)
        fi, hi, wi = torch.meshgrid(torch.arange(f, device=device), torch.arange(h, device=device),
                                    torch.arange(w, device=device), indexing="ij")
        nth, ntw = math.ceil(h / th), math.ceil(w / tw)
        tile = ((fi // tf) * nth + hi // th) * ntw + wi // tw
        inner = ((fi % tf) * th + hi % th) * tw + wi % tw
        key = (tile * (tf * th * tw) + inner).flatten()
        return torch.argsort(key, stable=True)
    if order not in ORDERS:
        raise ValueError(f"unknown PARO order {order!r}; choose one of {list(ORDERS)}")
    axes = ["fhw".index(c) for c in order]
    return idx.permute(*axes).flatten()


def head_permutations(grid: tuple[int, int, int], orders: tuple[str, ...], block_size: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Long ``[H, N]``: one permutation per head (heads sharing an order share the tensor's values)."""
    cache: dict[str, torch.Tensor] = {}
    rows = []
    for order in orders:
        if order not in cache:
            cache[order] = order_permutation(grid, order, block_size, device)
        rows.append(cache[order])
    return torch.stack(rows)


def sequence_permutation(head_perm: torch.Tensor, visual: slice, seq: int) -> torch.Tensor:
    """Long ``[H, seq]``: ``head_perm`` ``[H, N]`` (visual token order per head) applied to the visual tokens
    ``visual`` of a sequence of ``seq`` tokens, every other (text) token kept in place. For a quantized dense
    call, which covers all tokens in one kernel call: the visual part is reordered within the sequence."""
    h, n = head_perm.shape
    if visual.stop - visual.start != n or visual.stop > seq:
        raise ValueError(f"sequence_permutation: {n} visual tokens do not fit slice {visual} of {seq} tokens")
    full = torch.arange(seq, device=head_perm.device).unsqueeze(0).repeat(h, 1)
    full[:, visual] = head_perm + visual.start
    return full
