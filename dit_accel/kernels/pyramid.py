"""Pyramid sparse attention (PSA) forward: pooled K/V, level tables, Triton kernel and PyTorch reference.

PSA (Li, Gu, Lin, Wang & Zhuang, "PSA: Pyramid Sparse Attention for Efficient Video Understanding and
Generation", 2025) replaces the keep/skip block mask of block-sparse attention by a *level* per
(q-block, kv-block): the block's keys and values at full resolution (level 0), mean-pooled over 2, 4 or 8
consecutive tokens (levels 1, 2, 3), or skipped. A pooled key averages ``c`` real keys (``c = 2**l``;
fewer only in the group that holds the sequence end) and stands for all of them, so its logit gets
``+ log(c)``: if the ``c`` keys were equal, the pooled key gives exactly the attention they would have
given. Every level of a row shares one softmax::

    out_i = sum_(j, l) exp(s_ij^l) v_j^l / sum_(j, l) exp(s_ij^l),   s_ij^l = scale * q_i . k_j^l + log(c_j^l)

over the pooled keys ``j`` of the kv-blocks the row lists at level ``l``. Which level each block gets is
the caller's choice (:mod:`dit_accel.attention.pyramid` assigns them from block scores, as the paper does).

The table is the block-sparse table (:mod:`dit_accel.kernels.block_sparse`) plus a level per entry:

* ``kv_indices`` int32 ``[B, H, num_q_blocks, max_entries]`` — kv-block index of each entry;
* ``kv_levels`` int32, same shape — its level, 0 (full) to 3 (8x pooled);
* ``kv_counts`` int32 ``[B, H, num_q_blocks]`` — valid leading entries of each row.

Conventions (kernel and reference agree on all of them): a row's valid entries are ordered by
non-decreasing level (:func:`pyramid_table` writes them so; the kernel walks the levels one after the
other); a kv-block appears at most once per row, at one level; a row with no entry gives zeros and a
log-sum-exp of ``-inf``; the log-sum-exp is float32, natural log, of the scaled scores *with* the
``log(c)`` offsets, i.e. an estimate of the full mass of the represented keys (so outputs merge exactly
with other key sets through it). The pooled tensors ``K_l, V_l`` are ``[B, H, ceil(S / 2**l), D]``, made
once per call by :func:`pool_kv` (float32 means, stored in the input dtype); groups are aligned to
multiples of ``2**l`` from the start of the sequence, hence to every kv-block (``block_n`` is a multiple
of 8).

Dispatch: the Triton kernel (:mod:`dit_accel.kernels._pyramid_triton`) on CUDA tensors, or on CPU tensors
under ``TRITON_INTERPRET=1`` (tests); everywhere else :func:`pyramid_attention_reference`'s arithmetic.
Unlike the block-sparse kernel this one is not a ``torch.library`` custom op yet: under ``torch.compile``
the launch is a graph break (:func:`torch.compiler.disable`).

Departures from the paper's kernel: levels stop at 8x (the paper's configurations use 1/2/4/8); its
cosine-similarity cap on the pooling level of a block is not implemented (off in its published
configurations); no TMA or block-tile decoupling beyond what :mod:`~dit_accel.kernels._pyramid_triton`
describes; forward only.
"""

from __future__ import annotations

import math

import torch

from .block_sparse import (SUPPORTED_HEAD_DIMS, _cdiv, _interpret, _use_triton, check_block_sizes,
                           check_no_repeats, check_qkv, check_sm_scale, check_table_entries, check_table_shapes,
                           masked_softmax_attention, scatter_table, table_width)

__all__ = [
    "PYRAMID_LEVELS",
    "pool_kv",
    "pyramid_table",
    "pyramid_table_to_levels",
    "pyramid_attention",
    "pyramid_attention_reference",
    "pyramid_pair_counts",
]

#: levels 0 (full resolution), 1 (2x), 2 (4x) and 3 (8x mean-pooled keys/values).
PYRAMID_LEVELS = 4
_FN = "pyramid_attention"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- pooling and tables


