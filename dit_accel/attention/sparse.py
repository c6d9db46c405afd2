"""Block-sparse self-attention of the visual tokens, and its joint-attention wrapper.

:func:`sparse_self_attention` is the whole pipeline for one attention call over visual tokens
``[B, H, N, D]``: permute queries and keys/values (PARO or SVG2), score and select blocks, run
the block-sparse kernel (:func:`dit_accel.kernels.block_sparse_attention`), optionally compensate the
skipped blocks (SVG-EAR), and inverse-permute the output.

:func:`joint_attention` handles sequences that also hold text tokens (joint attention of Flux,
SD3, HunyuanVideo, CogVideoX): text queries attend to every key densely; visual queries attend to
the visual keys block-sparsely and to the text keys densely, the two parts merged exactly through
their log-sum-exps. Only visual-to-visual attention is ever sparse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels.block_sparse import (SUPPORTED_HEAD_DIMS, block_sparse_attention, block_sparse_attention_reference,
                                    mask_to_block_table, score_sorted_block_table)
from ..kernels.pisa import walked_pairs
from .compensate import compensate as compensate_skipped
from .config import AttentionConfig
from .reorder_svg2 import SemanticPermutation, centroid_block_scores, semantic_permutation
from .select import pooled_scores, select_blocks, self_blocks, xattention_scores


@dataclass
class SparseRequest:
    """What one sparse call needs besides q, k, v: the config and the per-layer reordering inputs."""

    config: AttentionConfig
    head_perm: torch.Tensor | None = None          # PARO: long [H, N], same order for q and k
    static_mask: torch.Tensor | None = None        # bool [H, nq, nk] (calibrated), or None
    svg2_init: tuple[torch.Tensor, torch.Tensor] | None = None
    svg2_first: bool = True                        # first sparse step of the generation: more k-means iterations
    svg2_out: dict = field(default_factory=dict)   # receives "centroids" for the next step
    selection: "Selection | None" = None           # reuse this permutation + block mask (no scoring)
    exact: tuple[torch.Tensor, torch.Tensor] | None = None  # AdaSpa search step: its dense (out, lse), permuted


@dataclass
class Selection:
    """A layer's token permutations and block mask, kept to be reused on the next steps
    (``attention.sparse.refresh_interval``)."""

    q_perm: torch.Tensor | None   # long [B, H, N] or None (natural order)
    k_perm: torch.Tensor | None
    block_mask: torch.Tensor      # bool [B, H, nq, nk], permuted order
    max_kv: int | None = None     # an upper bound of the kept kv-blocks per row (None: read back from the mask)
    tables: tuple[torch.Tensor, torch.Tensor] | None = None  # the kernel's block table, made once
    levels: torch.Tensor | None = None  # PSA: int8 [B, H, nq, nk] pyramid level per block (-1: skipped), permuted

    def fits(self, b: int, h: int, n: int) -> bool:
        return tuple(self.block_mask.shape[:2]) == (b, h) and (self.q_perm is None or self.q_perm.shape[-1] == n)

    def block_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_indices, kv_counts)`` of the mask, made on first use and kept for the reusing steps. With
        ``max_kv`` known (fixed-density selections) no value is read back from the device."""
        if self.tables is None:
            self.tables = mask_to_block_table(self.block_mask, self.max_kv)
        return self.tables


@dataclass
class SparseResult:
    out: torch.Tensor          # [B, H, N, D] in the input order
    lse: torch.Tensor          # float32 [B, H, N], natural log of the kept (and compensated) mass
    block_mask: torch.Tensor   # bool [B, H, nq, nk] in the permuted order
    kept: torch.Tensor         # float32 scalar: query-key pairs computed
    total: float               # query-key pairs of dense attention


def _gather(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    if perm is None:
        return x
    return torch.gather(x, 2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))


