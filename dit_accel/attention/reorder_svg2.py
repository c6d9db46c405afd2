"""Semantic-aware permutation (Sparse VideoGen2, Yang et al. 2025): per-head k-means on the queries
and, separately, on the keys; tokens are sorted by cluster so that a block holds tokens of one
semantic cluster, and the centroids summarise the blocks for selection.

Paper defaults kept: 100 query clusters, 500 key clusters, centroids warm-started from the previous
step so that a step needs only a few iterations. Departures: our kernel has fixed-size blocks, so the
sorted sequence is cut into ``block_size`` blocks (a block may span two clusters) and a block's score
is the centroid-estimated attention mass it receives (:func:`centroid_block_scores`), not the
cluster-pair score of the paper's variable-size kernel; any batch size (the reference implementation
asserts batch 1); deterministic seeding instead of random initial centroids: greedy k-center for up to
``GREEDY_SEEDING_MAX`` clusters, evenly spaced tokens beyond (greedy seeding takes one sequential pass
over all tokens per cluster: 500 passes per head and layer at the paper's 500 key clusters). The
distance products run in the inputs' 16-bit dtype on 16-bit inputs (float32 centroid updates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


GREEDY_SEEDING_MAX = 64


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (squared Euclidean) of each row: x ``[G, S, D]``, centroids ``[G, C, D]`` (float32);
    the product runs in x's dtype (16-bit inputs: tensor cores)."""
    # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2)
    c = centroids.to(x.dtype)
    scores = torch.baddbmm((-0.5 * centroids.pow(2).sum(-1)).to(x.dtype).unsqueeze(1), x, c.transpose(1, 2))
    return scores.argmax(-1)


