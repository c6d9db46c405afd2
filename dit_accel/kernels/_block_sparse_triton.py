"""Block-sparse FlashAttention forward in Triton (imported only when Triton is used).

For each (batch, head) the kernel computes ``O = softmax(sm_scale * Q K^T + M) V`` and, optionally,
each row's log-sum-exp, where the mask ``M`` is 0 on the kv-blocks that the block table lists for
the query's q-block and ``-inf`` elsewhere. It is the FlashAttention-2 forward (Dao, 2023: an online
softmax over key tiles, the output normalised once at the end) walking only the listed kv-blocks;
the table's layout and conventions are in :mod:`dit_accel.kernels.block_sparse`.

One program computes ``BLOCK_M`` query rows of one (batch, head): it reads the table row of the
q-block those rows belong to and walks its kv-blocks, ``BLOCK_N`` keys at a time.

Choices, and why:

* ``exp2`` with ``sm_scale * log2(e)`` folded into ``qk_scale``: one multiply per score feeds the
  hardware's ``exp2`` directly (``exp`` would add a multiply per score).
* Kernel tile versus table block: the tile (``BLOCK_M`` x ``BLOCK_N``, autotuned on CUDA) only has to
  divide the table block (``TABLE_BM`` x ``TABLE_BN``, the caller's ``block_m`` / ``block_n``), so the
  selection's granularity and the GPU's best tile are chosen independently. Several programs
  share one table row when ``BLOCK_M < TABLE_BM``; each kv-block is walked in ``TABLE_BN // BLOCK_N``
  sub-tiles. The (kv-block, sub-tile) loop is flattened into one loop so that the software pipeliner
  (``num_stages``) sees a single loop whose K/V loads it can prefetch.
* Masking only when ``S`` is not a multiple of the table block (constexpr ``EVEN_M`` / ``EVEN_N``):
  query rows past ``S`` are loaded as zeros and not stored; keys past ``S`` score ``-inf``, but only
  in the tile that holds the sequence end, behind a branch that is uniform across the program — a
  select on every score of every tile would cost an instruction per score for one tile's benefit.
* The running max starts at a large finite negative value, not ``-inf``, so that a sub-tile lying
  wholly past ``S`` cannot produce ``-inf - (-inf) = nan``.
* K/V tiles by TMA descriptors on sm_90+: one descriptor over ``[B, H, S, D]`` with the tensor's own
  strides (any 16-byte-aligned layout, so diffusers' transposed views need no copy), and the
  hardware returns zeros for keys past ``S``. ``DIT_ACCEL_TMA=0``, older GPUs or unaligned strides:
  pointer loads, which the pipeliner turns into ``cp.async`` copies ``num_stages`` deep.
* The autotune key holds the table's width rounded up to a power of two, so a sparse table is not
  run with the tile tuned for a dense one of the same length.
* The kernel is jitted lazily (:func:`_kernel`), so whether Triton interprets it is decided by
  ``TRITON_INTERPRET`` when it is first needed, not when this module is imported.
* Two optional extensions behind constexpr flags (:mod:`dit_accel.kernels.pisa` has their maths and
  papers), so that with both off the kernel compiles to the same instructions as without them:
  ``COMPENSATE`` streams the block means of the kv-blocks a row does not list through the same online
  softmax after the exact loop (PISA's zeroth order; 2 adds its shared first-order term, one ``D x D``
  product per program), and ``EARLY_STOP`` ends a row's walk once its remaining blocks are negligible.
  The early stop guards the loop body with a runtime branch, which the software pipeliner does not
  prefetch across (that variant runs unpipelined), and decides per q-block, so it runs with
  ``BLOCK_M`` equal to the table block.

How to choose tiles, what the autotune space holds and why, the Hopper compilation notes and the
H200 measurements behind these choices (including variants tried and dropped): ``docs/kernels.md``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton_common import aot_compile_kernel, launch_rows, interpreter_ready, lazy_kernel  # noqa: F401  (interpreter_ready: re-exported)

_LN2 = 0.6931471805599453
#: tile used under the interpreter: small (numpy is slow) and below the test tables' 32 so that
#: the sub-tile and shared-row paths are exercised (also the interpreter's COMP_BLOCK).
INTERPRET_BLOCK = 16
#: kv-block means streamed per step of the PISA compensation pass on CUDA.
COMP_BLOCK = 64


def _bsa_fwd_kernel(
    Q, K, V, O, LSE, KV_IDX, KV_CNT, KMEAN, VMEAN, HSUM, KEPT, WALKED,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    H, S, qk_scale, KV_BUCKET, NK, stop_eps,
    HEAD_DIM: tl.constexpr, TABLE_BM: tl.constexpr, TABLE_BN: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, COMPENSATE: tl.constexpr, COMP_BLOCK: tl.constexpr,
    EARLY_STOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    SUB: tl.constexpr = TABLE_BN // BLOCK_N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    qb = start_m // TABLE_BM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    if EVEN_M:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < S, other=0.0)
    if DOT_F32:  # interpreter only: its tl.dot mishandles bfloat16 (Triton 3.9)
        q = q.to(tl.float32)
    if not USE_TMA:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
    idx_base = KV_IDX + b * stride_ib + h * stride_ih + qb * stride_iq
    count = tl.load(KV_CNT + b * stride_cb + h * stride_ch + qb * stride_cq)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Early stop (pisa.py): `walking` turns false once the rest of the (score-sorted) row is negligible;
    # the later iterations then do nothing. Without it `walking` is the constant True: no branch at all.
    walking = True
    if EARLY_STOP:
        walking = count > 0
        walked = count * 0
        blk = tl.zeros([BLOCK_M], dtype=tl.float32)  # the current kv-block's exact mass per row, so far
        past_end = offs_m >= S                        # rows past S never hold the walk back

    for t in range(0, count * SUB):
        if walking:
            kb = tl.load(idx_base + (t // SUB) * stride_ik)
            start_n = kb * TABLE_BN + (t % SUB) * BLOCK_N
            cols = start_n + offs_n
            if USE_TMA:  # 4-d descriptors over [B, H, S, D]: keys past S arrive as zeros
                k = K.load([b.to(tl.int32), h.to(tl.int32), start_n, 0]).reshape(BLOCK_N, HEAD_DIM).T
            elif EVEN_N:
                k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd)  # K^T [D, BLOCK_N]
            else:
                k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                            mask=cols[None, :] < S, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
            if not EVEN_N:
                if start_n + BLOCK_N > S:  # only the tile holding the sequence end: a uniform branch
                    qk = tl.where(cols[None, :] < S, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if USE_TMA:
                v = V.load([b.to(tl.int32), h.to(tl.int32), start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            elif EVEN_N:
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd)  # V [BLOCK_N, D]
            else:
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                            mask=cols[:, None] < S, other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
            if EARLY_STOP:  # stop test after a kv-block's last sub-tile (pisa.py: the rule)
                blk = blk * alpha + tl.sum(p, 1)
                if t % SUB == SUB - 1:
                    remaining = (count - 1 - t // SUB).to(tl.float32)
                    ok = (remaining * blk <= stop_eps * l_i) | past_end
                    walked = t // SUB + 1
                    walking = tl.min(ok.to(tl.int32), 0) == 0
                    blk = tl.zeros([BLOCK_M], dtype=tl.float32)

    if EARLY_STOP:  # entries walked, one per table row (early stop runs one program per q-block)
        tl.store(WALKED + pid_bh.to(tl.int64) * tl.cdiv(S, TABLE_BM) + qb, walked)
    if COMPENSATE > 0:
        # PISA (pisa.py): every kv-block that the table row does not list joins the same online softmax
        # through its mean key: logit s * q . kmean_j + ln n_j, value vmean_j; COMP_BLOCK blocks per step.
        bh = pid_bh.to(tl.int64)
        offs_c = tl.arange(0, COMP_BLOCK)
        kept_base = KEPT + (bh * tl.cdiv(S, TABLE_BM) + qb) * NK
        mean_base = bh * NK * HEAD_DIM
        if COMPENSATE == 2:
            g_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # the approximated (zeroth-order) mass per row
        for c0 in range(0, NK, COMP_BLOCK):
            blocks = c0 + offs_c
            inside = blocks < NK
            kept = tl.load(kept_base + blocks, mask=inside, other=1)
            km = tl.load(KMEAN + mean_base + blocks[None, :] * HEAD_DIM + offs_d[:, None], mask=inside[None, :],
                         other=0.0)                                                  # [D, COMP_BLOCK]
            if DOT_F32:
                km = km.to(tl.float32)
            sizes = tl.minimum(S - blocks * TABLE_BN, TABLE_BN).to(tl.float32)
            logit = tl.dot(q, km, input_precision=DOT_PRECISION) * qk_scale + tl.math.log2(
                tl.maximum(sizes, 1.0))[None, :]
            logit = tl.where((kept == 0)[None, :], logit, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logit, 1))
            p = tl.math.exp2(logit - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if COMPENSATE == 2:
                g_i = g_i * alpha + tl.sum(p, 1)
            vm = tl.load(VMEAN + mean_base + blocks[:, None] * HEAD_DIM + offs_d[None, :], mask=inside[:, None],
                         other=0.0)                                                  # [COMP_BLOCK, D]
            if DOT_F32:
                vm = vm.to(tl.float32)
            acc = tl.dot(p.to(vm.dtype), vm, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        if COMPENSATE == 2:
            # First order, the paper's shared form: (s / S) * sum_j H_j, pre-scaled in HSUM, times q and
            # the approximated mass g_i.
            hs = tl.load(HSUM + bh * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
            if DOT_F32:
                hs = hs.to(tl.float32)
            acc += tl.dot(q, hs, input_precision=DOT_PRECISION) * g_i[:, None]

    # Rows with no kv-block (count == 0): l_i == 0 -> output 0, lse -inf.
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
        lse_ptrs = LSE + pid_bh.to(tl.int64) * S + offs_m
        if EVEN_M:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < S)


def _tma_pre_hook(nargs):
    """Autotuner hook: give the K / V descriptors the block shape of the config being run."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    for name in ("K", "V"):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]


