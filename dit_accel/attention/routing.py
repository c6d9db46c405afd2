"""Error-aware routing of kv-blocks between the exact kernel and centroid compensation (after SVG-EAR).

SVG-EAR (Zhou, Mang, Yang, Xi, Zhang, Mao, Gonzalez, Keutzer, Stoica, Cheung 2026, "SVG-EAR:
Parameter-Free Linear Compensation for Sparse Video Generation via Error-aware Routing") compensates
the skipped blocks with their centroids (:mod:`dit_accel.attention.compensate`) and points out that
attention *scores* say where the mass is, not where the centroid approximation fails: a heavy block
whose keys and values are all alike is compensated almost exactly, while a lighter one with spread-out
keys is not. So a lightweight probe estimates each block's compensation error, and the blocks with the
highest error-to-cost ratio are computed exactly; the rest are compensated.

:func:`error_route` keeps the budget of the score-based selection (each q-block keeps as many kv-blocks
as :func:`~dit_accel.attention.select.select_blocks` chose for it, self blocks included) and re-chooses
*which* ones. The probe, per q-block ``b`` with mean query ``qbar_b`` and per kv-block ``j``:

* exact contribution of the block, normalised by the probe row's log-sum-exp ``L_b`` over all keys:
  mass ``m_bj = sum_{t in j} exp(s qbar_b . k_t - L_b)`` and numerator ``e_bj = sum_{t in j} exp(...) v_t``;
* centroid estimate (what compensation adds for a skipped block): ``c_bj = n_j exp(s qbar_b . kbar_j - L_b)``
  for the mass and ``c_bj vbar_j`` for the numerator;
* linearised output error of compensating instead of computing the block, with ``o_b`` the probe's
  output: ``err_bj = || (e_bj - c_bj vbar_j) - o_b (m_bj - c_bj) ||`` (the first-order change of
  ``numerator / denominator``);
* cost ``n_j`` (keys of the block; the q-block's size is common to its row): the ranking key is
  ``err_bj / n_j``, greedy as in a knapsack of fixed capacity.

Reading and departures: the paper's text was not available to us (abstract and project page only), so
the probe above is our construction of "a lightweight probe estimates the compensation error for each
block": it evaluates the true and the centroid contribution for one query per q-block (the block mean,
as the pooled scorer does), which costs ``nq x N`` scores per head. The budget comes from the score
selection (threshold or ``density``) rather than from an error target, so that routing by error and by
score compare at equal density. Routing is per q-block row.
"""

from __future__ import annotations

import torch
from einops import rearrange


def _block_means(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 mean ``[B, H, nb, D]``, float32 token count ``[nb]``) of each block of ``x`` ``[B, H, S, D]``."""
    s = x.shape[2]
    pad = (-s) % block_size
    sizes = torch.full((-(-s // block_size),), float(block_size), device=x.device)
    sizes[-1] = block_size - pad
    sums = rearrange(torch.nn.functional.pad(x.float(), (0, 0, 0, pad)), "b h (n i) d -> b h n i d",
                     i=block_size).sum(-2)
    return sums / sizes.view(-1, 1), sizes


def compensation_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float
                       ) -> torch.Tensor:
    """Probe estimate ``[B, H, nq, nk]`` (float32) of the output error of compensating each kv-block by its
    centroid instead of computing it, for each q-block's mean query (see the module docstring)."""
    b, h, s, d = q.shape
    pad = (-s) % block_size
    nb = -(-s // block_size)
    q_mean, _ = _block_means(q, block_size)
    k_mean, sizes = _block_means(k, block_size)
    v_mean, _ = _block_means(v, block_size)
    logits = scale * (q_mean @ k.float().transpose(-1, -2))                           # [B, H, nq, S]
    logits = torch.nn.functional.pad(logits, (0, pad), value=float("-inf"))
    lse = torch.logsumexp(logits, -1, keepdim=True)                                     # [B, H, nq, 1]
    p = torch.exp(logits - lse).view(b, h, nb, nb, block_size)                         # [B, H, nq, nk, bs]
    vb = rearrange(torch.nn.functional.pad(v.float(), (0, 0, 0, pad)), "b h (n i) d -> b h n i d", i=block_size)
    mass = p.sum(-1)                                                                     # [B, H, nq, nk]
    num = torch.einsum("bhqki,bhkid->bhqkd", p, vb)                                     # [B, H, nq, nk, D]
    cent = torch.exp(scale * (q_mean @ k_mean.transpose(-1, -2)) + sizes.log() - lse)  # [B, H, nq, nk]
    out = num.sum(3, keepdim=True)                                                      # probe output [.., 1, D]
    delta = (num - cent.unsqueeze(-1) * v_mean.unsqueeze(2)) - out * (mass - cent).unsqueeze(-1)
    return delta.norm(dim=-1)


def error_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, always: torch.Tensor,
                block_size: int, scale: float, max_chunk_elements: int = 1 << 26) -> torch.Tensor:
    """Bool ``[B, H, nq, nk]``: per q-block row, as many kv-blocks as ``mask`` keeps, chosen as ``always``
    (self blocks) plus the highest compensation-error-to-cost blocks. q, k, v ``[B, H, S, D]`` in the
    selection's (permuted) order; heads in chunks of about ``max_chunk_elements`` probe values."""
    b, h, s, d = q.shape
    nb = mask.shape[-1]
    step = max(1, max_chunk_elements // max(1, b * nb * nb * d))
    err = torch.cat([compensation_error(q[:, i:i + step], k[:, i:i + step], v[:, i:i + step], block_size, scale)
                     for i in range(0, h, step)], dim=1)
    sizes = torch.full((nb,), float(block_size), device=q.device)
    sizes[-1] = s - block_size * (nb - 1)
    ratio = (err / sizes).masked_fill(always.expand_as(err), float("inf"))
    order = torch.argsort(ratio, dim=-1, descending=True)
    keep_sorted = torch.arange(nb, device=q.device) < mask.sum(-1, keepdim=True)
    return torch.zeros_like(mask).scatter_(-1, order, keep_sorted)
