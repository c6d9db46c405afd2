"""ProxyAttn block selection: a few pooled proxy heads rank the kv-blocks, each head keeps its own budget.

ProxyAttn (Wang, He, Bao, Wu, Wang, Zhu, Che, "ProxyAttn: Guided Sparse Attention via Representative
Heads", arXiv 2509.24745, 2025) rests on two observations about multi-head attention over long
sequences: the heads largely attend to the same tokens, but differ in how sparse they are. So the
expensive, fine-grained block scoring is done on ``G`` *proxy heads* only (heads pooled group by
group, compressing the head dimension rather than the sequence), their ranking of the kv-blocks is
broadcast to the member heads, and each head keeps as many blocks as its *own* cheap block-level
estimate says it needs (the paper's block-aware dynamic budget). Selection cost then scales with
``G`` instead of ``H`` — the scorer for wide models (HunyuanVideo's 24 heads, Wan-14B's 40).

What is computed here (:func:`proxy_select`), per batch element:

* **Groups**: ``G = attention.sparse.proxy_heads`` contiguous groups of heads (sizes differing by at
  most one when ``G`` does not divide ``H``); proxy ``g``'s query and key are the mean of its members'
  queries and keys, token by token (:func:`pool_heads`).
* **Proxy scores**: the fine-grained block scores of the ``G`` proxy heads, by XAttention's strided
  antidiagonals (:func:`dit_accel.attention.select.xattention_scores`, the fused Triton kernel on CUDA)
  at ``attention.sparse.stride``; ``stride: 1`` makes them the exact token-level block masses of the
  proxy heads, the paper's estimate.
* **Per-head budget**: head ``h``'s q-block keeps ``n_h`` kv-blocks, the fewest whose share of the
  head's own mean-pooled block scores (:func:`dit_accel.attention.select.pooled_scores`, cheap:
  ``nq x nk`` products per head) reaches ``attention.sparse.threshold``; with ``density`` every head
  keeps the same ``ceil(density * nk)``.
* **Mask**: head ``h`` keeps the ``n_h`` best blocks in its proxy's ranking, plus its self block.

Departures, and readings: the paper's full text was not available here, only its abstract and
summaries; the above is our reading of "pooled representative heads" (contiguous groups, mean
pooling of q and k — not groups calibrated offline by head similarity) and of the "block-aware
dynamic budget" (the count of blocks a head's own pooled block scores need to reach the threshold).
The paper scores with exact token-level products; the default here is the strided antidiagonal
estimate of those products (``stride`` 8), ``stride: 1`` is the exact one. The paper targets causal
LLM prefill; DiT attention is bidirectional, so there is no causal mask. Token reordering (PARO,
SVG2) permutes each head differently, so heads cannot be pooled token by token: ``reorder`` must be
``none`` with this method (checked when the config is loaded).
"""

from __future__ import annotations

import math

import torch

from .select import pooled_scores, xattention_scores


def check_proxy_heads(proxy_heads: int, heads: int) -> None:
    """ValueError naming ``attention.sparse.proxy_heads`` unless ``1 <= proxy_heads <= heads``."""
    if isinstance(proxy_heads, bool) or not isinstance(proxy_heads, int) or not 1 <= proxy_heads <= heads:
        raise ValueError(f"attention.sparse.proxy_heads: {proxy_heads!r} proxy heads for a layer of {heads} heads; "
                         f"choose 1 <= proxy_heads <= {heads} (a divisor of {heads} gives equal groups)")


