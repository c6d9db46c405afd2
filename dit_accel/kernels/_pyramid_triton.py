"""Pyramid sparse attention (PSA) forward in Triton (imported only when Triton is used).

For each (batch, head) and q-block the kernel walks a list of ``(kv-block, level)`` entries and
computes one softmax over all of them: at level 0 the kv-block's own keys and values, at level
``l = 1, 2, 3`` the block's keys and values mean-pooled over groups of ``2**l`` consecutive tokens
(``K_l``, ``V_l``, made once per call by :func:`dit_accel.kernels.pyramid.pool_kv`). A pooled key
stands for the ``c`` real keys it averages, so its logit carries ``+ log(c)`` (``c = 2**l``, fewer
only in the group that holds the sequence end): the softmax then weighs it like ``c`` copies of one
key. The table's layout and conventions are in :mod:`dit_accel.kernels.pyramid`.

It is the FlashAttention-2 forward of :mod:`dit_accel.kernels._block_sparse_triton` (online softmax,
output normalised once at the end; read that module first) with four walks instead of one. One
program computes ``BLOCK_M`` query rows; the row's entries are grouped by level (the table
convention), so the launcher passes the per-level entry counts and the kernel walks the level-0
entries, then the level-1 entries, and so on, all updating one running max / sum / accumulator.

Choices, and why:

* One walk per level (:func:`_walk_level`, inlined four times with the level as a compile-time
  constant) rather than one loop that branches on each entry's level: each walk has a fixed pointer
  base, tile width and logit offset, so the compiler sees four plain FA2 loops it can pipeline, and no
  per-entry branch or pointer select is needed.
* ``exp2`` with ``sm_scale * log2(e)`` folded into ``qk_scale`` as in the block-sparse kernel; in these
  units the pooled logit offset ``log2(2**l)`` is exactly ``l`` (one add per score at pooled levels;
  level 0 is the block-sparse inner loop unchanged).
* Tiles per level: level 0 uses the autotuned ``BLOCK_N``; level ``l`` has ``TABLE_BN >> l`` pooled keys
  per kv-block and a fixed tile ``TILE_l`` (the launcher's choice: the pooled block length, at most 64, at
  least 16 because ``tl.dot`` needs 16). When a pooled block is shorter than 16 keys (``TABLE_BN = 64``
  at 8x, ``32`` at 4x and 8x...) one tile gathers the pooled keys of ``TILE_l // (TABLE_BN >> l)``
  consecutive entries of the list, so no tile column is wasted on padding; entries past the level's
  count and keys past the sequence end are masked.
* Masking at the sequence end only when ``S`` is not a multiple of the table block (``EVEN_N``), and
  then only in the tile that holds the end (a uniform branch): keys past the end score ``-inf``, and
  the last pooled key of a level gets ``log2(c)`` with ``c`` its real-key count instead of ``l``.
* Plain pointer loads (no TMA): the pooled tensors are made contiguous by the wrapper (their strides are
  computed in the kernel, so the compiler knows the unit inner stride); level 0 takes K/V with any
  strides, like the block-sparse kernel's pointer path.
* The running max starts at a large finite negative value, so a tile wholly past ``S`` cannot produce
  ``-inf - (-inf) = nan``; rows with no entry output zeros and a log-sum-exp of ``-inf``.
* Jitted lazily (:func:`_kernel`), like the block-sparse kernel, so ``TRITON_INTERPRET`` is read when the
  kernel is first needed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton_common import aot_compile_kernel, launch_rows, jit_helpers, lazy_kernel

#: tile used under the interpreter (numpy is slow): small, and below the test tables so that the
#: sub-tile, shared-row and gathered-entry paths are exercised.
INTERPRET_BLOCK = 16
#: widest tile of a pooled level (its pooled block length, capped here).
POOLED_TILE_MAX = 64
#: tl.dot's smallest tile side.
MIN_TILE = 16


def pooled_tile(table_bn: int, level: int) -> int:
    """Tile width of pyramid level ``level`` for kv-blocks of ``table_bn`` keys."""
    return max(MIN_TILE, min(POOLED_TILE_MAX, table_bn >> level))


def _walk_level(acc, m_i, l_i, q, K, V, idx_base, stride_ik, first, count, k_base, v_base,
                stride_ks, stride_kd, stride_vs, stride_vd, S, qk_scale,
                LEVEL: tl.constexpr, HEAD_DIM: tl.constexpr, BN_L: tl.constexpr, TILE: tl.constexpr,
                EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """Entries ``first .. first + count - 1`` of the row, all at ``LEVEL``: the FA2 inner loop over their
    ``BN_L`` (pooled) keys each, ``TILE`` at a time; returns the updated ``(acc, m_i, l_i)``."""
    FACTOR: tl.constexpr = 1 << LEVEL
    s_l = (S + FACTOR - 1) // FACTOR                      # pooled keys of this level
    offs_n = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    if LEVEL > 0 and not EVEN_N:  # the last pooled key may average fewer than FACTOR real keys
        last_fix = tl.math.log2((S - (s_l - 1) * FACTOR) * 1.0) - LEVEL
    if BN_L >= TILE:  # each entry is BN_L // TILE contiguous tiles; (entry, sub-tile) flattened into one loop
        SUB: tl.constexpr = BN_L // TILE
        for t in range(first * SUB, (first + count) * SUB):
            kb = tl.load(idx_base + (t // SUB) * stride_ik)
            start_n = kb * BN_L + (t % SUB) * TILE
            cols = start_n + offs_n
            if EVEN_N:
                k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd)
            else:
                k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                            mask=cols[None, :] < s_l, other=0.0)
            if DOT_F32:  # interpreter only: its tl.dot mishandles bfloat16 (Triton 3.9)
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            if LEVEL > 0:
                s = s + LEVEL                             # log2(FACTOR): a pooled key stands for FACTOR keys
            if not EVEN_N:
                if start_n + TILE >= s_l:  # only the tile holding the sequence end: a uniform branch
                    s = tl.where(cols[None, :] < s_l, s, float("-inf"))
                    if LEVEL > 0:
                        s = s + tl.where(cols[None, :] == s_l - 1, last_fix, 0.0)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if EVEN_N:
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd)
            else:
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                            mask=cols[:, None] < s_l, other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
    else:  # pooled blocks shorter than a tile: one tile gathers GROUP consecutive entries
        GROUP: tl.constexpr = TILE // BN_L
        for t in range(0, (count + GROUP - 1) // GROUP):
            e = t * GROUP + offs_n // BN_L
            ok = e < count
            kb = tl.load(idx_base + (first + e) * stride_ik, mask=ok, other=0)
            cols = kb * BN_L + offs_n % BN_L
            ok = ok & (cols < s_l)
            k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=ok[None, :],
                        other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale + LEVEL
            if LEVEL > 0 and not EVEN_N:
                s = s + tl.where(cols[None, :] == s_l - 1, last_fix, 0.0)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=ok[:, None],
                        other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
    return acc, m_i, l_i


def _psa_fwd_kernel(
    Q, K0, K1, K2, K3, V0, V1, V2, V3, O, LSE, KV_IDX, LVL_CNT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq, stride_cl,
    H, S, qk_scale, KV_BUCKET,
    HEAD_DIM: tl.constexpr, TABLE_BM: tl.constexpr, TABLE_BN: tl.constexpr,
    TILE1: tl.constexpr, TILE2: tl.constexpr, TILE3: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    start_m = pid_m * BLOCK_M
    qb = start_m // TABLE_BM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    if EVEN_M:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < S, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    idx_base = KV_IDX + b * stride_ib + h * stride_ih + qb * stride_iq
    cnt_base = LVL_CNT + b * stride_cb + h * stride_ch + qb * stride_cq
    c0 = tl.load(cnt_base)
    c1 = tl.load(cnt_base + stride_cl)
    c2 = tl.load(cnt_base + 2 * stride_cl)
    c3 = tl.load(cnt_base + 3 * stride_cl)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Level 0: the kv-blocks' own keys (any strides). Pooled levels: contiguous [B, H, ceil(S / 2**l), D].
    acc, m_i, l_i = _walk_level(acc, m_i, l_i, q, K0, V0, idx_base, stride_ik, 0, c0,
                                K0 + b * stride_kb + h * stride_kh, V0 + b * stride_vb + h * stride_vh,
                                stride_ks, stride_kd, stride_vs, stride_vd, S, qk_scale,
                                0, HEAD_DIM, TABLE_BN, BLOCK_N, EVEN_N, DOT_PRECISION, DOT_F32)
    off1 = bh * ((S + 1) // 2) * HEAD_DIM
    acc, m_i, l_i = _walk_level(acc, m_i, l_i, q, K1, V1, idx_base, stride_ik, c0, c1, K1 + off1, V1 + off1,
                                HEAD_DIM, 1, HEAD_DIM, 1, S, qk_scale,
                                1, HEAD_DIM, TABLE_BN // 2, TILE1, EVEN_N, DOT_PRECISION, DOT_F32)
    off2 = bh * ((S + 3) // 4) * HEAD_DIM
    acc, m_i, l_i = _walk_level(acc, m_i, l_i, q, K2, V2, idx_base, stride_ik, c0 + c1, c2, K2 + off2, V2 + off2,
                                HEAD_DIM, 1, HEAD_DIM, 1, S, qk_scale,
                                2, HEAD_DIM, TABLE_BN // 4, TILE2, EVEN_N, DOT_PRECISION, DOT_F32)
    off3 = bh * ((S + 7) // 8) * HEAD_DIM
    acc, m_i, l_i = _walk_level(acc, m_i, l_i, q, K3, V3, idx_base, stride_ik, c0 + c1 + c2, c3, K3 + off3,
                                V3 + off3, HEAD_DIM, 1, HEAD_DIM, 1, S, qk_scale,
                                3, HEAD_DIM, TABLE_BN // 8, TILE3, EVEN_N, DOT_PRECISION, DOT_F32)

    # Rows with no entry: l_i == 0 -> output 0, lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    if EVEN_M:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < S)
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        lse_ptrs = LSE + bh * S + offs_m
        if EVEN_M:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < S)


def _configs() -> list[triton.Config]:
    """Autotune space on CUDA: level-0 tiles 64/128, 4/8 warps, 2/3 stages; ``DIT_ACCEL_PSA_CONFIG``
    ("BLOCK_M,BLOCK_N,num_warps,num_stages") pins one."""
    pinned = os.environ.get("DIT_ACCEL_PSA_CONFIG")
    space = [(bm, bn, w, s) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3)]
    if pinned:
        space = [tuple(int(x) for x in pinned.split(","))]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in space]


def _prune(configs, named_args, **kwargs):
    """Keep tiles that divide the table blocks; a table block below 64 gets a tile of its size."""
    tbm, tbn, d = kwargs["TABLE_BM"], kwargs["TABLE_BN"], kwargs["HEAD_DIM"]
    kept = [c for c in configs if tbm % c.kwargs["BLOCK_M"] == 0 and tbn % c.kwargs["BLOCK_N"] == 0]
    if d >= 128:  # 128-row tiles with D=128 need 8 warps to keep the fp32 accumulator in registers
        kept = [c for c in kept if not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4)] or kept
    if not kept:
        bm, bn = min(tbm, 64), min(tbn, 64)
        kept = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=s) for s in (2, 3)]
    return kept


_KERNELS: dict[str, object] = {}


def _kernel(interpret: bool, autotune: bool = True):
    """The jitted kernel (and its jitted helper): autotuned on CUDA, plain under the interpreter or pinned."""
    return lazy_kernel(
        _KERNELS, _psa_fwd_kernel, interpret, autotune, configs=_configs, prune=_prune,
        key=["S", "KV_BUCKET", "HEAD_DIM", "TABLE_BM", "TABLE_BN"], module_globals=globals(), helpers=("_walk_level",),
        error="pyramid_attention: TRITON_INTERPRET=1 must be set before triton is first imported; "
              "triton.language was loaded in compiled mode, so the interpreter cannot run the kernel on CPU "
              "tensors. Set it at process start, or unset it to use the PyTorch reference on CPU.")


def pyramid_attention_triton(q, k_levels, v_levels, kv_indices, level_counts, *, block_m: int, block_n: int,
                             qk_scale: float, interpret: bool, return_lse: bool, tile=None):
    """Launch the kernel on checked inputs (see ``dit_accel.kernels.pyramid.pyramid_attention``).

    ``k_levels`` / ``v_levels``: ``[K, K_1, K_2, K_3]`` (level 0 with any strides, pooled ones contiguous
    ``[B, H, ceil(S / 2**l), D]``); ``level_counts`` int32 ``[B, H, nq, 4]``: entries per level of each row,
    whose entries ``kv_indices`` lists grouped by level. ``tile`` = ``(BLOCK_M, BLOCK_N, num_warps,
    num_stages)`` pins the level-0 tile (no autotuning)."""
    B, H, S, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, S) if return_lse else (1,), dtype=torch.float32, device=q.device)
    common = dict(HEAD_DIM=D, TABLE_BM=block_m, TABLE_BN=block_n,
                  TILE1=pooled_tile(block_n, 1), TILE2=pooled_tile(block_n, 2), TILE3=pooled_tile(block_n, 3),
                  EVEN_M=S % block_m == 0, EVEN_N=S % block_n == 0, STORE_LSE=return_lse,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  DOT_F32=interpret and q.dtype == torch.bfloat16)
    pinned = None
    if tile is not None:
        bm, bn, warps, stages = tile
        pinned = dict(BLOCK_M=bm, BLOCK_N=bn)
        if not interpret:
            pinned.update(num_warps=warps, num_stages=stages)
    elif interpret:
        pinned = dict(BLOCK_M=min(block_m, INTERPRET_BLOCK), BLOCK_N=min(block_n, INTERPRET_BLOCK))
    k0, v0 = k_levels[0], v_levels[0]
    args = (q, *k_levels, *v_levels, out, lse, kv_indices, level_counts,
            *q.stride(), *k0.stride(), *v0.stride(), *out.stride(), *kv_indices.stride(), *level_counts.stride(),
            H, S, qk_scale, triton.next_power_of_2(kv_indices.shape[-1]))  # last: autotune key only
    launch_rows(_kernel(interpret, autotune=pinned is None), args, common, pinned, rows=S, programs=B * H,
                interpret=interpret, device=q.device)
    return out, (lse if return_lse else None)


def aot_compile(*, head_dim: int = 128, block_m: int = 128, block_n: int = 64, table_block: int = 128,
                num_warps: int = 8, num_stages: int = 2, even: bool = False, arch: int = 90):
    """Compile the kernel ahead of time for ``sm_<arch>`` without a GPU (bf16, contiguous inputs; for tests and
    inspection): returns the compiled kernel (``.asm["ttgir"]``, ``.metadata.shared``...). Needs Triton
    imported in compiled mode (``TRITON_INTERPRET`` unset)."""
    jit_helpers(globals(), "_walk_level")
    pointers = {n: "*bf16" for n in ("Q", "K0", "K1", "K2", "K3", "V0", "V1", "V2", "V3", "O")}
    pointers.update(LSE="*fp32", KV_IDX="*i32", LVL_CNT="*i32")
    return aot_compile_kernel(
        _psa_fwd_kernel, unit=("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_ik", "stride_cl"),
        constexprs=dict(HEAD_DIM=head_dim, TABLE_BM=table_block, TABLE_BN=table_block,
                        TILE1=pooled_tile(table_block, 1), TILE2=pooled_tile(table_block, 2),
                        TILE3=pooled_tile(table_block, 3), EVEN_M=even, EVEN_N=even, STORE_LSE=True,
                        DOT_PRECISION="tf32", DOT_F32=False, BLOCK_M=block_m, BLOCK_N=block_n),
        pointers=pointers, num_warps=num_warps, num_stages=num_stages, arch=arch)
