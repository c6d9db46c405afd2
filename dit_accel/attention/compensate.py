"""Centroid compensation of skipped blocks (after SVG-EAR).

Block-sparse attention drops the mass of the skipped kv-blocks. SVG-EAR approximates it instead:
each skipped block j is summarised by its mean key ``k_j`` and mean value ``v_j`` and contributes
``n_j exp(scale q . k_j) v_j`` to the numerator and ``n_j exp(scale q . k_j)`` to the softmax
denominator of every query of the q-block (the centroid approximation of the block's keys). The kernel's
log-sum-exp merges this with the exact part:

    out = (exp(lse) out_sparse + sum_skipped n_j e_j v_j) / (exp(lse) + sum_skipped n_j e_j)

Departures: the summaries are the fixed blocks' means (with SVG2 ordering the blocks are already
semantically homogeneous); compensation applies to every skipped block (SVG-EAR's error-aware routing,
which chooses the blocks to compute, is :mod:`dit_accel.attention.routing`).

This is the *separate-pass* form, a float32 PyTorch pass after the kernel. The block-sparse kernel
path fuses the same term (and PISA's first-order term, ``first_order=True`` here; the maths and the
paper in :mod:`dit_accel.kernels.pisa`) into its online softmax instead; this pass remains for the
kernels without it (the quantized and the pyramid kernels).
"""

from __future__ import annotations

import torch
from einops import rearrange


def block_means(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean ``[B, H, nb, D]`` float32, token count ``[nb]``) of each block of ``x`` ``[B, H, S, D]``."""
    s = x.shape[2]
    pad = (-s) % block_size
    sizes = torch.full((-(-s // block_size),), float(block_size), device=x.device)
    sizes[-1] = block_size - pad
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    sums = rearrange(padded, "b h (n i) d -> b h n i d", i=block_size).sum(-2)
    return sums / sizes.view(-1, 1), sizes


def compensate(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               block_mask: torch.Tensor, block_size: int, scale: float, max_chunk_elements: int = 1 << 26,
               first_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` ``[B, H, S, D]`` of the kept blocks (log-sum-exp ``lse`` ``[B, H, S]``) plus the centroid
    estimate of the blocks ``block_mask`` ``[B, H, nq, nk]`` skips (``first_order``: plus PISA's shared
    first-order term): (output in the input dtype, float32 log of the kept plus estimated mass). Heads are
    processed in chunks of about ``max_chunk_elements`` scores."""
    b, h, s, _ = q.shape
    step = max(1, max_chunk_elements // max(1, b * s * block_mask.shape[-1]))
    if step < h:
        parts = [compensate(out[:, i:i + step], lse[:, i:i + step], q[:, i:i + step], k[:, i:i + step],
                            v[:, i:i + step], block_mask[:, i:i + step], block_size, scale, max_chunk_elements,
                            first_order)
                 for i in range(0, h, step)]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
    k_mean, sizes = block_means(k, block_size)
    v_mean, _ = block_means(v, block_size)
    skipped = (~block_mask).repeat_interleave(block_size, dim=2)[:, :, :s]              # [B, H, S, nk]
    logits = scale * (q.float() @ k_mean.transpose(-1, -2)) + sizes.log()
    logits = logits.masked_fill(~skipped, float("-inf"))
    comp_lse = torch.logsumexp(logits, dim=-1)                                           # [B, H, S]
    total = torch.logaddexp(lse, comp_lse)
    w_exact = torch.exp(lse - total).nan_to_num(0.0).unsqueeze(-1)
    w_comp = torch.exp(logits - total.unsqueeze(-1)).nan_to_num(0.0)                     # [B, H, S, nk]
    result = w_exact * out.float() + w_comp @ v_mean
    if first_order:
        from ..kernels.pisa import block_summaries

        hsum = block_summaries(k, v, block_size, scale, True)[2]                         # (scale / S) sum_j H_j
        result = result + w_comp.sum(-1, keepdim=True) * (q.float() @ hsum)
    return result.to(out.dtype), total