def pool_kv(x: torch.Tensor, levels: int = PYRAMID_LEVELS - 1) -> list[torch.Tensor]:
    """``[x, x_1, ..., x_levels]``: ``x_l`` ``[B, H, ceil(S / 2**l), D]`` is the mean of each group of ``2**l``
    consecutive tokens of ``x [B, H, S, D]`` (the last group: of its real tokens only), contiguous, in
    x's dtype (sums in float32)."""
    s = x.shape[2]
    span = 1 << levels
    pad = _cdiv(s, span) * span - s
    sums = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    counts = torch.nn.functional.pad(torch.ones(s, device=x.device), (0, pad))
    out = [x]
    for level in range(1, levels + 1):
        sums = sums.view(*sums.shape[:2], -1, 2, sums.shape[-1]).sum(-2)
        counts = counts.view(-1, 2).sum(-1)
        n = _cdiv(s, 1 << level)
        out.append((sums[:, :, :n] / counts[:n, None]).to(x.dtype).contiguous())
    return out


def _group_counts(s: int, level: int, device) -> torch.Tensor:
    """Real keys averaged by each pooled key of ``level`` (float ``[ceil(s / 2**level)]``)."""
    f = 1 << level
    n = _cdiv(s, f)
    counts = torch.full((n,), float(f), device=device)
    counts[-1] = s - (n - 1) * f
    return counts


def pyramid_table(levels: torch.Tensor, max_entries: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv_indices, kv_levels, kv_counts)`` of a level map ``levels`` (integer ``[B, H, nq, nk]``, ``-1`` =
    skipped, else 0..3): each row's entries grouped by level, ascending block index within a level, padded
    with zeros. ``max_entries``: the table width (at least the largest row count); default the largest
    row count (a read-back, i.e. a host sync on CUDA)."""
    if not isinstance(levels, torch.Tensor) or levels.dim() != 4 or levels.dtype.is_floating_point:
        raise ValueError(f"pyramid_table: levels must be an integer tensor [B, H, nq, nk], got "
                         f"{getattr(levels, 'dtype', type(levels).__name__)} {tuple(getattr(levels, 'shape', ()))}")
    nk = levels.shape[-1]
    lv = levels.long()
    visited = (lv >= 0) & (lv < PYRAMID_LEVELS)
    counts = visited.sum(-1, dtype=torch.int32)
    width = table_width("pyramid_table", "max_entries", max_entries, counts, nk)
    blocks = torch.arange(nk, device=levels.device)
    key = torch.where(visited, lv * nk + blocks, torch.full_like(lv, PYRAMID_LEVELS * nk))  # skipped last
    key = torch.sort(key, dim=-1).values[..., :width]
    if width > nk:
        key = torch.nn.functional.pad(key, (0, width - nk), value=PYRAMID_LEVELS * nk)
    valid = key < PYRAMID_LEVELS * nk
    idx = torch.where(valid, key % nk, 0).to(torch.int32)
    lvl = torch.where(valid, key // nk, 0).to(torch.int32)
    return idx.contiguous(), lvl.contiguous(), counts.contiguous()


def pyramid_table_to_levels(kv_indices: torch.Tensor, kv_levels: torch.Tensor, kv_counts: torch.Tensor,
                            num_kv_blocks: int) -> torch.Tensor:
    """The int8 level map ``[B, H, nq, num_kv_blocks]`` (``-1`` = skipped) a pyramid table describes."""
    return scatter_table(kv_indices, kv_counts, num_kv_blocks, kv_levels.to(torch.int8), -1, torch.int8)


def _level_counts(kv_levels: torch.Tensor, kv_counts: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, H, nq, 4]``: valid entries of each row at each level (the kernel's walk bounds)."""
    width = kv_levels.shape[-1]
    valid = torch.arange(width, device=kv_levels.device) < kv_counts.unsqueeze(-1).long()
    lv = torch.where(valid, kv_levels.long(), torch.full_like(kv_levels, PYRAMID_LEVELS, dtype=torch.long))
    return torch.stack([(lv == level).sum(-1) for level in range(PYRAMID_LEVELS)], -1).to(torch.int32).contiguous()


