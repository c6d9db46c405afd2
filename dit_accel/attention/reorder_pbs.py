"""Permuted block-sparse attention (PBS-Attn, Wang, Wang, Zhang, Tan, Zhou, Liu, Lian, Liu, Song, Qiu 2025,
"Sparser Block-Sparse Attention via Token Permutation"): sort the keys by importance inside segments.

Attention is invariant to a permutation of the keys (with the values permuted alike) and equivariant to
one of the queries. Block-sparse selection, however, is not: when the keys a q-block needs are scattered
over many kv-blocks, covering them costs many blocks. PBS-Attn permutes the keys *within segments* of a
few blocks by a query-aware importance score, so the keys that many queries attend to gather in few
blocks of each segment, and always computes the diagonal segments (a q-block's own segment). Unlike
PARO's geometric orders (:mod:`dit_accel.attention.reorder_paro`, the same for every input) or SVG2's
clusters (:mod:`dit_accel.attention.reorder_svg2`, separate q/k k-means), the order comes from the
attention itself and changes per input, layer and head.

:func:`pbs_permutation` returns what :func:`dit_accel.attention.sparse._select` uses for any reorder:
``q_perm`` (``None``: the queries keep their order, as in the paper) and ``k_perm`` long ``[B, H, N]``,
plus the bool ``[nb, nb]`` block mask of the diagonal segments, OR-ed into the always-kept blocks.

Paper defaults and departures:

* Segment = ``SEGMENT_BLOCKS`` (2) blocks, the ratio of the reference implementation's defaults
  (128-token blocks, 256-token segments); here a segment is 2 blocks of ``attention.block_size``.
* Importance: the reference scores keys with the attention of the last query block (in a causal LLM
  prefill the last queries see every key). A DiT is bidirectional and has no such block, so a key's
  score is its attention probability averaged over every q-block's mean query (``nq x N`` scores per
  head, the same pooled queries as :func:`dit_accel.attention.select.pooled_scores`).
* Keys are sorted by descending score inside each segment (stable, so equal scores keep their order);
  the last segment may be partial. No causal mask (DiTs are bidirectional).
"""

from __future__ import annotations

import torch
from einops import rearrange

#: blocks per permutation segment (the reference implementation: 256-token segments of 128-token blocks)
SEGMENT_BLOCKS = 2


def key_importance(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Float32 ``[B, H, N]``: each key's attention probability averaged over the q-blocks' mean queries."""
    s = q.shape[2]
    pad = (-s) % block_size
    sizes = torch.full((-(-s // block_size),), float(block_size), device=q.device)
    sizes[-1] = block_size - pad
    q_mean = rearrange(torch.nn.functional.pad(q.float(), (0, 0, 0, pad)), "b h (n i) d -> b h n i d",
                       i=block_size).sum(-2) / sizes.view(-1, 1)
    p = torch.softmax(scale * (q_mean @ k.float().transpose(-1, -2)), dim=-1)           # [B, H, nq, N]
    return (p * sizes.view(-1, 1)).sum(-2) / s                                           # weighted by q-block size


def pbs_permutation(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float
                    ) -> tuple[None, torch.Tensor, torch.Tensor]:
    """``(q_perm, k_perm, segments)`` for q, k ``[B, H, N, D]``: ``q_perm`` None (queries in order), ``k_perm``
    long ``[B, H, N]`` (token index at each sorted position: keys by descending importance within each segment
    of ``SEGMENT_BLOCKS * block_size`` tokens), ``segments`` bool ``[nb, nb]`` (q- and kv-block in one segment)."""
    b, h, s, _ = q.shape
    seg = SEGMENT_BLOCKS * block_size
    score = key_importance(q, k, block_size, scale)
    # Sort by (segment, -score) with two stable sorts: by score first, then by segment, which keeps the
    # score order inside each segment. Segments stay in place; keys move only inside their own segment.
    by_score = torch.sort(score, dim=-1, descending=True, stable=True).indices
    segment_of = by_score // seg
    k_perm = torch.gather(by_score, -1, torch.sort(segment_of, dim=-1, stable=True).indices)
    nb = -(-s // block_size)
    blocks = torch.arange(nb, device=q.device) // SEGMENT_BLOCKS
    return None, k_perm, blocks.unsqueeze(1) == blocks.unsqueeze(0)
