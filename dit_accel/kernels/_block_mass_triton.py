"""Exact block masses of the attention matrix in Triton (imported only when Triton is used).

For each (batch, head) the kernel walks every key tile of every query block, FlashAttention-style,
but instead of accumulating an output it sums ``exp(sm_scale * q_i . k_j - lse_i)`` over the tile: the
share of attention that the block's queries give the tile's keys, exact when ``lse`` is the rows' true
log-sum-exp (AdaSpa's LSE-cached search). One program owns one q-block of the table (``TABLE_BM`` rows,
the tile's rows) and writes one float per kv-block: the sum of its ``TABLE_BN // BLOCK_N`` key tiles.
Every output element has one writer, so no atomics and a deterministic result.

Choices, and why:

* ``exp2`` with ``sm_scale * log2(e)`` folded into one multiply and the log-sum-exp converted to base 2
  once per row (as in the block-sparse forward).
* No running max: the log-sum-exp is known, so every probability is formed directly; with a true LSE
  it is at most 1 and nothing overflows.
* Rows past ``S`` load ``lse = +inf`` (probability 0) and keys past ``S`` score 0 probability; the
  wrapper gives rows whose LSE is ``-inf`` (an empty sparse row) ``+inf`` too, so they add nothing.
* Tile rows = the table's q-block (64 or 128 in production): a program never shares an output element;
  the autotuner picks only the key tile, warps and stages. Pointer loads only (no TMA): the pass runs
  on search steps, a few times per generation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import aot_compile_kernel, lazy_kernel

_LOG2E = 1.4426950408889634
#: key tile under the interpreter (numpy is slow; below the tests' kv-blocks so that several tiles
#: add up into one block).
INTERPRET_BLOCK = 16


def _block_mass_kernel(
    Q, K, LSE, MASS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_mh, stride_mq, stride_mk,
    H, S, NK, qk_scale,
    HEAD_DIM: tl.constexpr, TABLE_BM: tl.constexpr, TABLE_BN: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
):
    SUB: tl.constexpr = TABLE_BN // BLOCK_N
    qb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = qb * TABLE_BM + tl.arange(0, TABLE_BM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + offs_m * stride_ls
    if EVEN_M:
        q = tl.load(q_ptrs)
        lse = tl.load(lse_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < S, other=0.0)
        lse = tl.load(lse_ptrs, mask=offs_m < S, other=float("inf"))
    if DOT_F32:  # interpreter only: its tl.dot mishandles bfloat16
        q = q.to(tl.float32)
    lse2 = lse * 1.4426950408889634
    k_base = K + b * stride_kb + h * stride_kh
    m_base = MASS + b * stride_mb + h * stride_mh + qb * stride_mq

    for kb in range(0, NK):
        acc = tl.zeros([TABLE_BM], dtype=tl.float32)
        for sub in range(0, SUB):
            cols = kb * TABLE_BN + sub * BLOCK_N + offs_n
            if EVEN_N:
                k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd)  # K^T tile [D, BLOCK_N]
            else:
                k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                            mask=cols[None, :] < S, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            if not EVEN_N:
                p = tl.where(cols[None, :] < S, p, 0.0)
            acc += tl.sum(p, 1)
        tl.store(m_base + kb * stride_mk, tl.sum(acc, 0))


_KERNELS: dict[str, object] = {}


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn in (32, 64, 128) for w in (4, 8)
            for s in (2, 3)]


def _prune(configs, named_args, **kwargs):
    """Key tiles must divide the kv-block."""
    tbn = kwargs["TABLE_BN"]
    kept = [c for c in configs if tbn % c.kwargs["BLOCK_N"] == 0]
    return kept or [triton.Config({"BLOCK_N": tbn}, num_warps=4, num_stages=2)]


def _kernel(interpret: bool):
    return lazy_kernel(_KERNELS, _block_mass_kernel, interpret, configs=_configs, prune=_prune,
                       key=["S", "HEAD_DIM", "TABLE_BM", "TABLE_BN"],
                       error="block_mass: TRITON_INTERPRET=1 must be set before triton is first imported "
                             "(diffusers and torch._dynamo import it); unset it to use the PyTorch reference on CPU.")


def block_mass_triton(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_m: int, block_n: int,
                      sm_scale: float, interpret: bool) -> torch.Tensor:
    """Float32 ``[B, H, ceil(S/block_m), ceil(S/block_n)]`` block masses. Inputs are assumed checked
    (:func:`dit_accel.kernels.block_mass.block_mass`): ``lse`` float32 ``[B, H, S]`` with ``-inf`` rows
    already replaced by ``+inf``, head dim a power of two."""
    B, H, S, D = q.shape
    nq, nk = -(-S // block_m), -(-S // block_n)
    mass = torch.empty(B, H, nq, nk, dtype=torch.float32, device=q.device)
    args = (q, k, lse, mass, *q.stride(), *k.stride(), *lse.stride(), *mass.stride(), H, S, nk, sm_scale * _LOG2E)
    common = dict(HEAD_DIM=D, TABLE_BM=block_m, TABLE_BN=block_n, EVEN_M=S % block_m == 0, EVEN_N=S % block_n == 0,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  DOT_F32=interpret and q.dtype == torch.bfloat16)
    grid = (nq, B * H)
    if interpret:
        _kernel(True)[grid](*args, **common, BLOCK_N=min(block_n, INTERPRET_BLOCK))
    else:
        with torch.cuda.device(q.device):
            _kernel(False)[grid](*args, **common)
    return mass


def aot_compile(*, head_dim: int = 128, table_bm: int = 128, table_bn: int = 128, block_n: int = 64,
                num_warps: int = 8, num_stages: int = 2, even: bool = False, arch: int = 90):
    """Compile the kernel ahead of time for ``sm_<arch>`` without a GPU (for inspection and tests).

    Mirrors what the JIT specialises for contiguous bfloat16 ``[B, H, S, D]`` q/k and a float32 ``[B, H, S]``
    log-sum-exp on CUDA: unit inner strides, 16-divisible pointers and q/k strides, the LSE's and the
    output's outer strides left generic (``S`` and the block counts are any size). ``even``: ``S`` a multiple
    of both table blocks (no tail masks). Returns the compiled kernel: ``.asm["ttgir"]``, ``.asm["ptx"]``,
    ``.metadata.shared``. Needs Triton imported in compiled mode (``TRITON_INTERPRET`` unset).
    """
    return aot_compile_kernel(
        _block_mass_kernel, unit=("stride_qd", "stride_kd", "stride_ls", "stride_mk"),
        constexprs=dict(HEAD_DIM=head_dim, TABLE_BM=table_bm, TABLE_BN=table_bn, EVEN_M=even, EVEN_N=even,
                        DOT_PRECISION="tf32", DOT_F32=False, BLOCK_N=block_n),
        pointers={"Q": "*bf16", "K": "*bf16", "LSE": "*fp32", "MASS": "*fp32"},
        aligned_strides=("stride_q", "stride_k"), num_warps=num_warps, num_stages=num_stages, arch=arch)
