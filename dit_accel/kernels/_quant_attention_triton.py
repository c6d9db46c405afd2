"""Quantized attention forward in Triton, dense or block-sparse (imported only when Triton is used).

Computes ``O = softmax(sm_scale * Q K^T [+ M]) V`` like :mod:`._block_sparse_triton` (FlashAttention-2
forward, online softmax, optional block table ``M``), but with the products on 8-bit tensor cores,
after SageAttention (Zhang et al., ICLR 2025) and SageAttention2 (Zhang et al., ICML 2025). What is
quantized, and the accuracy contract, is in :mod:`dit_accel.kernels.quant_attention`. Four kernels:

* :func:`_kv_stats_kernel` — one pass over K (and V): per-chunk partial column sums of K (for the
  smoothing mean) and partial column abs-max of V (for the per-channel FP8 scale). The partials are
  reduced with two tiny torch ops: a second pass over K would cost more than they do.
* :func:`_kv_quant_kernel` — one program per kv-block of ``KGRAN`` tokens: subtracts the K mean,
  quantizes the block to INT8 (``/127``) or FP8 e4m3 (``/448``) with one scale, and writes V as FP8
  divided by its per-channel scale, *transposed* (``[BH, D, S_pad]``, tokens contiguous) because
  Hopper's FP8 ``wgmma`` reads its B operand K-major only. Outputs are padded to ``S_pad`` (a
  multiple of 128) with zeros, so the attention kernel loads K and V without masks.
* :func:`_q_quant_kernel` — Q per row (one scale per token, finer than SageAttention's per-block Q,
  for a lower error), ``sm_scale * log2(e)`` folded into the stored scale, padded to ``S_pad`` rows;
  with an LSE it also stores ``sm_scale * q . mean(K)`` per row. A separate pass rather than
  quantizing in the attention kernel: loaded straight from memory, the Q tile stays in shared memory
  as a ``wgmma`` operand and its row scale arrives in the accumulator's layout; quantized in
  registers, Q would be re-read through ``LDSM`` and the scale would cross layouts through shared
  memory on every kv step.
* :func:`_attn_fwd_kernel` — the attention loop with ``exp2``. QK^T is an INT8 dot with int32
  accumulation, turned into float32 by adding the bits of 1.5 * 2^23 (exact for ``|qk| < 2^22``)
  rather than by the conversion unit, which on Hopper runs at the rate of ``exp2`` (16/clk/SM) and
  would compete with the softmax; the offset is removed inside the scaling FMA. Or an FP8 dot. The
  dequantization is one multiply by ``q_scale * k_scale``. P.V in FP8: P is scaled by 448 through the
  ``exp2`` offset ``log2(448)`` (the scale cancels in ``acc / l``: SageAttention2's static P scale)
  and each tile's FP8 dot is added to a float32 accumulator (two-level accumulation, because
  Hopper's FP8 MMA accumulates with fewer bits than float32). P.V in 16 bits: P in V's dtype, the
  raw bf16/fp16 V, float32 accumulation. K/V tiles arrive by TMA descriptors on sm_90+
  (``DIT_ACCEL_TMA=0``: pointer loads).

The kv loop walks either all kv tiles (``DENSE``) or the kv-blocks of the table row, with the
block-sparse conventions of :mod:`dit_accel.kernels.block_sparse` (empty row -> zeros and
``lse = -inf``; tail keys masked in the tile holding the sequence end only).

Tiles, the Hopper notes (what Triton does and does not express here) and the H200 measurements,
including the variants tried and dropped: ``docs/kernels.md``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._block_sparse_triton import check_tile, interpreter_ready, tile_configs, tma_descriptor, use_tma

#: padded length multiple of the quantized K / V buffers (covers every tile and table block).
PAD = 128


def _fp8_rne_py(x):
    """Round float32 ``x`` (|x| <= 448) to the e4m3 grid, ties to even, in float32 arithmetic.

    Only for the interpreter: Triton 3.9's interpreted float32 -> float8e4nv cast mishandles
    ties and mantissa carries (127.06 -> 64, 136 -> 144), so values are put on the grid first
    and the cast is then exact. On the GPU the cast (``cvt.rn.satfinite``) is used directly.
    """
    a = tl.abs(x)
    e = tl.maximum(tl.floor(tl.math.log2(tl.maximum(a, 1e-30))), -6.0)   # subnormals below 2^-6
    ulp = tl.math.exp2(e - 3.0)
    y = a / ulp
    r = tl.floor(y + 0.5)
    r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
    return tl.where(x < 0, -r * ulp, r * ulp)


def _to_codes_py(x, FP8: tl.constexpr, SOFT_FP8: tl.constexpr):
    """``x`` already divided by its scale → FP8 e4m3 codes (round to nearest even) or INT8 codes
    (round half away from zero)."""
    if FP8:  # a constexpr branch: one return type per specialisation
        if SOFT_FP8:
            x = _fp8_rne(x)
        codes = x.to(tl.float8e4nv)
    else:
        codes = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)
    return codes


def _load_rows_py(X, stride_b, stride_h, stride_s, stride_d, b, h, rows, S, HEAD_DIM: tl.constexpr):
    """Rows ``rows`` of ``X[b, h]`` as float32 ``[len(rows), HEAD_DIM]``, zeros past ``S``."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(X + b * stride_b + h * stride_h + rows[:, None] * stride_s + offs_d[None, :] * stride_d,
                   mask=rows[:, None] < S, other=0.0).to(tl.float32)


