"""Quantized (SageAttention-style) attention forward, dense or block-sparse, and its PyTorch reference.

What is quantized, after SageAttention (Zhang et al., "SageAttention: Accurate 8-bit attention for
plug-and-play inference acceleration", ICLR 2025) and SageAttention2 (Zhang et al., ICML 2025):

* **K smoothing**: K minus its per-channel mean over all tokens (of its batch and head). Every
  score of a query row shifts by the same ``q·mean(K)``, so the softmax is unchanged — for any
  subset of keys, hence also with block tables — while outlier channels (a large shared offset,
  common in DiT keys) stop eating the INT8 range. ``smooth_k=False`` turns it off (for tests).
* **Q, K** (``mode="int8"``): INT8, symmetric; K with one scale per kv-block of ``block_n``
  tokens (SageAttention's per-block granularity, default 64 as its ``BLKK``), Q with one scale
  per token (finer than SageAttention's per-block Q, for a lower error; the kernel loads the row scales
  once per query tile); QK^T is an INT8 dot with int32 accumulation, dequantized with one multiply by
  ``q_scale · k_scale`` into which ``sm_scale · log2(e)`` is folded; the softmax uses ``exp2``.
  ``mode="fp8"``: Q and K in FP8 e4m3 with the same granularity (Hopper/Ada FP8 tensor cores).
* **P·V** (``pv="fp8"``, the default of ``mode="fp8"``, opt-in with INT8): V in FP8 e4m3 with
  one scale per channel (SageAttention2), P scaled by 448 into e4m3's range (the scale cancels
  in the normalisation), FP8 dot results added to a float32 accumulator per tile (two-level
  accumulation). ``pv="fp16"`` (the default of ``mode="int8"``): SageAttention(1)'s 16-bit P·V —
  P in V's own 16-bit dtype (float16 or bfloat16; we do not convert bf16 V to fp16), float32
  accumulation.

Where we depart: SageAttention2 quantizes K per warp / per thread (finer) and smooths Q as
well; we keep per-block K scales and smooth K only (its v1 recipe). The accuracy contract is the
CPU tests' bounds, mean relative L1 against float32 attention on N(0, 1) inputs: 0.02 for INT8 QKᵀ
with 16-bit P·V, 0.05 with FP8 P·V, 0.07 all-FP8. FP8 has 3 mantissa bits, which on zero-mean random
V costs that much; SageAttention2 reports FP8 P·V as near-lossless on real models, whose attention
outputs are not averages of zero-mean noise — measure on your model (measured errors:
``docs/kernels.md``). The log-sum-exp (``return_lse``) is corrected back by ``sm_scale · q·mean(K)``,
so it is the LSE of the *unsmoothed* scores.

Block tables follow :mod:`dit_accel.kernels.block_sparse` exactly (``kv_indices``
``[B, H, ceil(S/block_m), max_kv]``, ``kv_counts`` ``[B, H, ceil(S/block_m)]``; an empty row
gives zeros and ``lse = -inf``; the tail past ``S`` is masked). Without a table the kernel is
dense.

Dispatch: :func:`quant_attention` checks its inputs and calls the custom op
``torch.ops.dit_accel.quant_attention`` (:mod:`dit_accel.kernels.ops`; one node under
``torch.compile``, quantization passes included). The op runs the Triton kernels
(:mod:`._quant_attention_triton`) on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``
(tests); else the reference. The reference
(:func:`quant_attention_reference`) quantizes Q, K and V exactly as the kernel does and runs a
float32 softmax; the kernel's only extra rounding is P's (FP8 or 16-bit, per tile).
"""

from __future__ import annotations

import math

import torch

from .block_sparse import _reference as _bsa_reference
from .block_sparse import (  # noqa: F401  (_interpret, _use_triton: the dispatch the op applies, read by tests)
    _cdiv,
    _check_table_values,
    _interpret,
    _use_triton,
    check_qkv,
    check_sm_scale,
    check_table_shapes,
    dense_block_table,
)

__all__ = [
    "quant_attention",
    "quant_attention_reference",
    "quantize_per_block",
    "fp8_supported",
    "QUANT_MODES",
    "PV_MODES",
    "QUANT_HEAD_DIMS",
    "QUANT_BLOCK_SIZES",
]

