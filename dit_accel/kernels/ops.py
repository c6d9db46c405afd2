"""The attention kernels as ``torch.library`` custom ops, so that ``torch.compile`` traces through them.

Two functional ops in the ``dit_accel`` namespace (no input is written, every output is freshly
allocated; ``mutates_args=()``)::

    dit_accel::block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_indices, Tensor kv_counts,
        SymInt block_m, SymInt block_n, float sm_scale, bool return_lse) -> (Tensor out, Tensor lse)
    dit_accel::quant_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_indices, Tensor? kv_counts,
        SymInt block_m, SymInt block_n, str mode, str pv, bool smooth_k, float sm_scale, bool return_lse)
        -> (Tensor out, Tensor lse)

``out`` is ``torch.empty_like(q)``'s layout (q's strides when q is dense, else contiguous), in q's
dtype; ``lse`` is float32 ``[B, H, S]`` when ``return_lse``, else an empty ``[0]`` tensor (an op
returns a fixed number of tensors; an empty one costs no kernel). The quantized op includes its
quantization passes (K/V statistics, K/V quantization, Q quantization) — they are launches inside
the op, not separate graph nodes, so a compiled graph holds one node per attention call.

In plain eager calls the wrappers call the ops' Python functions (``*_impl``) directly, skipping
the dispatcher's custom-op overhead; under ``torch.compile`` / ``torch.export``, any dispatch mode
(fake tensors, ``make_fx``) or tensor subclasses they call the ops (:func:`plain_eager`). Both run
the same code.

The ops take *checked* inputs: the public wrappers
(:func:`dit_accel.kernels.block_sparse_attention`,
:func:`dit_accel.kernels.quant_attention.quant_attention`) validate shapes, dtypes and modes in
Python before calling them, and the table's values only outside ``torch.compile`` (reading values
inside a graph would need a host sync). Call the wrappers, not the ops, unless the inputs are known
to be valid.

Dispatch happens inside the op, at run time, as the wrappers did before: the Triton kernels on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``; else the PyTorch reference. The fake
(meta) implementations return empty outputs of the right shape, dtype and strides, which is all
dynamo / AOT autograd / inductor need to trace the ops. There is no autograd formula (forward
only). Plain ``custom_op`` rather than ``triton_op``: the Triton launches autotune, build TMA
descriptors in autotuner pre-hooks and may run under the interpreter, none of which inductor
needs to see.
"""

from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import block_sparse as _bs
from . import quant_attention as _qa

__all__ = ["block_sparse_attention_op", "block_sparse_attention_impl", "quant_attention_op", "quant_attention_impl",
           "plain_eager"]


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def _like_q(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` in the layout the fake implementation promises (``empty_like(q)``); a copy only when the
    reference produced another (it is contiguous, q may be a transposed view)."""
    target = torch.empty_like(q)
    if target.stride() == out.stride():
        return out
    return target.copy_(out)


def plain_eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call is plain eager PyTorch: not traced by ``torch.compile`` / ``torch.export``, no
    dispatch mode active (``FakeTensorMode``, ``make_fx``'s proxy mode, functionalization) and only plain
    tensors (no subclass). The wrappers then call the op's Python function directly — same code, without
    the dispatcher's custom-op hops (tens of microseconds of host time per call, which matters for the
    host-bound short sequences) — and may read the block table's values. Otherwise they call the op."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def block_sparse_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                                kv_counts: torch.Tensor, block_m: int, block_n: int, sm_scale: float,
                                return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward on checked inputs (see :func:`dit_accel.kernels.block_sparse_attention`)."""
    if _bs._use_triton(q):
        from ._block_sparse_triton import block_sparse_attention_triton

        out, lse = block_sparse_attention_triton(q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n,
                                                 qk_scale=sm_scale * _bs._LOG2E, interpret=not q.is_cuda,
                                                 return_lse=return_lse)
    else:
        out, lse = _bs._reference(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale)
        out = _like_q(q, out)
    return out, (lse if return_lse else _no_lse(q))


block_sparse_attention_op = torch.library.custom_op("dit_accel::block_sparse_attention", block_sparse_attention_impl,
                                                    mutates_args=())


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale, return_lse):
    B, H, S, _ = q.shape
    return torch.empty_like(q), (q.new_empty((B, H, S), dtype=torch.float32) if return_lse else _no_lse(q))


def quant_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: Optional[torch.Tensor],
                       kv_counts: Optional[torch.Tensor], block_m: int, block_n: int, mode: str, pv: str,
                       smooth_k: bool, sm_scale: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized attention forward on checked inputs (see :func:`dit_accel.kernels.quant_attention.quant_attention`)."""
    if _bs._use_triton(q):
        from ._quant_attention_triton import quant_attention_triton

        out, lse = quant_attention_triton(q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n,
                                          qk_scale=sm_scale * _qa._LOG2E, sm_scale=sm_scale, qk_fp8=mode == "fp8",
                                          pv_fp8=pv == "fp8", smooth_k=smooth_k, interpret=not q.is_cuda,
                                          return_lse=return_lse)
    else:
        out, lse = _qa._reference(q, k, v, kv_indices, kv_counts, block_m, block_n, mode, pv, smooth_k, sm_scale)
        out = _like_q(q, out)
    return out, (lse if return_lse else _no_lse(q))


quant_attention_op = torch.library.custom_op("dit_accel::quant_attention", quant_attention_impl, mutates_args=())


@quant_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_m, block_n, mode, pv, smooth_k, sm_scale, return_lse):
    B, H, S, _ = q.shape
    return torch.empty_like(q), (q.new_empty((B, H, S), dtype=torch.float32) if return_lse else _no_lse(q))
