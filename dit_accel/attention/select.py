"""Block selection: which kv-blocks each q-block visits.

Every scorer returns a row-normalised estimate of the attention mass ``[B, H, nq, nk]`` that each
q-block gives each kv-block; :func:`select_blocks` then keeps, per row, the highest-scoring blocks
until their cumulative mass reaches a threshold (or a fixed share of blocks), and always the
self blocks (:func:`self_blocks`).

* :func:`xattention_scores` — XAttention (Xu et al. 2025): the sum of the attention along strided
  antidiagonals of each block is a cheap, pattern-agnostic proxy of the block's mass. As in the
  paper, queries and keys are reshaped at ``stride`` (queries in reversed phase, so each entry of the
  reduced product sums ``stride`` antidiagonal products), softmaxed over the reduced keys with
  ``scale / stride``, and summed per block; paper defaults stride 8, threshold tau = 0.9. On CUDA one
  fused Triton kernel (:mod:`dit_accel.kernels.block_scores`: online softmax statistics, then
  per-block sums, never materialising the reduced logits); on CPU PyTorch over row chunks (the
  kernel's reference). Departures: no causal mask (DiTs are bidirectional); reduced query rows made
  only of sequence padding are dropped from their q-block's sum (as reduced keys of padding are).
* :func:`pooled_scores` — top-p over mean-pooled blocks: mean query and mean key per block, score
  ``scale q_b . k_b + log(n_kb)`` (each kv-block weighted by its size), softmax per row (the
  block-summary estimate used by SpargeAttn/SVG-style selectors; with SVG2 the centroid version is
  :func:`dit_accel.attention.reorder_svg2.centroid_block_scores`).
* static masks (PAROAttention) are calibrated offline: :func:`encode_mask` / :func:`decode_mask`
  store them in a policy as hex strings.
"""

from __future__ import annotations

import math
import os

import torch
from einops import rearrange

from ..kernels.block_scores import block_scores_kernel_available, xattention_block_scores


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def xattention_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float,
                      max_chunk_elements: int = 1 << 25) -> torch.Tensor:
    """Antidiagonal block scores ``[B, H, nq, nk]`` (rows sum to 1) of q, k ``[B, H, S, D]``.

    CUDA tensors with ``DIT_ACCEL_SCORE_KERNEL=1`` (Triton importable, ``block_size`` a power of two): the
    fused kernel :func:`dit_accel.kernels.block_scores.xattention_block_scores` — opt-in until its speed is
    measured beside this path on a GPU (``benchmarks/check_sparse_kernels_gpu.py``); it compiles for sm_90
    (``tests/test_kernels_aot.py``) and matches this code under the interpreter. Otherwise this PyTorch code, which
    is also the kernel's test reference: the reduced products run in the inputs' dtype when it is
    16-bit (tensor cores; softmax in float32), over row chunks of ``max_chunk_elements`` logits."""
    stride = max(1, min(stride, block_size))
    while block_size % stride:  # the reduced block must be whole
        stride -= 1
    if q.is_cuda and os.environ.get("DIT_ACCEL_SCORE_KERNEL") == "1" and block_scores_kernel_available(q, block_size):
        return xattention_block_scores(q, k, block_size, stride, scale)
    return _xattention_scores_torch(q, k, block_size, stride, scale, max_chunk_elements)