QUANT_MODES = ("int8", "fp8")
PV_MODES = ("fp8", "fp16")
#: head dims; 64 and 128 are the production ones, 16/32 are for tiny tests.
QUANT_HEAD_DIMS = (16, 32, 64, 128)
#: q-block / kv-block sizes (tokens); at most 128 (one K scale per kv-block, one or two query tiles per q-block).
QUANT_BLOCK_SIZES = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634
_QMAX = {"int8": 127.0, "fp8": 448.0}
_FN = "quant_attention"


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """Whether FP8 dots can run: CUDA compute capability >= 8.9 (Ada, Hopper), or the CPU (interpreter
    and reference)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


# ----------------------------------------------------------------------------- quantization (reference)


def quantize_per_block(x: torch.Tensor, block: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block quantization of ``x [B, H, S, D]`` along S, one scale per ``block`` tokens.

    Returns ``(x_q, scale)``: ``x_q`` int8 (round half away from zero, as the kernel) or
    float8_e4m3fn, ``[B, H, S, D]``; ``scale`` float32 ``[B, H, ceil(S/block)]`` with
    ``x ≈ x_q * scale``. An all-zero block gets a tiny scale (its codes stay 0).
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize_per_block: mode must be one of {QUANT_MODES}, got {mode!r}")
    B, H, S, D = x.shape
    nb = _cdiv(S, block)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - S)).view(B, H, nb, block, D)
    scale = xf.abs().amax(dim=(-1, -2)).clamp_min(1e-30) / _QMAX[mode]
    y = xf / scale[..., None, None]
    if mode == "int8":
        yq = torch.trunc(y + 0.5 * torch.sign(y)).to(torch.int8)
    else:
        yq = y.to(torch.float8_e4m3fn)
    return yq.view(B, H, nb * block, D)[:, :, :S], scale


def _dequant(x_q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    S = x_q.shape[2]
    return x_q.float() * scale.repeat_interleave(block, dim=-1)[..., :S, None]


def _quantize_v_fp8(v: torch.Tensor) -> torch.Tensor:
    """V rounded through FP8 e4m3 with one scale per (batch, head, channel), dequantized (float32)."""
    scale = (v.float().abs().amax(dim=2, keepdim=True) / 448.0).clamp_min(1e-30)
    return (v.float() / scale).to(torch.float8_e4m3fn).float() * scale


# ----------------------------------------------------------------------------- validation


def _check(q, k, v, kv_indices, kv_counts, block_m, block_n, mode, pv, sm_scale) -> None:
    check_qkv(_FN, q, k, v, (torch.float16, torch.bfloat16), QUANT_HEAD_DIMS)
    for name, bs in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(bs, bool) or not isinstance(bs, int) or bs not in QUANT_BLOCK_SIZES:
            raise ValueError(f"{_FN}: {name}={bs!r} not supported; supported: {QUANT_BLOCK_SIZES}")
    if mode not in QUANT_MODES:
        raise ValueError(f"{_FN}: mode must be one of {QUANT_MODES}, got {mode!r}")
    if pv not in PV_MODES:
        raise ValueError(f"{_FN}: pv must be one of {PV_MODES} (or None for the default), got {pv!r}")
    if (mode == "fp8" or pv == "fp8") and not fp8_supported(q.device):
        raise ValueError(f"{_FN}: FP8 needs compute capability >= 8.9 (Ada/Hopper); use mode='int8', pv='fp16'")
    check_sm_scale(_FN, sm_scale)
    if (kv_indices is None) != (kv_counts is None):
        raise ValueError(f"{_FN}: pass both kv_indices and kv_counts (block-sparse) or neither (dense)")
    if kv_indices is not None:
        check_table_shapes(_FN, q, kv_indices, kv_counts, block_m)


def _check_values(kv_indices, kv_counts, S, block_n) -> None:
    try:
        _check_table_values(kv_indices, kv_counts, S, block_n)
    except ValueError as err:
        raise ValueError(str(err).replace("block_sparse_attention", _FN)) from None


def _default_pv(mode: str, device: torch.device) -> str:
    """``mode="fp8"`` → FP8 P·V; ``mode="int8"`` → 16-bit P·V (SageAttention's accuracy-first recipe,
    within 0.02 mean relative L1); pass ``pv="fp8"`` for SageAttention2's faster FP8 P·V."""
    return "fp8" if mode == "fp8" else "fp16"


# ----------------------------------------------------------------------------- reference


def quant_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              kv_indices: torch.Tensor | None = None, kv_counts: torch.Tensor | None = None, *,
                              block_m: int = 128, block_n: int = 64, mode: str = "int8", pv: str | None = None,
                              smooth_k: bool = True, sm_scale: float | None = None, return_lse: bool = False,
                              validate: bool = True):
    """PyTorch reference of :func:`quant_attention` (the CPU path and the test oracle).

    Quantizes Q per token and smoothed K per ``block_n`` tokens (INT8 or FP8), V per
    channel to FP8 (``pv="fp8"``), dequantizes them in float32 and runs the float32 block-sparse
    reference softmax; P itself is not rounded. Returns ``out`` in q's dtype (and the float32
    LSE of the unsmoothed scaled scores). ``validate``: as :func:`quant_attention` (the table's
    values; skipped while ``torch.compile`` traces).
    """
    pv = pv if pv is not None else _default_pv(mode, q.device)
    _check(q, k, v, kv_indices, kv_counts, block_m, block_n, mode, pv, sm_scale)
    if kv_indices is not None and validate and not torch.compiler.is_compiling():
        _check_values(kv_indices, kv_counts, q.shape[2], block_n)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _reference(q, k, v, kv_indices, kv_counts, block_m, block_n, mode, pv, smooth_k, scale)
    return (out, lse) if return_lse else out