def pyramid_pair_counts(levels: torch.Tensor, s: int, block_m: int, block_n: int) -> torch.Tensor:
    """float32 scalar: query-key pairs a level map computes, a pooled key counting once (so a block at level
    ``l`` costs about ``1 / 2**l`` of its full-resolution pairs)."""
    nq, nk = levels.shape[-2:]
    rows = torch.full((nq,), float(block_m), device=levels.device)
    rows[-1] = s - block_m * (nq - 1)
    total = torch.zeros((), device=levels.device)
    for level in range(PYRAMID_LEVELS):
        bn_l = block_n >> level
        s_l = _cdiv(s, 1 << level)
        keys = (s_l - torch.arange(nk, device=levels.device) * bn_l).clamp(0, bn_l).float()
        total = total + torch.einsum("bhqk,q,k->", (levels == level).float(), rows, keys)
    return total


# ----------------------------------------------------------------------------- validation


def _check_inputs(q, k, v, kv_indices, kv_levels, kv_counts, block_m, block_n, sm_scale):
    """Shapes and dtypes (no device sync)."""
    check_qkv(_FN, q, k, v, _FLOAT_DTYPES, SUPPORTED_HEAD_DIMS)
    check_block_sizes(_FN, block_m, block_n)
    check_sm_scale(_FN, sm_scale)
    check_table_shapes(_FN, q, kv_indices, kv_counts, block_m)
    if not isinstance(kv_levels, torch.Tensor) or kv_levels.dtype != torch.int32:
        raise ValueError(f"{_FN}: kv_levels must be int32 (a torch.Tensor), got "
                         f"{getattr(kv_levels, 'dtype', type(kv_levels).__name__)}")
    if kv_levels.shape != kv_indices.shape or kv_levels.device != kv_indices.device:
        raise ValueError(f"{_FN}: kv_levels must have kv_indices' shape {tuple(kv_indices.shape)} and device, got "
                         f"{tuple(kv_levels.shape)} on {kv_levels.device}")


def _check_table_values(kv_indices, kv_levels, kv_counts, s, block_n):
    """Value checks (they read the table back: a device sync on CUDA)."""
    valid, used = check_table_entries(_FN, "max_entries", kv_indices, kv_counts, s, block_n)
    if not used.numel():
        return
    lv = kv_levels[valid]
    if int(lv.min()) < 0 or int(lv.max()) >= PYRAMID_LEVELS:
        raise ValueError(f"{_FN}: kv_levels must lie in [0, {PYRAMID_LEVELS - 1}], got range "
                         f"[{int(lv.min())}, {int(lv.max())}]")
    big = torch.full_like(kv_levels, PYRAMID_LEVELS)
    lvl = torch.where(valid, kv_levels, big)
    if bool((lvl[..., 1:] < lvl[..., :-1]).any()):
        raise ValueError(f"{_FN}: each row's entries must be ordered by non-decreasing level "
                         "(pyramid_table writes them so)")
    check_no_repeats(_FN, kv_indices, valid, "a kv-block is listed twice in one row (at most one level per block)")


# ----------------------------------------------------------------------------- reference


def pyramid_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                                kv_levels: torch.Tensor, kv_counts: torch.Tensor, *, block_m: int = 128,
                                block_n: int = 128, sm_scale: float | None = None, return_lse: bool = False,
                                validate: bool = True, max_chunk_elements: int = 1 << 24):
    """Plain-PyTorch pyramid attention in float32 (the CPU path and the test oracle): the same pooled
    tensors as the kernel (:func:`pool_kv`), every level's pooled keys concatenated on one key axis with
    their ``log(count)`` offsets, one explicit softmax per row over the listed ones. q-blocks are processed
    in chunks of about ``max_chunk_elements`` scores."""
    _check_inputs(q, k, v, kv_indices, kv_levels, kv_counts, block_m, block_n, sm_scale)
    if validate and not torch.compiler.is_compiling():
        _check_table_values(kv_indices, kv_levels, kv_counts, q.shape[2], block_n)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _reference(q, pool_kv(k), pool_kv(v), kv_indices, kv_levels, kv_counts, block_m, block_n, scale,
                          max_chunk_elements)
    return (out, lse) if return_lse else out


