"""Triton kernels, each with a plain-PyTorch reference (the CPU path and the test oracle).

GPU code paths are chosen at run time: the Triton kernel runs on CUDA tensors (or on CPU
tensors under ``TRITON_INTERPRET=1``); everywhere else the reference runs. Importing this
package never imports Triton.

Modules: ``ops`` (the kernels as ``torch.library`` custom ops ``torch.ops.dit_accel.*``, which the
public functions call, so ``torch.compile`` traces through them), ``block_sparse`` (block-sparse
attention API, block tables, reference), ``quant_attention`` (SageAttention-style INT8/FP8
attention, dense or with the same block tables, and its reference), ``pyramid`` (PSA: pyramid
sparse attention over mean-pooled K/V levels, its level tables and reference), ``pisa`` (PISA: the
skipped blocks' Taylor approximation fused into the block-sparse kernel, and its S2O-style early stop),
and the Triton kernels
``_block_sparse_triton`` / ``_quant_attention_triton`` (imported on first use). The quantized
kernel's functions are not re-exported here (the function ``quant_attention`` would shadow its
module): ``from dit_accel.kernels.quant_attention import quant_attention``. What the kernels do and how to
choose their tiles: ``docs/kernels.md``.
"""

from .block_sparse import (
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_HEAD_DIMS,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_table_to_mask,
    dense_block_table,
    mask_to_block_table,
    triton_available,
)
from . import ops  # noqa: E402,F401  (registers torch.ops.dit_accel.*; after block_sparse, which it imports)
from .pyramid import pool_kv, pyramid_attention, pyramid_attention_reference, pyramid_table  # noqa: E402

__all__ = [
    "SUPPORTED_BLOCK_SIZES",
    "SUPPORTED_HEAD_DIMS",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_table_to_mask",
    "dense_block_table",
    "mask_to_block_table",
    "pool_kv",
    "pyramid_attention",
    "pyramid_attention_reference",
    "pyramid_table",
    "triton_available",
]