def _xattention_scores_torch(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float,
                             max_chunk_elements: int) -> torch.Tensor:
    """The PyTorch reference of :func:`xattention_scores` (``stride`` already divides ``block_size``)."""
    b, h, s, d = q.shape
    pad = _cdiv(s, block_size) * block_size - s
    work = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32  # products in 16-bit inputs' dtype
    qf = torch.nn.functional.pad(q.to(work), (0, 0, 0, pad))
    kf = torch.nn.functional.pad(k.to(work), (0, 0, 0, pad))
    # Query phase r pairs with key phase stride-1-r: each reduced product is an antidiagonal sum.
    q_red = rearrange(qf.flip(-2), "b h (n r) d -> b h n (r d)", r=stride).flip(-2)
    k_red = rearrange(kf, "b h (n r) d -> b h n (r d)", r=stride)
    n = q_red.shape[2]
    valid_keys = torch.arange(n, device=q.device) * stride < s  # False: reduced keys made only of padding
    sub = block_size // stride
    nq = nk = _cdiv(s, block_size)
    out = torch.empty(b, h, nq, nk, device=q.device)
    rows_per_chunk = max(sub, (max_chunk_elements // max(1, b * h * n)) // sub * sub)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        logits = (q_red[:, :, r0:r1] @ k_red.transpose(-1, -2)).float() * (scale / stride)
        logits = logits.masked_fill(~valid_keys, float("-inf"))
        p = torch.softmax(logits, dim=-1) * valid_keys[r0:r1, None]  # reduced rows of padding only count 0
        p = rearrange(p, "b h (qb i) (kb j) -> b h qb kb (i j)", i=sub, j=sub).sum(-1)
        out[:, :, r0 // sub: r1 // sub] = p
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def pooled_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Size-weighted softmax over mean-pooled block scores ``[B, H, nq, nk]`` (rows sum to 1)."""
    s = q.shape[2]
    sizes = torch.full((_cdiv(s, block_size),), float(block_size), device=q.device)
    sizes[-1] = s - block_size * (sizes.numel() - 1)
    logits = scale * block_means(q, block_size) @ block_means(k, block_size).transpose(-1, -2) + sizes.log()
    return torch.softmax(logits, dim=-1)


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Float32 ``[B, H, ceil(S / block_size), D]``: the mean token of each block of ``x [B, H, S, D]`` (the
    last block's over its real tokens). Summed from x's own memory with float32 accumulation (a view per
    block, no float32 or padded copy of x)."""
    s = x.shape[2]
    full = s // block_size
    parts = [x[:, :, :full * block_size].unflatten(2, (full, block_size)).sum(3, dtype=torch.float32) / block_size]
    if s > full * block_size:
        parts.append(x[:, :, full * block_size:].sum(2, keepdim=True, dtype=torch.float32) / (s - full * block_size))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def self_blocks(q_perm: torch.Tensor | None, k_perm: torch.Tensor | None, shape: tuple[int, int, int],
                block_size: int, device: torch.device) -> torch.Tensor:
    """Bool ``[B, H, nq, nk]``: each q-block's self block, always kept.

    Without reordering (or with one permutation for q and k, PARO) this is the block diagonal. With
    SVG2's separate q/k orders a q-block's own tokens are spread over several kv-blocks; its self
    block is then the kv-block that holds most of them as keys (keeping all of them would make the
    selection nearly dense).
    """
    b, h, s = shape
    n = _cdiv(s, block_size)
    if q_perm is None or k_perm is None or q_perm is k_perm:
        return torch.eye(n, dtype=torch.bool, device=device).expand(b, h, n, n)
    pos_q = torch.empty_like(q_perm).scatter_(-1, q_perm, torch.arange(s, device=device).expand_as(q_perm))
    pos_k = torch.empty_like(k_perm).scatter_(-1, k_perm, torch.arange(s, device=device).expand_as(k_perm))
    counts = torch.zeros(b, h, n * n, device=device)
    counts.scatter_add_(-1, (pos_q // block_size) * n + pos_k // block_size, torch.ones(b, h, s, device=device))
    modal = counts.view(b, h, n, n).argmax(-1, keepdim=True)
    return torch.zeros(b, h, n, n, dtype=torch.bool, device=device).scatter_(-1, modal, True)


def select_blocks(scores: torch.Tensor, *, threshold: float | None = None, density: float | None = None,
                  always: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask ``[B, H, nq, nk]`` from row-normalised ``scores``.

    ``density``: each row keeps its ``ceil(density * nk)`` best blocks (fixed budget). Else the
    smallest set of best blocks whose mass reaches ``threshold`` (the block that crosses it is kept).
    ``always`` (bool, broadcastable) is OR-ed in (self blocks).
    """
    nk = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, descending=True)
    if density is not None:
        keep_sorted = torch.arange(nk, device=scores.device) < max(1, math.ceil(density * nk))
        keep_sorted = keep_sorted.expand_as(scores)
    else:
        if threshold is None:
            raise ValueError("select_blocks: give threshold or density")
        sorted_scores = torch.gather(scores, -1, order)
        before = torch.cumsum(sorted_scores, dim=-1) - sorted_scores  # mass of the better blocks
        keep_sorted = before < threshold * sorted_scores.sum(-1, keepdim=True)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, keep_sorted)
    if always is not None:
        mask = mask | always
    return mask


def encode_mask(mask: torch.Tensor) -> str:
    """Hex string of a bool tensor's bits (row-major, padded to whole bytes)."""
    bits = mask.flatten().to(torch.uint8).cpu()
    pad = (-bits.numel()) % 8
    bits = torch.nn.functional.pad(bits, (0, pad)).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return bytes((bits * weights).sum(-1).to(torch.uint8).tolist()).hex()


def decode_mask(text: str, shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse of :func:`encode_mask`."""
    numel = math.prod(shape)
    raw = torch.tensor(list(bytes.fromhex(text)), dtype=torch.uint8)
    bits = (raw.unsqueeze(-1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
    bits = bits.flatten()
    if bits.numel() < numel:
        raise ValueError(f"static mask holds {bits.numel()} bits, need {numel}")
    return bits[:numel].bool().view(shape).to(device)