def _reference(q, k, v, kv_indices, kv_counts, block_m: int, block_n: int, mode: str, pv: str, smooth_k: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's arithmetic on checked inputs: ``(out in q's dtype, float32 lse)``."""
    B, H, S, D = q.shape
    if kv_indices is None:
        kv_indices, kv_counts = dense_block_table(B, H, S, block_m, block_n, device=q.device)
    k_mean = k.float().mean(dim=2, keepdim=True) if smooth_k else torch.zeros(B, H, 1, D, device=k.device)
    q_deq = _dequant(*quantize_per_block(q, 1, mode), 1)
    k_deq = _dequant(*quantize_per_block((k.float() - k_mean), block_n, mode), block_n)
    v_deq = _quantize_v_fp8(v) if pv == "fp8" else v.float()
    out, lse = _bsa_reference(q_deq, k_deq, v_deq, kv_indices, kv_counts, block_m, block_n, scale)
    return out.to(q.dtype), lse + scale * (q.float() @ k_mean.transpose(-1, -2)).squeeze(-1)


# ----------------------------------------------------------------------------- dispatch


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_indices: torch.Tensor | None = None, kv_counts: torch.Tensor | None = None, *,
                    block_m: int = 128, block_n: int = 64, mode: str = "int8", pv: str | None = None,
                    smooth_k: bool = True, sm_scale: float | None = None, return_lse: bool = False,
                    validate: bool | None = None):
    """Quantized attention forward ``softmax(sm_scale · q kᵀ) v``, dense or block-sparse.

    A thin wrapper: it checks the inputs here, in Python, and calls the custom op
    ``torch.ops.dit_accel.quant_attention`` (:mod:`dit_accel.kernels.ops`; ``torch.compile`` traces
    it as one node, the quantization passes included), which picks the Triton kernels or the
    reference at run time. Plain eager calls run the op's function directly (the same code without
    the dispatcher's host overhead: :func:`dit_accel.kernels.ops.plain_eager`).

    Args:
        q, k, v: ``[B, H, S, D]`` float16 / bfloat16, one dtype and device; ``D`` in
            :data:`QUANT_HEAD_DIMS`; any ``S``; any strides.
        kv_indices, kv_counts: optional block table (int32 ``[B, H, ceil(S/block_m), max_kv]`` and
            ``[B, H, ceil(S/block_m)]``, as :func:`~dit_accel.kernels.block_sparse_attention`);
            ``None`` = dense.
        block_m, block_n: q-block / kv-block size in tokens (table granularity; the kernel's query
            tile divides ``block_m``, ``block_n`` is K's quantization group); in :data:`QUANT_BLOCK_SIZES`.
            Defaults 128 / 64 (SageAttention's ``BLKQ`` / ``BLKK``).
        mode: ``"int8"`` (INT8 QKᵀ) or ``"fp8"`` (FP8 e4m3 QKᵀ; compute capability >= 8.9).
        pv: ``"fp8"`` (FP8 P·V, per-channel V scale) or ``"fp16"`` (16-bit P·V in V's dtype, float32
            accumulation); default ``"fp16"`` for ``mode="int8"``, ``"fp8"`` for ``mode="fp8"``.
        smooth_k: subtract K's per-channel token mean before quantizing (softmax-invariant).
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, H, S]`` (of the unsmoothed scores).
        validate: check the table's values (a host sync); default on for CPU, off on CUDA. Never
            done while ``torch.compile`` traces the call (:func:`torch.compiler.is_compiling`:
            reading tensor values would break the graph) nor under a dispatch mode such as fake
            tensors. Shapes, dtypes and modes are always checked.

    Returns:
        ``out`` ``[B, H, S, D]`` in q's dtype (laid out like ``torch.empty_like(q)``), or ``(out, lse)``.

    Raises:
        ValueError: bad dtype, shape, head dim, block size, mode, or table.
    """
    from . import ops

    pv = pv if pv is not None else _default_pv(mode, q.device if isinstance(q, torch.Tensor) else "cpu")
    _check(q, k, v, kv_indices, kv_counts, block_m, block_n, mode, pv, sm_scale)
    eager = ops.plain_eager(q, k, v, kv_indices, kv_counts)
    if kv_indices is not None and eager and (validate if validate is not None else not q.is_cuda):
        _check_values(kv_indices, kv_counts, q.shape[2], block_n)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    op = ops.quant_attention_impl if eager else torch.ops.dit_accel.quant_attention.default
    out, lse = op(q, k, v, kv_indices, kv_counts, block_m, block_n, mode, pv, smooth_k, scale, return_lse)
    return (out, lse) if return_lse else out
