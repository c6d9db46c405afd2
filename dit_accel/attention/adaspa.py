"""AdaSpa block selection: exact block masses from a cached log-sum-exp, kept per head to a recall target.

AdaSpa (Xia, Ling, Fu, Wang, Li, Xiao, Cui 2025, "Training-free and Adaptive Sparse Attention for
Efficient Long Video Generation") observes that a video DiT's attention is *blockified* (block-sparse
at the granularity of token blocks), that the pattern and the rows' log-sum-exp (LSE) differ between
inputs, layers and heads but barely change across denoising steps, and turns that into an *online
precise search*: with each row's LSE known, one more pass over ``q k^T`` yields the exact attention
mass of every (q-block, kv-block) pair (no estimate, no second normalising pass; the "fused LSE-cached
search"), each head keeps the blocks that carry a target share of its mass (head-adaptive: a
concentrated head keeps few blocks, a diffuse one many), and the mask is reused on the following steps
until the next search.

Here, on a search step (a selection step of ``attention.sparse.refresh_interval``):

1. the dense kernel runs once on the (possibly reordered) tokens and returns its output and LSE; that
   output is the step's result, so a search step is exact;
2. :func:`dit_accel.kernels.block_mass.block_mass` turns that LSE into the exact masses
   ``M[b, h, qb, kb]`` (each row of the attention matrix sums to 1, so a head's masses sum to ``N``);
3. :func:`select_by_recall` keeps, per (batch, head), the smallest set of (q-block, kv-block) pairs whose
   mass reaches ``attention.sparse.recall`` of the head's total, plus
   every q-block's self block (:func:`dit_accel.attention.select.self_blocks`);
4. the sparse steps up to the next selection reuse that :class:`~dit_accel.attention.sparse.Selection`
   (the existing per-layer, per-CFG-branch reuse; no second mechanism).

The paper's own text was not available to us (only its abstract and summaries); this module implements
the reading above. Where we depart from it, or may:

* The LSE comes from a dense pass *of the search step itself* (exact masses for that step, and the
  step's output dense), not from the full attention of the previous step cached across steps: our
  warm-up steps run the model's own SDPA, which returns no LSE. The cost is the same two passes over
  ``q k^T`` per search (dense + masses), and the masses are exact rather than one step stale.
* Selection is per head over all its block pairs (head-adaptive density), not per q-block; a q-block
  may keep only its self block. ``attention.sparse.density`` (when set) instead keeps a fixed share of
  each head's block pairs, the highest-mass ones.
* Schedule: the searches happen at the first sparse step (after ``attention.warmup_steps`` dense
  steps) and then every ``refresh_interval`` sparse steps, per layer and CFG branch. The paper
  searches only a few times per generation; ``refresh_interval`` must therefore be above 1 (a search on
  every step would be slower than dense attention), e.g. 20 at 50 steps: two searches.
* The paper's hierarchy between modalities (text and video blocks) is the joint-attention wrapper's
  split here (:func:`dit_accel.attention.sparse.joint_attention`): text rows and columns are always
  dense, AdaSpa selects among the visual-visual blocks only.
* The default recall (0.95) is our choice (the paper's setting could not be checked).
"""

from __future__ import annotations

import math

import torch

from ..kernels.block_mass import block_mass, block_mass_reference
from ..kernels.block_sparse import dense_block_table


def select_by_recall(mass: torch.Tensor, recall: float, always: torch.Tensor | None = None,
                     density: float | None = None) -> torch.Tensor:
    """Bool ``[B, H, nq, nk]``: per (batch, head), the fewest highest-mass block pairs of ``mass``
    ``[B, H, nq, nk]`` whose sum reaches ``recall`` of the head's total (the pair that crosses it is kept;
    ``recall >= 1``: every pair). ``density``: the ``ceil(density * nq * nk)`` highest pairs instead.
    ``always`` (bool, broadcastable) is OR-ed in."""
    b, h, nq, nk = mass.shape
    flat = mass.reshape(b, h, nq * nk).float()
    if density is None and recall >= 1.0:
        mask = torch.ones_like(flat, dtype=torch.bool)
    else:
        order = torch.argsort(flat, dim=-1, descending=True)
        if density is not None:
            keep_sorted = (torch.arange(nq * nk, device=mass.device) < max(1, math.ceil(density * nq * nk)))
            keep_sorted = keep_sorted.expand_as(flat)
        else:
            ranked = torch.gather(flat, -1, order)
            before = torch.cumsum(ranked, dim=-1) - ranked   # mass of the better pairs
            keep_sorted = before < recall * flat.sum(-1, keepdim=True)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, keep_sorted)
    mask = mask.view(b, h, nq, nk)
    return mask | always if always is not None else mask


def search(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, always: torch.Tensor, block_size: int, scale: float,
           recall: float, density: float | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One AdaSpa search on (reordered) ``[B, H, N, D]`` tokens: ``(block mask, (dense out, dense lse))``.

    The dense pass runs through the block-sparse kernel with a full table (float32 LSE); the masses
    come from :func:`~dit_accel.kernels.block_mass.block_mass` with that LSE (its reference on CPU)."""
    from .sparse import run_kernel

    b, h, n, _ = q.shape
    nb = -(-n // block_size)
    tables = dense_block_table(b, h, n, block_size, block_size, device=q.device)
    full = torch.ones(b, h, nb, nb, dtype=torch.bool, device=q.device)
    out, lse = run_kernel(q, k, v, full, block_size, scale, "none", tables)
    mass_fn = block_mass if q.is_cuda else block_mass_reference  # CPU: the reference, as run_kernel (no interpreter)
    mass = mass_fn(q, k, lse, block_m=block_size, block_n=block_size, sm_scale=scale)
    return select_by_recall(mass, recall, always, density), (out, lse)


def search_result(request, selection, n: int, block_size: int):
    """The :class:`~dit_accel.attention.sparse.SparseResult` of a search step: the dense output kept in
    ``request.exact`` (cleared here), back in the input order, with every pair counted as computed."""
    from .sparse import SparseResult, _scatter

    out, lse = request.exact
    request.exact = None
    if selection.q_perm is not None:
        out = _scatter(out, selection.q_perm)
        lse = torch.empty_like(lse).scatter_(2, selection.q_perm, lse)
    b, h = out.shape[:2]
    total = float(b * h * n * n)
    return SparseResult(out=out, lse=lse, block_mask=selection.block_mask,
                        kept=torch.tensor(total, device=out.device), total=total)
