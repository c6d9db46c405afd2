"""Exact block masses of softmax attention, given each row's log-sum-exp (Triton kernel and reference).

``M[b, h, qb, kb] = sum_{i in qb, j in kb} exp(sm_scale * q_i . k_j - lse_i)``: the attention mass
that q-block ``qb`` gives kv-block ``kb``. With ``lse`` the rows' true log-sum-exp (from a dense pass:
:func:`dit_accel.kernels.block_sparse_attention` with ``return_lse=True`` and a dense table) every row
sums to 1 over all keys, so a q-block's row of ``M`` sums to its number of queries, and the masses are
exact, not an estimate. This is the pass behind AdaSpa's LSE-cached search (Xia et al. 2025,
:mod:`dit_accel.attention.adaspa`): because the log-sum-exp is already known, the probabilities come
out of one walk over the keys, with no second normalising pass. Any other LSE (e.g. a sparse pass's,
which misses the skipped mass, or a previous step's) gives the same sums against that normaliser.

Blocks follow the block-sparse kernel's conventions (:mod:`dit_accel.kernels.block_sparse`):
``block_m`` / ``block_n`` consecutive tokens, the last block partial for any ``S``.

Dispatch: the Triton kernel (:mod:`dit_accel.kernels._block_mass_triton`) on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1`` (tests); everywhere else :func:`block_mass_reference`. No custom op
is registered: the pass runs eagerly on search steps (not inside a compiled graph).
"""

from __future__ import annotations

import math

import torch

from .block_sparse import SUPPORTED_BLOCK_SIZES, _use_triton

__all__ = ["block_mass", "block_mass_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_m: int, block_n: int, sm_scale) -> None:
    fn = "block_mass"
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor [B, H, S, D], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{fn}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if q.shape != k.shape or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"{fn}: q and k must share shape, dtype and device (self-attention), got "
                         f"{tuple(q.shape)} {q.dtype} {q.device} and {tuple(k.shape)} {k.dtype} {k.device}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(q.shape[:3]) or lse.device != q.device:
        raise ValueError(f"{fn}: lse must be a tensor [B, H, S] = {list(q.shape[:3])} on {q.device}, got "
                         f"{getattr(lse, 'shape', type(lse))}")
    if 0 in q.shape:
        raise ValueError(f"{fn}: B, H, S and D must be positive, got shape {tuple(q.shape)}")
    for name, bs in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(bs, bool) or not isinstance(bs, int) or bs not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{fn}: {name}={bs!r} not supported; supported: {SUPPORTED_BLOCK_SIZES}")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and not isinstance(sm_scale, bool)
                                     and 0 < sm_scale < math.inf):
        raise ValueError(f"{fn}: sm_scale must be a positive finite float or None, got {sm_scale!r}")


def _prepare_lse(lse: torch.Tensor) -> torch.Tensor:
    """float32, with ``-inf`` rows (no key kept by a sparse pass) turned into ``+inf``: they add no mass."""
    lse = lse.float()
    return torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)


def block_mass_reference(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_m: int = 64,
                         block_n: int = 64, sm_scale: float | None = None,
                         max_chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Plain-PyTorch block masses in float32 (the CPU path and the test oracle), over chunks of q-blocks
    of about ``max_chunk_elements`` scores. Returns float32 ``[B, H, ceil(S/block_m), ceil(S/block_n)]``."""
    _check(q, k, lse, block_m, block_n, sm_scale)
    b, h, s, d = q.shape
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    nq, nk = _cdiv(s, block_m), _cdiv(s, block_n)
    lse = _prepare_lse(lse)
    kf = k.float()
    pad_n = nk * block_n - s
    out = torch.empty(b, h, nq, nk, dtype=torch.float32, device=q.device)
    per_chunk = max(1, max_chunk_elements // max(1, b * h * block_m * s))
    for qb0 in range(0, nq, per_chunk):
        qb1 = min(nq, qb0 + per_chunk)
        r0, r1 = qb0 * block_m, min(s, qb1 * block_m)
        p = torch.exp(torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
                      - lse[:, :, r0:r1].unsqueeze(-1))                                   # [B, H, rows, S]
        p = torch.nn.functional.pad(p, (0, pad_n, 0, (qb1 - qb0) * block_m - (r1 - r0)))
        out[:, :, qb0:qb1] = p.view(b, h, qb1 - qb0, block_m, nk, block_n).sum((3, 5))
    return out


def block_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_m: int = 64, block_n: int = 64,
               sm_scale: float | None = None) -> torch.Tensor:
    """Exact block masses ``[B, H, ceil(S/block_m), ceil(S/block_n)]`` (float32) of ``softmax`` attention
    normalised by ``lse``.

    Args:
        q, k: ``[B, H, S, D]`` float16 / bfloat16 / float32, one dtype and device; any strides. Head dims
            that are not a power of two from 16 are zero-padded for the kernel (``q . k`` is unchanged).
        lse: ``[B, H, S]``, natural-log log-sum-exp of each row's scaled scores (float32 as the attention
            kernels return it); ``-inf`` rows add no mass.
        block_m, block_n: tokens per q-block / kv-block (in
            :data:`~dit_accel.kernels.block_sparse.SUPPORTED_BLOCK_SIZES`).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.

    Raises:
        ValueError: on a wrong shape, dtype, device, block size or scale.
    """
    _check(q, k, lse, block_m, block_n, sm_scale)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not _use_triton(q):
        return block_mass_reference(q, k, lse, block_m=block_m, block_n=block_n, sm_scale=scale)
    from ._block_mass_triton import block_mass_triton

    d = q.shape[-1]
    dp = max(16, 1 << (d - 1).bit_length())
    if dp != d:
        q, k = (torch.nn.functional.pad(t, (0, dp - d)) for t in (q, k))
    return block_mass_triton(q, k, _prepare_lse(lse), block_m=block_m, block_n=block_n, sm_scale=scale,
                             interpret=not q.is_cuda)
