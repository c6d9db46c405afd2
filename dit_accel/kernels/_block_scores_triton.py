"""Fused XAttention block scoring in Triton (imported only when Triton is used).

Computes what :func:`dit_accel.attention.select.xattention_scores` computes (its docstring has the
maths and the paper), without materialising the reduced products: for each (batch, head) the
queries and keys are read at ``STRIDE`` phases straight from ``[B, H, S, D]`` memory, query phase
``STRIDE - 1 - r`` against key phase ``r`` (the reversed phase that turns each reduced product into
an antidiagonal sum), so the reduced logit of reduced row ``i`` and reduced key ``j`` is
``sum_r q[i*STRIDE + STRIDE-1-r] . k[j*STRIDE + r]`` times ``scale / STRIDE``.

One program owns ``BLOCK_R`` reduced query rows, i.e. ``BLOCK_R // SUB`` whole q-blocks of one
(batch, head) (``SUB = block_size // STRIDE`` reduced rows per block; a program of a single
q-block would give ``tl.dot`` fewer than 16 rows at the usual block 64 / stride 8). Two passes over
all reduced keys, ``BLOCK_C`` at a time:

1. the row max and row sum of the softmax (online, FlashAttention style, in base 2);
2. the logits again, normalised with the pass-1 statistics, summed per (q-block, kv-block) and
   stored: every output entry is written exactly once (no atomics), each q-block row divided by
   its count of real reduced rows, so rows sum to 1.

Two passes recompute the products once more instead of keeping a ``[rows, nk]`` accumulator of
unknown width in registers; the products are ``1 / STRIDE`` of a dense attention's, so the second
pass is cheap next to the block-sparse attention it selects for.

The ``STRIDE`` phases are a loop, not unrolled (``tl.static_range``): unrolled, the compiler's
pipeliner keeps a q and a k tile of every phase in shared memory at once, several times
Hopper's capacity at any tile; as a loop it buffers one phase per pipeline stage.

Masking: query/key tokens past ``S`` load as zeros (the reference zero-pads); reduced keys made
only of padding (``j * STRIDE >= S``) score ``-inf``; reduced query rows made only of padding
contribute nothing (the reference drops them the same way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import aot_compile_kernel, jit_helpers, lazy_kernel

_LOG2E = 1.4426950408889634
#: tiles under the interpreter (numpy is slow): the smallest ``tl.dot`` accepts
INTERPRET_TILE = 16


def _reduced_logits(q_base, k_base, rows, cols, offs_d, d_ok, stride_qs, stride_qd, stride_ks, stride_kd, S, N_RED,
                    qk_scale, STRIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """The scaled (base-2) reduced logits ``[BLOCK_R, BLOCK_C]`` of reduced query rows ``rows`` against reduced
    keys ``cols``, summed over the ``STRIDE`` phases; ``-inf`` on reduced keys made only of padding. Both passes
    call it (jitted lazily with the kernel, :func:`_kernel`; inlined where it is called)."""
    qk = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r in range(STRIDE):  # a loop, not unrolled: one phase of q and k in shared memory per stage
        tq = rows * STRIDE + (STRIDE - 1 - r)
        q = tl.load(q_base + tq[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd,
                    mask=(tq[:, None] < S) & d_ok[None, :], other=0.0)
        tk = cols * STRIDE + r
        kt = tl.load(k_base + tk[None, :].to(tl.int64) * stride_ks + offs_d[:, None] * stride_kd,
                     mask=(tk[None, :] < S) & d_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, qk, input_precision=DOT_PRECISION)
    return tl.where(cols[None, :] < N_RED, qk * qk_scale, float("-inf"))


def _xattn_scores_kernel(
    Q, K, OUT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_ob, stride_oh, stride_oq, stride_ok,
    H, S, NQ, NK, N_RED, qk_scale,
    STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    QBP: tl.constexpr = BLOCK_R // SUB   # q-blocks per program
    KBP: tl.constexpr = BLOCK_C // SUB   # kv-blocks per key tile
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)   # reduced query rows
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < N_RED                            # rows holding at least one real token

    m_i = tl.zeros([BLOCK_R], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, N_RED, BLOCK_C):
        cols = c0 + offs_c
        qk = _reduced_logits(q_base, k_base, rows, cols, offs_d, d_ok, stride_qs, stride_qd, stride_ks, stride_kd,
                             S, N_RED, qk_scale, STRIDE, BLOCK_R, BLOCK_C, DOT_PRECISION, DOT_F32)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new

    # Each q-block's row sums to 1: divide by its count of real reduced rows.
    count = tl.minimum(N_RED - (rows // SUB) * SUB, SUB).to(tl.float32)
    w = tl.where(row_ok, 1.0 / (tl.where(row_ok, l_i, 1.0) * tl.maximum(count, 1.0)), 0.0)
    qbs = pid_r * QBP + tl.arange(0, QBP)
    kbs0 = tl.arange(0, KBP)
    out_base = OUT + b * stride_ob + h * stride_oh
    for c0 in range(0, NK * SUB, BLOCK_C):
        cols = c0 + offs_c
        qk = _reduced_logits(q_base, k_base, rows, cols, offs_d, d_ok, stride_qs, stride_qd, stride_ks, stride_kd,
                             S, N_RED, qk_scale, STRIDE, BLOCK_R, BLOCK_C, DOT_PRECISION, DOT_F32)
        p = tl.math.exp2(qk - m_i[:, None]) * w[:, None]
        per_kb = tl.sum(tl.reshape(p, (BLOCK_R, KBP, SUB)), 2)        # [BLOCK_R, KBP]
        blk = tl.sum(tl.reshape(per_kb, (QBP, SUB, KBP)), 1)           # [QBP, KBP]
        kbs = c0 // SUB + kbs0
        ptrs = out_base + qbs[:, None] * stride_oq + kbs[None, :] * stride_ok
        tl.store(ptrs, blk, mask=(qbs[:, None] < NQ) & (kbs[None, :] < NK))


def _configs() -> list[triton.Config]:
    """CUDA autotune space: row / key tiles 64 or 128, 4 or 8 warps (pruned to tiles >= SUB)."""
    return [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w, num_stages=s)
            for r in (64, 128) for c in (64, 128) for w in (4, 8) for s in (2, 3)]


def _prune(configs, named_args, **kwargs):
    sub = kwargs["SUB"]
    # 128 reduced rows on 4 warps exceed the register file on sm_90 and spill (aot_compile's ptxas report)
    kept = [c for c in configs if c.kwargs["BLOCK_R"] >= sub and c.kwargs["BLOCK_C"] >= sub
            and not (c.kwargs["BLOCK_R"] == 128 and c.num_warps == 4)]
    return kept or [triton.Config({"BLOCK_R": sub, "BLOCK_C": sub}, num_warps=8, num_stages=2)]


_KERNELS: dict[str, object] = {}


def _kernel(interpret: bool):
    return lazy_kernel(_KERNELS, _xattn_scores_kernel, interpret, configs=_configs, prune=_prune,
                       key=["S", "STRIDE", "HEAD_DIM", "SUB"], module_globals=globals(), helpers=("_reduced_logits",),
                       error="xattention_block_scores: TRITON_INTERPRET=1 must be set before triton is first "
                             "imported to run the kernel on CPU tensors")


def xattention_scores_triton(q: torch.Tensor, k: torch.Tensor, *, block_size: int, stride: int, scale: float,
                             interpret: bool, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Launch the kernel on checked inputs (``block_size`` a power of two, ``stride`` dividing it): float32
    ``[B, H, nq, nk]``. ``tile`` = ``(BLOCK_R, BLOCK_C)`` pins the tiles (tests); default: autotuned on
    CUDA, the smallest under the interpreter."""
    B, H, S, D = q.shape
    sub = block_size // stride
    n = -(-S // block_size)
    out = torch.empty(B, H, n, n, dtype=torch.float32, device=q.device)
    if n == 0 or B * H == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    args = (q, k, out, *q.stride(), *k.stride(), *out.stride(), H, S, n, n, -(-S // stride),
            scale / stride * _LOG2E)
    meta = dict(STRIDE=stride, HEAD_DIM=D, BLOCK_D=block_d, SUB=sub,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                DOT_F32=interpret and q.dtype == torch.bfloat16)  # the interpreter's bf16 tl.dot is wrong
    kernel = _kernel(interpret)
    if interpret or tile is not None:
        br, bc = tile if tile is not None else (max(sub, INTERPRET_TILE), max(sub, INTERPRET_TILE))
        if br < sub or bc < sub or br & (br - 1) or bc & (bc - 1) or min(br, bc) < 16:
            raise ValueError(f"tile {(br, bc)}: both sides must be powers of two >= max(16, block_size // stride)")
        grid = (triton.cdiv(n * sub, br), B * H)
        if interpret:
            kernel[grid](*args, **meta, BLOCK_R=br, BLOCK_C=bc)
        else:
            with torch.cuda.device(q.device):
                kernel.fn[grid](*args, **meta, BLOCK_R=br, BLOCK_C=bc, num_warps=4)
        return out

    def grid(m):
        return (triton.cdiv(n * sub, m["BLOCK_R"]), B * H)

    with torch.cuda.device(q.device):
        kernel[grid](*args, **meta)
    return out


def aot_compile(*, head_dim: int = 128, block_size: int = 64, stride: int = 8, block_r: int = 128,
                block_c: int = 128, num_warps: int = 8, num_stages: int = 2, arch: int = 90):
    """Compile the kernel ahead of time for ``sm_<arch>`` without a GPU (for inspection and tests).

    Mirrors what the JIT specialises for contiguous bfloat16 ``[B, H, S, D]`` inputs on CUDA: unit inner
    strides, 16-divisible pointers and q/k strides, the float32 output's row stride left generic (``nk``
    is any count). Returns the compiled kernel: ``.asm["ttgir"]``, ``.asm["ptx"]``, ``.metadata.shared``.
    Needs Triton imported in compiled mode (``TRITON_INTERPRET`` unset).
    """
    jit_helpers(globals(), "_reduced_logits")
    return aot_compile_kernel(
        _xattn_scores_kernel, unit=("stride_qd", "stride_kd", "stride_ok"),
        constexprs=dict(STRIDE=stride, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                        SUB=block_size // stride, DOT_PRECISION="tf32", DOT_F32=False, BLOCK_R=block_r,
                        BLOCK_C=block_c),
        pointers={"Q": "*bf16", "K": "*bf16", "OUT": "*fp32"}, aligned_strides=("stride_q", "stride_k"),
        num_warps=num_warps, num_stages=num_stages, arch=arch)