def _row_tile_py(H, ROWS: tl.constexpr):
    """Grid ``(row tiles, B*H)``: this program's row-tile index, its flat (batch, head), b, h (int64)
    and its ``ROWS`` row indices."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    return (pid_n, pid_bh.to(tl.int64), (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64),
            pid_n * ROWS + tl.arange(0, ROWS))


# the jitted helpers, made by _jit() in the mode (compiled / interpreted) of the kernels
_fp8_rne = None
_to_codes = None
_load_rows = None
_row_tile = None


def _kv_stats_kernel(
    K, V, KSUM, VMAX,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    H, S, NCHUNK,
    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, ITERS: tl.constexpr, WITH_V: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    vmax = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for i in range(ITERS):
        rows = (pid_c * ITERS + i) * ROWS + tl.arange(0, ROWS)
        ksum += tl.sum(_load_rows(K, stride_kb, stride_kh, stride_ks, stride_kd, b, h, rows, S, HEAD_DIM), 0)
        if WITH_V:
            v = _load_rows(V, stride_vb, stride_vh, stride_vs, stride_vd, b, h, rows, S, HEAD_DIM)
            vmax = tl.maximum(vmax, tl.max(tl.abs(v), 0))
    out = (pid_bh.to(tl.int64) * NCHUNK + pid_c) * HEAD_DIM + offs_d
    tl.store(KSUM + out, ksum)
    if WITH_V:
        tl.store(VMAX + out, vmax)


def _kv_quant_kernel(
    K, V, KMEAN, VSCALE, KQ, KSCALE, VT,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    H, S, S_PAD,
    HEAD_DIM: tl.constexpr, KGRAN: tl.constexpr, K_FP8: tl.constexpr, WITH_V: tl.constexpr,
    SOFT_FP8: tl.constexpr,
):
    pid_n, bh, b, h, rows = _row_tile(H, KGRAN)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K, stride_kb, stride_kh, stride_ks, stride_kd, b, h, rows, S, HEAD_DIM)
    k = tl.where(rows[:, None] < S, k - tl.load(KMEAN + bh * HEAD_DIM + offs_d)[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-30) / (448.0 if K_FP8 else 127.0)
    tl.store(KQ + bh * S_PAD * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
             _to_codes(k / scale, K_FP8, SOFT_FP8))
    tl.store(KSCALE + bh * (S_PAD // KGRAN) + pid_n, scale)
    if WITH_V:
        v = _load_rows(V, stride_vb, stride_vh, stride_vs, stride_vd, b, h, rows, S, HEAD_DIM)
        vq = _to_codes(v / tl.load(VSCALE + bh * HEAD_DIM + offs_d)[None, :], True, SOFT_FP8)
        tl.store(VT + bh * HEAD_DIM * S_PAD + offs_d[None, :] * S_PAD + rows[:, None], vq)


def _q_quant_kernel(
    Q, KMEAN, QQ, QSCALE, QKM,
    stride_qb, stride_qh, stride_qs, stride_qd,
    H, S, S_PAD, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, Q_FP8: tl.constexpr, WITH_KM: tl.constexpr,
    SOFT_FP8: tl.constexpr,
):
    pid_n, bh, b, h, rows = _row_tile(H, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q, stride_qb, stride_qh, stride_qs, stride_qd, b, h, rows, S, HEAD_DIM)
    if WITH_KM:  # the LSE correction of K smoothing: sm_scale * q . mean(K), per row
        tl.store(QKM + bh * S_PAD + rows, tl.sum(q * tl.load(KMEAN + bh * HEAD_DIM + offs_d)[None, :], 1) * sm_scale)
    scale = tl.maximum(tl.max(tl.abs(q), 1), 1e-30) / (448.0 if Q_FP8 else 127.0)   # one scale per query row
    tl.store(QQ + bh * S_PAD * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
             _to_codes(q / scale[:, None], Q_FP8, SOFT_FP8))
    tl.store(QSCALE + bh * S_PAD + rows, scale * qk_scale)      # sm_scale*log2(e) folded in


def _attn_fwd_kernel(
    QQ, QSCALE, QKM, KQ, KSCALE, V, VSCALE, O, LSE, KV_IDX, KV_CNT,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    H, S, S_PAD,
    HEAD_DIM: tl.constexpr, KGRAN: tl.constexpr, TABLE_BM: tl.constexpr, TABLE_BN: tl.constexpr,
    DENSE: tl.constexpr,
    QK_FP8: tl.constexpr, PV_FP8: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    STORE_LSE: tl.constexpr, SOFT_FP8: tl.constexpr, DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    KS_SCALAR: tl.constexpr = BLOCK_N <= KGRAN
    SUB: tl.constexpr = TABLE_BN // BLOCK_N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # --- Q: pre-quantized (``_q_quant_kernel``), padded to S_PAD rows: loaded once, no mask.
    qq = tl.load(QQ + bh * S_PAD * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(QSCALE + bh * S_PAD + offs_m)

    if not USE_TMA:
        k_base = KQ + bh * S_PAD * HEAD_DIM
    ks_base = KSCALE + bh * (S_PAD // KGRAN)
    if PV_FP8:
        if not USE_TMA:
            v_base = V + bh * HEAD_DIM * S_PAD                   # V^T, fp8, padded
        v_scale = tl.load(VSCALE + bh * HEAD_DIM + offs_d)
        p_offset = 8.807354922057604                              # log2(448)
    else:
        if not USE_TMA:
            v_base = V + b * stride_vb + h * stride_vh           # raw 16-bit V
        p_offset = 0.0

    if DENSE:
        n_iter = tl.cdiv(S, BLOCK_N)
    else:
        qb = start_m // TABLE_BM
        idx_base = KV_IDX + b * stride_ib + h * stride_ih + qb * stride_iq
        n_iter = tl.load(KV_CNT + b * stride_cb + h * stride_ch + qb * stride_cq) * SUB

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for t in range(0, n_iter):
        if DENSE:
            start_n = t * BLOCK_N
        else:
            kb = tl.load(idx_base + (t // SUB) * stride_ik)
            start_n = kb * TABLE_BN + (t % SUB) * BLOCK_N
        cols = start_n + offs_n
        if USE_TMA:
            k = KQ.load([(bh * S_PAD + start_n).to(tl.int32), 0]).T                   # K^T tile [D, BLOCK_N]
        else:
            k = tl.load(k_base + cols[None, :] * HEAD_DIM + offs_d[:, None])          # K^T tile [D, BLOCK_N]
        if QK_FP8:
            qk = tl.dot(qq, k)
            bias = 0.0
        else:
            # int32 -> float32 without the conversion unit (16/clk/SM on Hopper, the same rate as
            # exp2): |qk| <= 128*127*127 < 2^22, so the bits of 1.5*2^23 + qk are that float exactly;
            # the 1.5*2^23 offset is subtracted inside the FMA below (per-row bias).
            qk = (tl.dot(qq, k, out_dtype=tl.int32) + 0x4B400000).to(tl.float32, bitcast=True)
            bias = 12582912.0
        if not EVEN_N:
            if start_n + BLOCK_N > S:  # only the tile holding the sequence end: a uniform branch
                qk = tl.where(cols[None, :] < S, qk, float("-inf"))
        if KS_SCALAR:
            # One positive scale per row: max(qk)*scale, then a single FMA per score in exp2.
            rs = q_scale * tl.load(ks_base + start_n // KGRAN)
            m_new = tl.maximum(m_i, (tl.max(qk, 1) - bias) * rs)
            p = tl.math.exp2(qk * rs[:, None] - (m_new + bias * rs - p_offset)[:, None])
        else:
            qk = qk - bias
            s = qk * q_scale[:, None] * tl.load(ks_base + cols // KGRAN)[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - (m_new - p_offset)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_FP8:
            if USE_TMA:
                v = V.load([(bh * HEAD_DIM).to(tl.int32), start_n]).T                    # [BLOCK_N, D], N-major
            else:
                v = tl.load(v_base + offs_d[None, :] * S_PAD + cols[:, None])           # [BLOCK_N, D], N-major
            if SOFT_FP8:
                p = _fp8_rne(p)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
        else:
            if USE_TMA:  # 4-d descriptor over [B, H, S, D]: keys past S arrive as zeros
                v = V.load([b.to(tl.int32), h.to(tl.int32), start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            elif EVEN_N:
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd)
            else:
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=cols[:, None] < S,
                            other=0.0)
            if DOT_F32:  # interpreter only: its tl.dot is wrong on bfloat16 (Triton 3.9)
                acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if PV_FP8:
        out = out * v_scale[None, :]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    if EVEN_M:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < S)
    if STORE_LSE:
        q_km = tl.load(QKM + bh * S_PAD + offs_m)
        lse = tl.where(empty, float("-inf"), (m_i - p_offset + tl.math.log2(l_safe)) * 0.6931471805599453 + q_km)
        lse_ptrs = LSE + bh * S + offs_m
        if EVEN_M:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < S)


# ----------------------------------------------------------------------------- launch


def hopper_configs() -> list[triton.Config]:
    """A small autotune space for H100/H200 (query tile x kv tile, warps, pipeline stages):
    128x64 (3 stages) and 128x128 (2 stages) with 8 warps (two warpgroups share the 128-row fp32
    accumulator), 64x64 and 64x128 with 4 warps (one warpgroup), also with a single stage (less
    shared memory, so two programs share an SM). 128x128 with FP8 P.V spills registers; it stays in
    the space so that the autotuner rejects it by timing rather than by rule.
    ``DIT_ACCEL_QATTN_CONFIG="BLOCK_M,BLOCK_N,num_warps,num_stages"`` pins one config (no autotuning).
    """
    return tile_configs(((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 4, 1),
                         (64, 128, 4, 1)), "DIT_ACCEL_QATTN_CONFIG", _tma_pre_hook)


def _prune(configs, named_args, **kwargs):
    """Query tiles divide the table's q-blocks; in sparse mode kv tiles divide its kv-blocks."""
    tbm, tbn, dense = kwargs["TABLE_BM"], kwargs["TABLE_BN"], kwargs["DENSE"]
    kept = [c for c in configs if tbm % c.kwargs["BLOCK_M"] == 0 and (dense or tbn % c.kwargs["BLOCK_N"] == 0)]
    return kept or [triton.Config({"BLOCK_M": min(tbm, 64), "BLOCK_N": min(tbn, 64)}, num_warps=4, num_stages=2)]


