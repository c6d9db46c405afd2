"""Block scoring for sparse-attention selection: the fused XAttention kernel's public entry point.

:func:`xattention_block_scores` returns the antidiagonal block scores ``[B, H, nq, nk]`` (float32,
rows sum to 1) of XAttention (Xu et al., "XAttention: Block Sparse Attention with Antidiagonal
Scoring", 2025) from one Triton kernel (:mod:`._block_scores_triton`) that never materialises the
reduced queries, keys or the reduced ``[S/stride, S/stride]`` logits: one program per group of
q-blocks streams the keys twice (softmax statistics, then per-block sums). The maths, and the
PyTorch reference the kernel is tested against, is
:func:`dit_accel.attention.select.xattention_scores`, which calls this on CUDA tensors (the
reference runs on CPU; this module does not import ``dit_accel.attention``).

The kernel runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests);
``DIT_ACCEL_SCORE_KERNEL=0`` turns it off here. The selector uses it only with ``DIT_ACCEL_SCORE_KERNEL=1``
until its speed has been measured beside the PyTorch path on a GPU.
Departure from the reference: the reduced products of 16-bit inputs accumulate in float32 (the
reference rounds each product to the input dtype before its float32 softmax).
"""

from __future__ import annotations

import os

import torch

from .block_sparse import _interpret, triton_available

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def block_scores_kernel_available(q: torch.Tensor, block_size: int) -> bool:
    """Whether :func:`xattention_block_scores` runs its kernel for ``q`` (CUDA, or CPU under the
    interpreter, Triton importable, a float dtype, and ``block_size`` a power of two).
    ``DIT_ACCEL_SCORE_KERNEL=0`` turns the kernel off (the callers then use their PyTorch path)."""
    if os.environ.get("DIT_ACCEL_SCORE_KERNEL", "1") == "0":
        return False
    if q.dtype not in _FLOAT_DTYPES or block_size < 1 or block_size & (block_size - 1):
        return False
    if q.is_cuda:
        return triton_available()
    return q.device.type == "cpu" and _interpret() and triton_available()


def xattention_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float,
                            tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Antidiagonal block scores ``[B, H, nq, nk]`` (float32, rows sum to 1) of q, k ``[B, H, S, D]``
    (any strides), ``nq = nk = ceil(S / block_size)``.

    ``block_size``: a power of two; ``stride``: the antidiagonal stride, a divisor of ``block_size``
    (:func:`dit_accel.attention.select.xattention_scores` adjusts it the same way before calling).
    ``scale``: the attention's softmax scale (the reduced logits use ``scale / stride``).
    ``tile``: ``(BLOCK_R, BLOCK_C)`` pins the kernel's tiles (tests); default autotuned on CUDA.

    Raises ValueError on mismatched shapes or dtypes, a block size that is not a power of two, a
    stride that does not divide it, or a device where the kernel cannot run.
    """
    fn = "xattention_block_scores"
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"{fn}: q and k must both be [B, H, S, D] of one shape, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in _FLOAT_DTYPES or q.device != k.device:
        raise ValueError(f"{fn}: q and k must share one float dtype and device, got {q.dtype} / {k.dtype} on "
                         f"{q.device} / {k.device}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
            or block_size & (block_size - 1):
        raise ValueError(f"{fn}: block_size must be a power of two, got {block_size!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or block_size % stride:
        raise ValueError(f"{fn}: stride must be a positive divisor of block_size={block_size}, got {stride!r}")
    if not block_scores_kernel_available(q, block_size):
        raise ValueError(f"{fn}: the kernel needs CUDA tensors (or CPU under TRITON_INTERPRET=1) and Triton; "
                         f"use dit_accel.attention.select.xattention_scores, which falls back to PyTorch")
    from ._block_scores_triton import xattention_scores_triton

    return xattention_scores_triton(q, k, block_size=block_size, stride=stride, scale=float(scale),
                                    interpret=not q.is_cuda, tile=tile)