def group_of_heads(heads: int, proxy_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Long ``[H]``: the proxy (contiguous group) of each head; with ``G`` not dividing ``H`` the first
    ``H % G`` groups hold one head more."""
    check_proxy_heads(proxy_heads, heads)
    sizes = [len(c) for c in torch.arange(heads).tensor_split(proxy_heads)]
    return torch.repeat_interleave(torch.arange(proxy_heads), torch.tensor(sizes)).to(device)


def pool_heads(x: torch.Tensor, proxy_heads: int) -> torch.Tensor:
    """``[B, G, S, D]``: the mean of each contiguous group of the heads of ``x [B, H, S, D]`` (x's dtype)."""
    h = x.shape[1]
    check_proxy_heads(proxy_heads, h)
    if proxy_heads == h:
        return x
    if h % proxy_heads == 0:
        return x.unflatten(1, (proxy_heads, h // proxy_heads)).mean(2)
    return torch.stack([part.mean(1) for part in x.tensor_split(proxy_heads, dim=1)], 1)


def proxy_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, proxy_heads: int,
                 stride: int) -> torch.Tensor:
    """Block scores ``[B, G, nq, nk]`` (rows sum to 1) of the ``G`` pooled proxy heads."""
    return xattention_scores(pool_heads(q, proxy_heads), pool_heads(k, proxy_heads), block_size, stride, scale)


def head_budgets(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, threshold: float) -> torch.Tensor:
    """Long ``[B, H, nq]``: per head and q-block, the fewest kv-blocks whose share of the head's own pooled
    block scores reaches ``threshold`` (the block that crosses it counts), at least 1."""
    scores = pooled_scores(q, k, block_size, scale)
    srt = scores.sort(-1, descending=True).values
    before = srt.cumsum(-1) - srt                     # mass of the better blocks
    return (before < threshold * srt.sum(-1, keepdim=True)).sum(-1).clamp_min(1)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Position of each kv-block in its row's descending order (the order :func:`select_blocks` keeps)."""
    order = torch.argsort(scores, dim=-1, descending=True)
    ranks = torch.empty_like(order, dtype=torch.int32 if scores.shape[-1] >= 1 << 15 else torch.int16)
    positions = torch.arange(scores.shape[-1], device=scores.device, dtype=ranks.dtype).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def proxy_select(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, *, proxy_heads: int, stride: int,
                 threshold: float, density: float | None = None, always: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, int | None]:
    """Bool block mask ``[B, H, nq, nk]`` of q, k ``[B, H, S, D]`` (module docstring), and an upper bound of
    the kept blocks per row when it is known without reading the mask (fixed ``density``), else None.

    ``always`` (bool, broadcastable: the self blocks) is OR-ed in. ValueError if ``proxy_heads`` is not in
    ``[1, H]``."""
    b, h, s, _ = q.shape
    check_proxy_heads(proxy_heads, h)
    ranks = _ranks(proxy_scores(q, k, block_size, scale, proxy_heads, stride))    # [B, G, nq, nk]
    nk = ranks.shape[-1]
    max_kv = None
    if density is not None:
        fixed = max(1, math.ceil(density * nk))
        budget = torch.full((b, h, ranks.shape[2]), fixed, device=q.device)
        max_kv = min(nk, fixed + (0 if always is None else 1))   # no read-back from the device
    else:
        budget = head_budgets(q, k, block_size, scale, threshold)
    if h % proxy_heads == 0:   # compare through a view: no [B, H, nq, nk] copy of the ranks
        per = h // proxy_heads
        mask = (ranks.unsqueeze(2) < budget.view(b, proxy_heads, per, -1, 1)).flatten(1, 2)
    else:
        mask = ranks.index_select(1, group_of_heads(h, proxy_heads, q.device)) < budget.unsqueeze(-1)
    if always is not None:
        mask = mask | always
    return mask, max_kv


def selection_flops(heads: int, seq: int, head_dim: int, block_size: int, stride: int, proxy_heads: int | None
                    ) -> float:
    """Multiply-adds of block scoring per batch element: XAttention on every head (``proxy_heads`` None),
    or ProxyAttn's antidiagonal scores on ``G`` proxy heads plus every head's pooled budget scores."""
    n = -(-seq // block_size)
    reduced = (-(-seq // stride)) ** 2 * stride * head_dim         # one head's reduced products
    if proxy_heads is None:
        return float(heads * reduced)
    return float(proxy_heads * reduced + heads * n * n * head_dim)