_KERNELS: dict[str, object] = {}

def _tma_pre_hook(nargs):
    """Autotuner hook: give the K / V descriptors the block shape of the config being run."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bn, d = nargs["BLOCK_N"], nargs["HEAD_DIM"]
    if isinstance(nargs["KQ"], TensorDescriptor):
        nargs["KQ"].block_shape = [bn, d]
    if isinstance(nargs["V"], TensorDescriptor):
        nargs["V"].block_shape = [d, bn] if nargs["PV_FP8"] else [1, 1, bn, d]


#: tiles under the interpreter (numpy is slow; small tiles exercise the shared-row and sub-tile paths).
INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = {True: 32, False: 16}   # dense: 32, sparse: min(16, block_n)


def _jit(name: str, interpret: bool, autotune: bool = True):
    """The jitted kernel ``name``; the attention kernel is autotuned on CUDA unless ``autotune=False``
    (the launch then names the tile)."""
    global _fp8_rne, _to_codes, _load_rows, _row_tile
    key = f"{name}:{'interpret' if interpret else 'cuda'}" + ("" if autotune or interpret else "-pinned")
    if key not in _KERNELS:
        if interpret and not interpreter_ready():
            raise RuntimeError(
                "quant_attention: TRITON_INTERPRET=1 must be set before triton is first imported: triton.language "
                "was loaded in compiled mode, so the interpreter cannot run the kernel on CPU tensors. Set it at "
                "process start, or unset it to use the PyTorch reference on CPU.")
        if _fp8_rne is None:  # triton's mode (compiled / interpreted) is fixed for the process
            _fp8_rne = triton.jit(_fp8_rne_py)
            _to_codes = triton.jit(_to_codes_py)
            _load_rows = triton.jit(_load_rows_py)
            _row_tile = triton.jit(_row_tile_py)
        fn = {"stats": _kv_stats_kernel, "quant": _kv_quant_kernel, "qquant": _q_quant_kernel,
              "attn": _attn_fwd_kernel}[name]
        # S is not specialised (its 16-divisibility would compile every kernel twice for the
        # benchmark's lengths); the tail is handled by the EVEN_* constexprs instead.
        jitted = triton.jit(fn, do_not_specialize=["S"])
        if name == "attn" and not interpret and autotune:
            jitted = triton.autotune(configs=hopper_configs(),
                                     key=["S", "HEAD_DIM", "TABLE_BM", "TABLE_BN", "KGRAN", "DENSE", "QK_FP8",
                                          "PV_FP8", "USE_TMA"],
                                     prune_configs_by={"early_config_prune": _prune})(jitted)
        _KERNELS[key] = jitted
    return _KERNELS[key]


def quantize_kv_triton(k: torch.Tensor, v: torch.Tensor, *, kgran: int, k_fp8: bool, v_fp8: bool,
                       smooth_k: bool, interpret: bool):
    """Smooth and quantize K per ``kgran`` tokens; V to FP8 per channel (transposed) when ``v_fp8``.

    Returns ``(k_q [BH, S_pad, D] int8|fp8, k_scale [BH, S_pad/kgran] fp32,
    v_t [BH, D, S_pad] fp8 | None, v_scale [BH, D] fp32 | None, k_mean [BH, D] fp32)``.
    """
    B, H, S, D = k.shape
    BH, dev = B * H, k.device
    s_pad = triton.cdiv(S, PAD) * PAD
    rows, iters = (16, 4) if interpret else (64, 2)
    nchunk = triton.cdiv(S, rows * iters)
    need_stats = smooth_k or v_fp8
    ksum = torch.empty(BH, nchunk, D, dtype=torch.float32, device=dev) if need_stats else None
    vmax = torch.empty(BH, nchunk, D, dtype=torch.float32, device=dev) if v_fp8 else ksum
    ctx = torch.cuda.device(dev) if k.is_cuda else contextlib.nullcontext()
    with ctx:
        if need_stats:
            _jit("stats", interpret)[(nchunk, BH)](k, v, ksum, vmax, *k.stride(), *v.stride(), H, S, nchunk,
                                                    HEAD_DIM=D, ROWS=rows, ITERS=iters, WITH_V=v_fp8,
                                                    num_warps=4)
        k_mean = ksum.sum(1) / S if smooth_k else torch.zeros(BH, D, dtype=torch.float32, device=dev)
        v_scale = (vmax.amax(1) / 448.0).clamp_min(1e-30) if v_fp8 else None
        k_q = torch.empty(BH, s_pad, D, dtype=torch.float8_e4m3fn if k_fp8 else torch.int8, device=dev)
        k_scale = torch.empty(BH, s_pad // kgran, dtype=torch.float32, device=dev)
        v_t = torch.empty(BH, D, s_pad, dtype=torch.float8_e4m3fn, device=dev) if v_fp8 else None
        _jit("quant", interpret)[(s_pad // kgran, BH)](
            k, v, k_mean, v_scale if v_fp8 else k_mean, k_q, k_scale, v_t if v_fp8 else k_q,
            *k.stride(), *v.stride(), H, S, s_pad,
            HEAD_DIM=D, KGRAN=kgran, K_FP8=k_fp8, WITH_V=v_fp8, SOFT_FP8=interpret,
            num_warps=4 if kgran * D <= 8192 else 8)
    return k_q, k_scale, v_t, v_scale, k_mean


_DUMMY_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _dummy_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholder block table for the dense kernel (never read), allocated once per device."""
    if device not in _DUMMY_TABLES:
        _DUMMY_TABLES[device] = (torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device),
                                 torch.zeros(1, 1, 1, dtype=torch.int32, device=device))
    return _DUMMY_TABLES[device]