def tma_ok(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address ``t``: unit inner stride, 16-byte base and outer strides."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        (st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])


def tma_descriptor(t: torch.Tensor, block_n: int):
    """A 4-d TMA descriptor over ``t [B, H, S, D]`` loading ``[1, 1, block_n, D]`` tiles (zeros past S)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, t.shape[-1]])


#: K / V tiles by TMA descriptors on sm_90+, in both kernels (``DIT_ACCEL_TMA=0``: cp.async pointer loads).
USE_TMA = os.environ.get("DIT_ACCEL_TMA", "1") != "0"


def use_tma(device: torch.device, interpret: bool, *tensors: torch.Tensor) -> bool:
    """TMA on (:data:`USE_TMA`), an sm_90+ GPU (or the interpreter), and every tensor addressable by it."""
    return (USE_TMA and (interpret or torch.cuda.get_device_capability(device) >= (9, 0))
            and all(tma_ok(t) for t in tensors))


def tile_configs(space, env: str, pre_hook) -> list[triton.Config]:
    """``triton.Config`` per ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of ``space``, or only the one
    pinned by the environment variable ``env`` ("BLOCK_M,BLOCK_N,num_warps,num_stages": no autotuning)."""
    pinned = os.environ.get(env)
    if pinned:
        space = [tuple(int(x) for x in pinned.split(","))]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=pre_hook)
            for bm, bn, w, s in space]


def hopper_configs() -> list[triton.Config]:
    """Autotune space on CUDA: tiles 64/128, 4/8 warps, 2/3 pipeline stages (pruned per table by
    :func:`_prune`), plus 64-row tiles with 4 warps and *one* stage; ``DIT_ACCEL_BSA_CONFIG`` pins one.

    The one-stage tiles need far less shared memory than the pipelined ones, so two programs share
    an SM and each hides the other's K/V loads, which a single stage does not prefetch
    (``docs/kernels.md``: why they are in the space, and the per-tile timings)."""
    space = [(bm, bn, w, s) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3)]
    return tile_configs(space + [(64, 64, 4, 1), (64, 128, 4, 1)], "DIT_ACCEL_BSA_CONFIG", _tma_pre_hook)


def _prune(configs, named_args, **kwargs):
    """Keep tiles that divide the table blocks; a table block below 64 gets a tile of its size."""
    tbm, tbn, d = kwargs["TABLE_BM"], kwargs["TABLE_BN"], kwargs["HEAD_DIM"]
    kept = [c for c in configs if tbm % c.kwargs["BLOCK_M"] == 0 and tbn % c.kwargs["BLOCK_N"] == 0]
    stop = bool(kwargs.get("EARLY_STOP"))
    if stop:  # early stop decides per q-block: one program per table row
        kept = [c for c in kept if c.kwargs["BLOCK_M"] == tbm]
    if d >= 128:  # 128x128 tiles with D=128 need 8 warps to keep the fp32 accumulator in registers
        kept = [c for c in kept if not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4)] or kept
    if not kept:
        bm, bn = (tbm if stop else min(tbm, 64)), min(tbn, 64)
        kept = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=s) for s in (2, 3)]
    return kept


_KERNELS: dict[str, object] = {}


def _kernel(interpret: bool, autotune: bool = True):
    """The jitted kernel: autotuned on CUDA, plain (the launch names the tile) under the interpreter or
    with ``autotune=False``."""
    return lazy_kernel(
        _KERNELS, _bsa_fwd_kernel, interpret, autotune, configs=hopper_configs, prune=_prune,
        key=["S", "KV_BUCKET", "HEAD_DIM", "TABLE_BM", "TABLE_BN", "USE_TMA", "COMPENSATE", "EARLY_STOP"],
        error="block_sparse_attention: TRITON_INTERPRET=1 must be set before triton is first imported "
              "(diffusers and torch._dynamo import it): triton.language was loaded in compiled mode, so "
              "the interpreter cannot run the kernel on CPU tensors. Set it at process start, or unset it "
              "to use the PyTorch reference on CPU.")


def check_tile(tile, table_m: int, table_n: int) -> tuple[int, int, int, int, int | None]:
    """``tile`` = ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])`` as a 5-tuple; ValueError unless
    both tile sides are powers of two from 16 that divide the table block."""
    bm, bn, warps, stages, *rest = tile
    maxnreg = rest[0] if rest else None
    for name, t, tb in (("BLOCK_M", bm, table_m), ("BLOCK_N", bn, table_n)):
        if t < 16 or t & (t - 1) or tb % t:
            raise ValueError(f"tile {name}={t} must be a power of two >= 16 dividing the table block {tb}")
    return bm, bn, warps, stages, maxnreg


def block_sparse_attention_triton(q, k, v, kv_indices, kv_counts, *, block_m: int, block_n: int,
                                  qk_scale: float, interpret: bool, return_lse: bool, tile=None,
                                  compensate: int = 0, summaries=None, kept=None, early_stop: float | None = None):
    """Launch the kernel; inputs are assumed checked (see ``block_sparse_attention``).

    ``tile``: ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])`` launches that config without
    autotuning (``benchmarks/bench_tile_sweep.py``); under the interpreter only the tile sides matter.
    Default: autotuned on CUDA, :data:`INTERPRET_BLOCK` under the interpreter.

    The PISA / early-stop extensions (:mod:`dit_accel.kernels.pisa` checks their inputs): ``compensate``
    1 (zeroth order) or 2 (plus first order) with ``summaries = (kmean, vmean, hsum)`` (contiguous, q's
    dtype, ``[B, H, nk, D]`` twice and ``[B, H, D, D]``; ``hsum`` unused for 1) and ``kept`` (contiguous
    uint8 ``[B, H, nq, nk]``, nonzero = listed in the row); ``early_stop`` (a positive bound) walks each
    row only until the rest is negligible and also returns the entries walked per row (int32
    ``[B, H, nq]``) as a third value. With neither, the kernel compiles exactly as before (constexpr)."""
    B, H, S, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, S) if return_lse else (1,), dtype=torch.float32, device=q.device)
    stop = early_stop is not None
    walked = torch.empty((B, H, -(-S // block_m)) if stop else (1,), dtype=torch.int32, device=q.device)
    common = dict(HEAD_DIM=D, TABLE_BM=block_m, TABLE_BN=block_n, EVEN_M=S % block_m == 0,
                  EVEN_N=S % block_n == 0, STORE_LSE=return_lse,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  # The interpreter's tl.dot is wrong on bfloat16 (Triton 3.9): upcast there only.
                  DOT_F32=interpret and q.dtype == torch.bfloat16,
                  COMPENSATE=int(compensate), COMP_BLOCK=INTERPRET_BLOCK if interpret else COMP_BLOCK,
                  EARLY_STOP=stop)
    tma = use_tma(q.device, interpret, k, v)
    common["USE_TMA"] = tma
    pinned = None
    if tile is not None:
        bm, bn, warps, stages, maxnreg = check_tile(tile, block_m, block_n)
        if stop and bm != block_m:
            raise ValueError(f"tile BLOCK_M={bm} must equal the table block {block_m} with early stop")
        pinned = dict(BLOCK_M=bm, BLOCK_N=bn)
        if not interpret:
            pinned.update(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    elif interpret:  # early stop decides per q-block: one program per table row
        pinned = dict(BLOCK_M=block_m if stop else min(block_m, INTERPRET_BLOCK),
                      BLOCK_N=min(block_n, INTERPRET_BLOCK))
    kmean, vmean, hsum = summaries if summaries is not None else (lse, lse, lse)
    kept_arg = kept if kept is not None else lse
    k_arg, v_arg = k, v
    if tma:  # a pinned tile's own block shape; autotuned, the pre-hook sets each config's
        bn0 = pinned["BLOCK_N"] if pinned else 64
        k_arg, v_arg = tma_descriptor(k, bn0), tma_descriptor(v, bn0)
    args = (q, k_arg, v_arg, out, lse, kv_indices, kv_counts, kmean, vmean, hsum, kept_arg, walked,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *kv_indices.stride(), *kv_counts.stride(), H, S, qk_scale,
            # autotune key only (unused in the kernel): the table's width, rounded up to a power of
            # two, so a sparse table is not run with the tile tuned for a dense one of the same S
            triton.next_power_of_2(kv_indices.shape[-1]),
            -(-S // block_n), float(early_stop) if stop else 0.0)
    launch_rows(_kernel(interpret, autotune=pinned is None), args, common, pinned, rows=S, programs=B * H,
                interpret=interpret, device=q.device)
    if stop:
        return out, (lse if return_lse else None), walked
    return out, (lse if return_lse else None)


def aot_compile(*, dtype: str = "bf16", head_dim: int = 128, block_m: int = 128, block_n: int = 128,
                table_block: int = 128, num_warps: int = 8, num_stages: int = 3, even: bool = False,
                arch: int = 90, compensate: int = 0, early_stop: bool = False):
    """Compile the kernel ahead of time for ``sm_<arch>`` without a GPU (for inspection and tests).

    Mirrors what the JIT specialises for contiguous ``[B, H, S, D]`` inputs (unit inner strides,
    16-divisible pointers and strides — without the latter the pipeliner does not issue async
    copies). Returns the compiled kernel: ``.asm["ttgir"]``, ``.asm["ptx"]``, ``.asm["cubin"]``,
    ``.metadata.shared``. Needs Triton imported in compiled mode (``TRITON_INTERPRET`` unset).
    ``compensate`` / ``early_stop``: the PISA (1 zeroth order, 2 first order) and early-stop variants.
    """
    return aot_compile_kernel(
        _bsa_fwd_kernel, unit=("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_ik", "stride_cq"),
        constexprs=dict(HEAD_DIM=head_dim, TABLE_BM=table_block, TABLE_BN=table_block, EVEN_M=even, EVEN_N=even,
                        STORE_LSE=True, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_F32=False,
                        USE_TMA=False, BLOCK_M=block_m, BLOCK_N=block_n, COMPENSATE=compensate,
                        COMP_BLOCK=COMP_BLOCK, EARLY_STOP=early_stop),
        pointers={"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}", "LSE": "*fp32",
                  "KV_IDX": "*i32", "KV_CNT": "*i32", "KMEAN": f"*{dtype}", "VMEAN": f"*{dtype}",
                  "HSUM": f"*{dtype}", "KEPT": "*u8", "WALKED": "*i32"},
        floats=("qk_scale", "stop_eps"), num_warps=num_warps, num_stages=num_stages, arch=arch)