def _scatter(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_gather`: ``y[..., perm[i], :] = x[..., i, :]``."""
    return torch.empty_like(x).scatter_(2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]), x)


def _padded_head_dim(d: int) -> int:
    for size in SUPPORTED_HEAD_DIMS:
        if size >= d:
            return size
    raise ValueError(f"head dim {d} is larger than the block-sparse kernel supports ({max(SUPPORTED_HEAD_DIMS)})")


def run_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor | None, block_size: int,
               scale: float, quant: str = "none", tables: tuple[torch.Tensor, torch.Tensor] | None = None,
               compensate: str = "none", early_stop: float | None = None, stats: dict | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with a bool block mask (``None``: dense, quantized kernel only); head dims the
    kernel lacks are zero-padded (q.k and the kept columns of the output are unchanged by zero channels).
    ``tables``: the mask's block table when the caller has it (:meth:`Selection.block_table`). Returns (out, lse).

    ``compensate`` "centroid" / "pisa" and ``early_stop`` (a positive bound; the table must then list each
    row's blocks by score, descending): the block-sparse kernel with the skipped blocks approximated and
    the walk stopped early (:func:`dit_accel.kernels.pisa.pisa_attention`, fused; its reference on CPU).
    ``stats`` (a dict) then receives ``"walked"``, the int32 ``[B, H, nq]`` table entries each row walked.
    The quantized kernel has neither: its compensation is the separate PyTorch pass
    (:func:`dit_accel.attention.compensate.compensate`).

    ``quant`` "int8" / "fp8": the quantized kernel (:func:`dit_accel.kernels.quant_attention.quant_attention`,
    same block table, or its default tiles when dense) instead; it takes 16-bit inputs, so float32 inputs
    are cast to bfloat16 for it. CUDA: the Triton kernels; CPU: their PyTorch references (the Triton
    interpreter is for kernel tests only).

    q, k, v go to the kernels with their strides as they come (e.g. diffusers' ``[B, S, H, D]`` memory
    viewed as ``[B, H, S, D]``, or a slice of the joint sequence): both kernels address any strides (TMA
    descriptors when 16-byte aligned, pointer loads otherwise), so no ``.contiguous()`` copy is made."""
    d = q.shape[-1]
    dp = _padded_head_dim(d)
    dtype = q.dtype
    q0, k0, v0 = q, k, v
    if quant != "none" and dtype == torch.float32:   # cast before padding: the pad then copies 16-bit data
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if dp != d:
        q, k, v = (torch.nn.functional.pad(t, (0, dp - d)) for t in (q, k, v))
    if tables is None:
        tables = mask_to_block_table(block_mask) if block_mask is not None else (None, None)
    if quant != "none":
        from ..kernels.quant_attention import quant_attention, quant_attention_reference

        tiles = {} if block_mask is None else {"block_m": block_size, "block_n": block_size}
        kernel = quant_attention if q.is_cuda else quant_attention_reference
        out, lse = kernel(q, k, v, *tables, mode=quant, sm_scale=scale, return_lse=True, validate=False, **tiles)
        out = out[..., :d].to(dtype)
        if compensate != "none" and block_mask is not None:
            out, lse = compensate_skipped(out, lse, q0, k0, v0, block_mask, block_size, scale,
                                          first_order=compensate == "pisa")
        return out, lse
    if block_mask is None:
        raise ValueError("run_kernel: a dense call needs a quantized kernel (quant 'int8' or 'fp8')")
    if compensate != "none" or early_stop:
        from ..kernels.pisa import pisa_attention, pisa_attention_reference

        kernel = pisa_attention if q.is_cuda else pisa_attention_reference
        out, lse, walked = kernel(q, k, v, *tables, block_m=block_size, block_n=block_size, sm_scale=scale,
                                  compensate=compensate, early_stop=early_stop or None, return_lse=True,
                                  return_walked=True, validate=False)
        if stats is not None and early_stop:
            stats["walked"] = walked
        return out[..., :d], lse
    kernel = block_sparse_attention if q.is_cuda else block_sparse_attention_reference
    out, lse = kernel(q, k, v, *tables, block_m=block_size, block_n=block_size,
                      sm_scale=scale, return_lse=True, validate=False)
    return out[..., :d], lse


def _pair_counts(block_mask: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    sizes = torch.full((block_mask.shape[-1],), float(block_size), device=block_mask.device)
    sizes[-1] = n - block_size * (block_mask.shape[-1] - 1)
    return torch.einsum("bhqk,q,k->", block_mask.float(), sizes, sizes)


def quant_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                          quant: str, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention through the quantized kernel (``attention: {sparse: null, quant: int8|fp8}``):
    every token, text included (:func:`run_kernel` without a block mask).

    ``perm``: long ``[H, S]`` or ``[B, H, S]`` token order per head (``reorder: paro``:
    :func:`~dit_accel.attention.reorder_paro.sequence_permutation`): q, k, v are gathered in that order, so
    the kernel's per-block K scales see the reordered blocks, and the output is scattered back (attention
    without a mask is permutation-equivariant, so only the quantization changes)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if perm is None:
        return run_kernel(q, k, v, None, 0, scale, quant)[0]
    perm = perm.to(q.device).expand(q.shape[0], *perm.shape[-2:])
    out = run_kernel(_gather(q, perm), _gather(k, perm), _gather(v, perm), None, 0, scale, quant)[0]
    return _scatter(out, perm)


def _select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, request: SparseRequest, scale: float):
    """Permute (PARO / SVG2) and choose the kept blocks: ``(selection, qp, kp, vp)``."""
    cfg = request.config
    sparse = cfg.sparse
    b, h, n, _ = q.shape
    bs = cfg.block_size
    q_perm = k_perm = None
    semantic: SemanticPermutation | None = None
    segments = None  # PBS: bool [nb, nb], the diagonal segments (always computed)
    if cfg.reorder == "paro" and request.head_perm is not None:
        q_perm = k_perm = request.head_perm.to(q.device).unsqueeze(0).expand(b, h, n)
    elif cfg.reorder == "pbs":
        from .reorder_pbs import SEGMENT_BLOCKS, pbs_permutation

        q_perm, k_perm, segments = pbs_permutation(q, k, bs, scale)
    elif cfg.reorder == "svg2":
        s2 = cfg.svg2
        semantic = semantic_permutation(q, k, s2.q_clusters, s2.k_clusters,
                                        s2.init_iterations if request.svg2_first else s2.iterations,
                                        request.svg2_init)
        request.svg2_out["centroids"] = (semantic.q_centroids, semantic.k_centroids)
        q_perm, k_perm = semantic.q_perm, semantic.k_perm
    qp, kp, vp = _gather(q, q_perm), _gather(k, k_perm), _gather(v, k_perm)
    always = self_blocks(q_perm, k_perm, (b, h, n), bs, q.device)
    if segments is not None:
        always = always | segments
    max_kv = None
    if sparse.method == "adaspa":  # search step: a dense pass whose LSE gives the exact block masses
        from .adaspa import search

        mask, request.exact = search(qp, kp, vp, always, bs, scale, sparse.recall, sparse.density)
    elif sparse.method == "psa":  # pyramid levels per block; the block mask is "visited at any level"
        from .pyramid import psa_levels

        centroids = (centroid_block_scores(semantic, bs, scale)
                     if semantic is not None and cfg.psa.scorer == "pooled" else None)
        levels = psa_levels(qp, kp, cfg.psa, bs, sparse.stride, scale, always, centroids)
        return Selection(q_perm, k_perm, levels >= 0, levels=levels), qp, kp, vp
    elif sparse.method == "static" and request.static_mask is not None:
        mask = request.static_mask.to(q.device).unsqueeze(0).expand(b, -1, -1, -1) | always
    elif sparse.method == "proxy":  # pooled proxy heads rank the blocks, per-head budgets
        from .proxy import proxy_select

        mask, max_kv = proxy_select(qp, kp, bs, scale, proxy_heads=sparse.proxy_heads, stride=sparse.stride,
                                    threshold=sparse.threshold, density=sparse.density, always=always)
    else:
        if sparse.method == "topp":
            scores = (centroid_block_scores(semantic, bs, scale) if semantic is not None
                      else pooled_scores(qp, kp, bs, scale))
            threshold = sparse.top_p
        else:  # xattention, and static without a mask for this shape
            scores = xattention_scores(qp, kp, bs, sparse.stride, scale)
            threshold = sparse.threshold
        mask = select_blocks(scores, threshold=threshold, density=sparse.density, always=always)
        if sparse.route == "error":  # SVG-EAR: as many blocks, chosen by compensation error per cost
            from .routing import error_route

            mask = error_route(qp, kp, vp, mask, always, bs, scale)
        if sparse.density is not None:  # the budget plus the self block
            nk = mask.shape[-1]
            max_kv = min(nk, max(1, math.ceil(sparse.density * nk)) + 1)
    if segments is not None and max_kv is not None:  # PBS keeps its diagonal segment, not one self block
        max_kv = min(mask.shape[-1], max_kv + SEGMENT_BLOCKS - 1)
    return Selection(q_perm, k_perm, mask, max_kv), qp, kp, vp


def sparse_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, request: SparseRequest,
                          scale: float | None = None) -> SparseResult:
    """Reordered block-sparse attention over one set of (visual) tokens ``[B, H, N, D]``. A fitting
    ``request.selection`` is reused (no permutation or scoring); otherwise the new one is left there."""
    cfg = request.config
    b, h, n, d = q.shape
    bs = cfg.block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    reused = request.selection
    if reused is not None and reused.fits(b, h, n):
        selection = reused
        qp, kp, vp = _gather(q, reused.q_perm), _gather(k, reused.k_perm), _gather(v, reused.k_perm)
    else:
        selection, qp, kp, vp = _select(q, k, v, request, scale)
        request.selection = selection
        if request.exact is not None:  # AdaSpa search step: the dense pass that measured the masses is the output
            from .adaspa import search_result

            return search_result(request, selection, n, bs)
    q_perm, mask = selection.q_perm, selection.block_mask
    if selection.levels is not None:  # PSA: the pyramid kernel over the level map
        from .pyramid import run_psa

        out, lse, kept, selection.tables = run_psa(qp, kp, vp, selection.levels, bs, scale, selection.tables)
    else:
        early_stop, stats = cfg.sparse.early_stop, {}
        if early_stop and selection.tables is None:  # early stop walks each row by pooled score, descending
            selection.tables = score_sorted_block_table(mask, pooled_scores(qp, kp, bs, scale), selection.max_kv)
        out, lse = run_kernel(qp, kp, vp, mask, bs, scale, cfg.quant, selection.block_table(),
                              compensate=cfg.compensate, early_stop=early_stop, stats=stats)
        kept = _pair_counts(mask, n, bs) if "walked" not in stats else walked_pairs(
            selection.tables[0], stats["walked"], n, bs, bs)
    if cfg.compensate != "none" and selection.levels is not None:  # the pyramid kernel: the separate pass
        out, lse = compensate_skipped(out, lse, qp, kp, vp, mask, bs, scale, first_order=cfg.compensate == "pisa")
    if q_perm is not None:  # back to the input order: one scatter by q_perm (no argsort for its inverse)
        out = _scatter(out, q_perm)
        lse = torch.empty_like(lse).scatter_(2, q_perm, lse)
    return SparseResult(out=out, lse=lse, block_mask=mask, kept=kept, total=float(b * h * n * n))


def dense_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                  max_chunk_elements: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q ``[B, H, M, D]`` over a few keys ``[B, H, T, D]`` with its log-sum-exp, in
    float32 over row chunks. ``bias``: additive float ``[B, 1|H, 1, T]`` (``-inf`` drops a key)."""
    b, h, m, _ = q.shape
    t = k.shape[2]
    rows = max(1, max_chunk_elements // max(1, b * h * t))
    outs, lses = [], []
    kf, vf = k.float(), v.float()
    for r0 in range(0, m, rows):
        logits = (q[:, :, r0:r0 + rows].float() @ kf.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
        outs.append(p @ vf)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax-exact merge of two attentions over disjoint key sets (float32)."""
    total = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - total).nan_to_num(0.0).unsqueeze(-1)
    wb = torch.exp(lse_b - total).nan_to_num(0.0).unsqueeze(-1)
    return wa * out_a.float() + wb * out_b.float()


def key_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A key-only SDPA mask (bool: True = attend, or additive float) as additive float32 bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visual: slice, request: SparseRequest,
                    dense_fn: Callable[..., torch.Tensor], attn_mask: torch.Tensor | None = None,
                    scale: float | None = None) -> tuple[torch.Tensor, SparseResult]:
    """Attention over ``[B, H, S, D]`` whose tokens ``visual`` are image/video tokens and the rest text.

    ``dense_fn(q, k, v, attn_mask=..., scale=...)`` is the original SDPA, used for the text queries.
    ``attn_mask``: None or a key-only mask ``[B|1, 1|H, 1, S]`` (e.g. HunyuanVideo's text padding);
    visual keys must not be masked (the caller checks).
    """
    s, d = q.shape[2], q.shape[-1]
    scale_value = 1.0 / math.sqrt(d) if scale is None else scale
    qv, kv, vv = q[:, :, visual], k[:, :, visual], v[:, :, visual]
    result = sparse_self_attention(qv, kv, vv, request, scale_value)
    if visual.start == 0 and visual.stop == s:
        return result.out, result
    text_idx = torch.cat([torch.arange(0, visual.start, device=q.device),  # no read-back (nonzero would sync)
                          torch.arange(visual.stop, s, device=q.device)])
    kt, vt = k.index_select(2, text_idx), v.index_select(2, text_idx)
    bias = key_bias(attn_mask)
    bias_t = None if bias is None else bias.index_select(-1, text_idx)
    out_t, lse_t = dense_partial(qv, kt, vt, scale_value, bias_t)
    out_vis = merge(result.out, result.lse, out_t, lse_t).to(q.dtype)
    qt = q.index_select(2, text_idx)
    mask_rows = attn_mask
    out_text = dense_fn(qt, k, v, attn_mask=mask_rows, scale=scale)
    out = torch.empty_like(q)
    out[:, :, visual] = out_vis
    out[:, :, text_idx] = out_text.to(q.dtype)
    return out, result