def quantize_q_triton(q: torch.Tensor, k_mean: torch.Tensor, s_pad: int, *, qk_scale: float, sm_scale: float,
                      q_fp8: bool, with_km: bool, interpret: bool):
    """Quantize Q per row (INT8 or FP8), padded to ``s_pad`` rows with zeros.

    Returns ``(q_q [BH, s_pad, D], q_scale [BH, s_pad] fp32 with qk_scale folded in,
    q_km [BH, s_pad] fp32 = sm_scale * q . k_mean, or None)``.
    """
    B, H, S, D = q.shape
    BH, dev = B * H, q.device
    q_q = torch.empty(BH, s_pad, D, dtype=torch.float8_e4m3fn if q_fp8 else torch.int8, device=dev)
    q_scale = torch.empty(BH, s_pad, dtype=torch.float32, device=dev)
    q_km = torch.empty(BH, s_pad, dtype=torch.float32, device=dev) if with_km else None
    rows = 16 if interpret else 64
    ctx = torch.cuda.device(dev) if q.is_cuda else contextlib.nullcontext()
    with ctx:
        _jit("qquant", interpret)[(s_pad // rows, BH)](
            q, k_mean, q_q, q_scale, q_km if with_km else q_scale, *q.stride(), H, S, s_pad, qk_scale, sm_scale,
            HEAD_DIM=D, ROWS=rows, Q_FP8=q_fp8, WITH_KM=with_km, SOFT_FP8=interpret,
            num_warps=4 if rows * D <= 8192 else 8)
    return q_q, q_scale, q_km


def quant_attention_triton(q, k, v, kv_indices, kv_counts, *, block_m: int, block_n: int, qk_scale: float,
                           sm_scale: float, qk_fp8: bool, pv_fp8: bool, smooth_k: bool, interpret: bool,
                           return_lse: bool, tile=None):
    """Quantize Q, K and V, then run the attention kernel; inputs are assumed checked (``quant_attention``).

    ``tile``: ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])`` launches the attention kernel with
    that config, without autotuning (``benchmarks/bench_tile_sweep.py``); ``BLOCK_M`` must divide
    ``block_m`` and, with a table, ``BLOCK_N`` must divide ``block_n``. Under the interpreter only the
    tile sides matter."""
    B, H, S, D = q.shape
    dense = kv_indices is None
    pinned = None
    if tile is not None:
        bm, bn, warps, stages, maxnreg = check_tile(tile, block_m, PAD if dense else block_n)
        pinned = dict(BLOCK_M=bm, BLOCK_N=bn)
        if not interpret:
            pinned.update(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    elif interpret:  # small tiles: several query tiles per q-block, kv sub-tiles (the GPU's paths, cheaply)
        pinned = dict(BLOCK_M=min(block_m, INTERPRET_BLOCK_M),
                      BLOCK_N=INTERPRET_BLOCK_N[True] if dense else min(block_n, INTERPRET_BLOCK_N[False]))
    k_q, k_scale, v_t, v_scale, k_mean = quantize_kv_triton(k, v, kgran=block_n, k_fp8=qk_fp8, v_fp8=pv_fp8,
                                                            smooth_k=smooth_k, interpret=interpret)
    s_pad = k_q.shape[1]
    q_q, q_scale, q_km = quantize_q_triton(q, k_mean, s_pad, qk_scale=qk_scale, sm_scale=sm_scale, q_fp8=qk_fp8,
                                           with_km=return_lse, interpret=interpret)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, S) if return_lse else (1,), dtype=torch.float32, device=q.device)
    if dense:
        kv_indices, kv_counts = _dummy_table(q.device)
    v_arg, vs_arg = (v_t, v_scale) if pv_fp8 else (v, k_scale)
    k_arg = k_q
    tma = use_tma(q.device, interpret, v)   # K and V^T are our own aligned buffers
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        # a pinned tile's own block shape; autotuned, the pre-hook sets each config's
        bn0 = pinned["BLOCK_N"] if pinned else 64
        k_arg = TensorDescriptor(k_q.view(B * H * s_pad, D), [B * H * s_pad, D], [D, 1], [bn0, D])
        v_arg = (TensorDescriptor(v_t.view(B * H * D, s_pad), [B * H * D, s_pad], [s_pad, 1], [D, bn0]) if pv_fp8
                 else tma_descriptor(v, bn0))
    common = dict(HEAD_DIM=D, KGRAN=block_n, TABLE_BN=block_n, DENSE=dense, QK_FP8=qk_fp8, PV_FP8=pv_fp8,
                  TABLE_BM=block_m, STORE_LSE=return_lse, SOFT_FP8=interpret,
                  DOT_F32=interpret and q.dtype == torch.bfloat16, USE_TMA=tma)

    args = (q_q, q_scale, q_km if return_lse else q_scale, k_arg, k_scale, v_arg, vs_arg, out, lse,
            kv_indices, kv_counts, *v.stride(), *out.stride(), *kv_indices.stride(), *kv_counts.stride(),
            H, S, s_pad)

    kernel = _jit("attn", interpret, autotune=pinned is None)
    if pinned is not None:
        bm, bn = pinned["BLOCK_M"], pinned["BLOCK_N"]
        grid = (triton.cdiv(S, bm), B * H)
        ctx = contextlib.nullcontext() if interpret else torch.cuda.device(q.device)
        with ctx:
            kernel[grid](*args, **common, EVEN_M=S % bm == 0, EVEN_N=S % bn == 0, **pinned)
    else:  # EVEN_M / EVEN_N: S is a multiple of every autotuned tile (64, 128)
        def grid(meta):
            return (triton.cdiv(S, meta["BLOCK_M"]), B * H)

        with torch.cuda.device(q.device):
            kernel[grid](*args, **common, EVEN_M=S % PAD == 0, EVEN_N=S % PAD == 0)
    return out, (lse if return_lse else None)
