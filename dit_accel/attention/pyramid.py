"""PSA level assignment: which pyramid level each (q-block, kv-block) pair is computed at.

PSA (Li, Gu, Lin, Wang & Zhuang, "PSA: Pyramid Sparse Attention for Efficient Video Understanding and
Generation", 2025) gives every q-block a multi-level mask over the kv-blocks instead of a keep/skip mask:
the most important blocks at full resolution, the next ones with 2x, 4x, 8x mean-pooled keys/values, the
rest skipped (the kernel and its maths: :mod:`dit_accel.kernels.pyramid`). Per q-block row, blocks are
ranked by an importance score and the ranked list is cut at four cumulative bounds
``full <= pool2 <= pool4 <= pool8`` (``attention.psa``), in one of the paper's two modes:

* ``threshold`` (the paper's "threshold bound", used in its video-generation configurations): a block
  goes to the finest level whose bound exceeds the normalised score mass of the better-ranked blocks
  (so the block that crosses a bound still gets that level — the rule of
  :func:`~dit_accel.attention.select.select_blocks`);
* ``quota`` (its "top-k"): the first ``ceil(full * nk)`` ranked blocks are full, up to ``ceil(pool2 * nk)``
  2x, and so on, a fixed budget per row.

In both, at least ``ceil(min_full * nk)`` blocks of a row are full (the reference implementation's minimum
full share, 0.08), and each q-block's self block (:func:`~dit_accel.attention.select.self_blocks`) is always
full. The defaults are the paper's published "balanced" configuration for Wan2.1-14B (threshold mode,
bounds 0.4 / 0.5 / 0.6 / 0.8).

Departures: importance comes from this package's scorers (:func:`~dit_accel.attention.select.xattention_scores`
by default, or the pooled / SVG2-centroid scores) instead of the paper's maximum over randomly sampled
query-key products; its optional cosine-similarity cap on a block's pooling level is not implemented (off
in its published configurations); its rounding of level intervals to the kernel's tile is not needed (our
kernel gathers short pooled blocks, :mod:`dit_accel.kernels._pyramid_triton`).
"""

from __future__ import annotations

import math

import torch

from ..kernels.block_sparse import SUPPORTED_HEAD_DIMS
from ..kernels.pyramid import (PYRAMID_LEVELS, pyramid_attention, pyramid_attention_reference, pyramid_pair_counts,
                               pyramid_table)
from .config import PSAConfig
from .select import pooled_scores, xattention_scores

__all__ = ["assign_levels", "psa_levels", "run_psa"]


def assign_levels(scores: torch.Tensor, psa: PSAConfig, always: torch.Tensor | None = None) -> torch.Tensor:
    """int8 level map ``[B, H, nq, nk]`` (0 full ... 3 = 8x pooled, ``-1`` skipped) from row-normalised block
    ``scores`` ``[B, H, nq, nk]`` by ``psa``'s mode and bounds (module docstring); ``always`` (bool,
    broadcastable) forces full resolution."""
    nk = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, descending=True)
    bounds = (psa.full, psa.pool2, psa.pool4, psa.pool8)
    rank = torch.arange(nk, device=scores.device)
    if psa.mode == "quota":
        position = rank.expand_as(scores)  # ranked position, compared with ceil(bound * nk)
        limits = [min(nk, math.ceil(b * nk - 1e-9)) for b in bounds]
        level_sorted = torch.full_like(order, -1)
        for level in reversed(range(PYRAMID_LEVELS)):
            level_sorted = torch.where(position < limits[level], level, level_sorted)
    else:
        sorted_scores = torch.gather(scores, -1, order)
        before = torch.cumsum(sorted_scores, dim=-1) - sorted_scores   # mass of the better-ranked blocks
        total = sorted_scores.sum(-1, keepdim=True)
        level_sorted = torch.full_like(order, -1)
        for level in reversed(range(PYRAMID_LEVELS)):
            level_sorted = torch.where(before < bounds[level] * total, level, level_sorted)
    min_full = math.ceil(psa.min_full * nk - 1e-9)
    if min_full:
        level_sorted = torch.where(rank < min_full, 0, level_sorted)
    levels = torch.empty_like(level_sorted).scatter_(-1, order, level_sorted)
    if always is not None:
        levels = torch.where(always, 0, levels)
    return levels.to(torch.int8)


def psa_levels(qp: torch.Tensor, kp: torch.Tensor, psa: PSAConfig, block_size: int, stride: int, scale: float,
               always: torch.Tensor | None = None, centroid_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Score the blocks of (permuted) q, k ``[B, H, N, D]`` with ``psa.scorer`` and assign levels.
    ``centroid_scores``: SVG2's centroid block scores, used by the ``pooled`` scorer when given."""
    if psa.scorer == "pooled":
        scores = centroid_scores if centroid_scores is not None else pooled_scores(qp, kp, block_size, scale)
    else:
        scores = xattention_scores(qp, kp, block_size, stride, scale)
    return assign_levels(scores, psa, always)


def _padded_head_dim(d: int) -> int:
    for size in SUPPORTED_HEAD_DIMS:
        if size >= d:
            return size
    raise ValueError(f"head dim {d} is larger than the pyramid kernel supports ({max(SUPPORTED_HEAD_DIMS)})")


def run_psa(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, levels: torch.Tensor, block_size: int,
            scale: float, tables: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """Pyramid attention of (permuted) q, k, v ``[B, H, N, D]`` over a level map: ``(out, lse, kept, tables)``,
    ``kept`` the query-key pairs computed (a pooled key counting once, :func:`pyramid_pair_counts`),
    ``tables`` the pyramid table (pass it back to reuse it). Head dims the kernel lacks are zero-padded.
    CUDA: the Triton kernel; CPU: its PyTorch reference."""
    d = qp.shape[-1]
    dp = _padded_head_dim(d)
    q, k, v = qp, kp, vp
    if dp != d:
        q, k, v = (torch.nn.functional.pad(t, (0, dp - d)) for t in (q, k, v))
    if tables is None:
        tables = pyramid_table(levels)
    kernel = pyramid_attention if q.is_cuda else pyramid_attention_reference
    out, lse = kernel(q, k, v, *tables, block_m=block_size, block_n=block_size, sm_scale=scale, return_lse=True,
                      validate=False)
    return out[..., :d], lse, pyramid_pair_counts(levels, qp.shape[2], block_size, block_size), tables