def spaced_init(x: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Evenly spaced tokens as initial centroids: x ``[G, S, D]`` -> float32 ``[G, C, D]`` (one gather)."""
    idx = torch.linspace(0, x.shape[1] - 1, num_clusters, device=x.device).round().long()
    return x[:, idx].float().clone()


def farthest_point_init(x: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Deterministic greedy k-center seeding (Gonzalez 1985): start from the token nearest the mean,
    then repeatedly add the token farthest from the chosen ones. x ``[G, S, D]`` -> ``[G, C, D]``."""
    g, s, d = x.shape
    rows = torch.arange(g, device=x.device)
    first = (x - x.mean(1, keepdim=True)).pow(2).sum(-1).argmin(-1)
    chosen = [first]
    dist = (x - x[rows, first].unsqueeze(1)).pow(2).sum(-1)
    for _ in range(num_clusters - 1):
        nxt = dist.argmax(-1)
        chosen.append(nxt)
        dist = torch.minimum(dist, (x - x[rows, nxt].unsqueeze(1)).pow(2).sum(-1))
    return x[rows.unsqueeze(1), torch.stack(chosen, 1)].clone()


def kmeans(x: torch.Tensor, num_clusters: int, iterations: int, init: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means over groups: x ``[G, S, D]`` -> (labels long ``[G, S]``, centroids ``[G, C, D]``).

    Centroids in float32, distance products in x's dtype. ``init`` (``[G, C, D]``) warm-starts; else
    :func:`farthest_point_init` (up to ``GREEDY_SEEDING_MAX`` clusters) or :func:`spaced_init`. A cluster
    that loses all its tokens keeps its previous centroid.
    """
    g, s, d = x.shape
    xf = x.float()
    xa = x if x.dtype in (torch.float16, torch.bfloat16) else xf  # the distance products' dtype
    c = min(num_clusters, s)
    if init is not None and init.shape == (g, c, d):
        centroids = init.float().clone()
    elif c <= GREEDY_SEEDING_MAX:
        centroids = farthest_point_init(xf, c)
    else:
        centroids = spaced_init(xf, c)
    labels = _assign(xa, centroids)
    for _ in range(iterations):
        sums = torch.zeros(g, c, d, device=x.device).scatter_add_(1, labels.unsqueeze(-1).expand(-1, -1, d), xf)
        ones = torch.ones_like(labels, dtype=torch.float32)
        counts = torch.zeros(g, c, device=x.device).scatter_add_(1, labels, ones)
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centroids)
        labels = _assign(xa, centroids)
    return labels, centroids


@dataclass
class SemanticPermutation:
    """Result of one SVG2 clustering of a (batch, head) set of tokens."""

    q_perm: torch.Tensor        # long [B, H, S]: token index of each position of the sorted queries
    k_perm: torch.Tensor        # long [B, H, S]
    q_labels: torch.Tensor      # long [B, H, S] cluster of each *sorted* query
    k_labels: torch.Tensor      # long [B, H, S]
    q_centroids: torch.Tensor   # float32 [B, H, Cq, D]
    k_centroids: torch.Tensor   # float32 [B, H, Ck, D]


def semantic_permutation(q: torch.Tensor, k: torch.Tensor, q_clusters: int, k_clusters: int, iterations: int,
                         init: tuple[torch.Tensor, torch.Tensor] | None = None) -> SemanticPermutation:
    """Cluster q and k ``[B, H, S, D]`` per (batch, head) and sort each by cluster (stable)."""
    b, h, s, d = q.shape
    init_q, init_k = init if init is not None else (None, None)
    flat = lambda t: None if t is None else t.reshape(b * h, *t.shape[2:])  # noqa: E731
    q_lab, q_cen = kmeans(q.reshape(b * h, s, d), q_clusters, iterations, flat(init_q))
    k_lab, k_cen = kmeans(k.reshape(b * h, s, d), k_clusters, iterations, flat(init_k))
    q_lab_sorted, q_perm = torch.sort(q_lab, dim=-1, stable=True)
    k_lab_sorted, k_perm = torch.sort(k_lab, dim=-1, stable=True)
    shape = (b, h, s)
    return SemanticPermutation(q_perm.reshape(shape), k_perm.reshape(shape), q_lab_sorted.reshape(shape),
                               k_lab_sorted.reshape(shape), q_cen.reshape(b, h, *q_cen.shape[1:]),
                               k_cen.reshape(b, h, *k_cen.shape[1:]))


def centroid_block_scores(perm: SemanticPermutation, block_size: int, scale: float) -> torch.Tensor:
    """Estimated attention mass ``[B, H, nq, nk]`` of each (q-block, kv-block) of the sorted sequences.

    Cluster-level attention ``P[i, j] = |j| exp(scale c_qi . c_kj) / sum_j' |j'| exp(...)`` (each key
    cluster counted with its size) is spread over blocks: a q-block's row is the mean of its tokens'
    cluster rows, and key cluster j's mass goes to kv-blocks in proportion to its tokens in them.
    Rows sum to 1.
    """
    b, h, s = perm.q_labels.shape
    cq, ck = perm.q_centroids.shape[2], perm.k_centroids.shape[2]
    nb = -(-s // block_size)
    block_of = torch.arange(s, device=perm.q_labels.device) // block_size
    k_sizes = torch.zeros(b, h, ck, device=block_of.device).scatter_add_(
        -1, perm.k_labels, torch.ones(b, h, s, device=block_of.device))
    logits = (scale * perm.q_centroids @ perm.k_centroids.transpose(-1, -2)
              + k_sizes.clamp_min(1e-30).log().unsqueeze(-2))
    cluster_p = torch.softmax(logits, dim=-1)                                           # [B, H, Cq, Ck]
    # A_q[qb, i]: share of q-block qb's tokens in cluster i; B_k[j, kb]: share of cluster j's tokens in kb.
    rows_per_block = torch.bincount(block_of, minlength=nb).float()
    a_q = torch.zeros(b, h, nb, cq, device=block_of.device)
    a_q.view(b, h, -1).scatter_add_(-1, block_of * cq + perm.q_labels, torch.ones(b, h, s, device=block_of.device))
    a_q = a_q / rows_per_block.view(1, 1, nb, 1)
    b_k = torch.zeros(b, h, ck, nb, device=block_of.device)
    b_k.view(b, h, -1).scatter_add_(-1, perm.k_labels * nb + block_of, torch.ones(b, h, s, device=block_of.device))
    b_k = b_k / k_sizes.clamp_min(1).unsqueeze(-1)
    return a_q @ cluster_p @ b_k