def _reference(q, k_levels, v_levels, kv_indices, kv_levels, kv_counts, block_m: int, block_n: int, scale: float,
               max_chunk_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    S = q.shape[2]
    nk = _cdiv(S, block_n)
    levels = pyramid_table_to_levels(kv_indices, kv_levels, kv_counts, nk)            # [B, H, nq, nk]
    keys = torch.cat([t.float() for t in k_levels], 2)                                 # [B, H, S_all, D]
    vals = torch.cat([t.float() for t in v_levels], 2)
    bias = torch.cat([_group_counts(S, lvl, q.device).log() for lvl in range(PYRAMID_LEVELS)])  # [S_all]
    col_mask = torch.cat([(levels == lvl).repeat_interleave(block_n >> lvl, dim=-1)[..., :_cdiv(S, 1 << lvl)]
                          for lvl in range(PYRAMID_LEVELS)], -1)                       # [B, H, nq, S_all]
    out, lse = masked_softmax_attention(q.float(), keys, vals, col_mask, block_m, scale, max_chunk_elements, bias)
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- dispatch


@torch.compiler.disable
def _run(q, k, v, kv_indices, kv_levels, kv_counts, block_m, block_n, scale, return_lse, tile):
    k_levels, v_levels = pool_kv(k), pool_kv(v)
    if _use_triton(q):
        from ._pyramid_triton import pyramid_attention_triton

        return pyramid_attention_triton(q, k_levels, v_levels, kv_indices, _level_counts(kv_levels, kv_counts),
                                        block_m=block_m, block_n=block_n, qk_scale=scale * 1.4426950408889634,
                                        interpret=not q.is_cuda and _interpret(), return_lse=return_lse, tile=tile)
    return _reference(q, k_levels, v_levels, kv_indices, kv_levels, kv_counts, block_m, block_n, scale)


def pyramid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                      kv_levels: torch.Tensor, kv_counts: torch.Tensor, *, block_m: int = 128, block_n: int = 128,
                      sm_scale: float | None = None, return_lse: bool = False, validate: bool | None = None,
                      tile: tuple[int, int, int, int] | None = None):
    """Pyramid sparse attention forward (module docstring: the maths and the table).

    Args:
        q, k, v: ``[B, H, S, D]`` float16 / bfloat16 / float32, one dtype and device, ``D`` in
            :data:`~dit_accel.kernels.block_sparse.SUPPORTED_HEAD_DIMS`, any ``S``, any strides.
        kv_indices, kv_levels: int32 ``[B, H, ceil(S / block_m), max_entries]``: kv-block and level (0..3)
            of each entry, a row's entries ordered by non-decreasing level (:func:`pyramid_table`).
        kv_counts: int32 ``[B, H, ceil(S / block_m)]``, valid entries per row (0: zeros, lse ``-inf``).
        block_m, block_n: tokens per q-block / kv-block (in ``SUPPORTED_BLOCK_SIZES``).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, H, S]``.
        validate: check the table's values (range, level order, no repeated block); default on for CPU
            tensors, off on CUDA (a host sync); never while ``torch.compile`` traces.
        tile: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` pins the kernel's level-0 tile (no autotuning).

    Returns:
        ``out`` ``[B, H, S, D]`` in q's dtype, or ``(out, lse)`` when ``return_lse``.
    """
    _check_inputs(q, k, v, kv_indices, kv_levels, kv_counts, block_m, block_n, sm_scale)
    if (validate if validate is not None else not q.is_cuda) and not torch.compiler.is_compiling():
        _check_table_values(kv_indices, kv_levels, kv_counts, q.shape[2], block_n)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _run(q, k, v, kv_indices, kv_levels, kv_counts, block_m, block_n, scale, return_lse, tile)
    return (out, lse) if return_lse else out
