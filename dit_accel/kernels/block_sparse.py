"""Block-sparse FlashAttention forward (Triton) and its PyTorch reference.

Attention is computed tile by tile, FlashAttention-2 style (online softmax, Dao 2023), but
each query block only visits the key/value blocks listed for it in a *block table*:

* ``kv_indices`` int32 ``[B, H, num_q_blocks, max_kv_blocks]`` — the kv-block indices of each
  (batch, head, q-block), padded on the right with anything (entries past the count are never
  read);
* ``kv_counts`` int32 ``[B, H, num_q_blocks]`` — how many leading entries of that row are valid.

A q-block is ``block_m`` consecutive query tokens, a kv-block ``block_n`` consecutive key
tokens; ``num_q_blocks = ceil(S / block_m)`` and ``num_kv_blocks = ceil(S / block_n)``. The last
blocks may be partial (any ``S``): the tail is masked, never read.

Conventions (kernel and reference agree on all of them):

* a q-block row with **zero** kv-blocks produces an **all-zero output** and a log-sum-exp of
  ``-inf`` (attention over an empty set; the same convention as FlexAttention);
* a kv-block listed twice in a row is counted twice by the kernel (its keys get double
  weight) — tables must list each block at most once; :func:`mask_to_block_table` and
  :func:`dense_block_table` always do, ``validate=True`` checks it;
* the softmax runs in float32 with ``exp2`` and ``sm_scale * log2(e)`` folded into one
  multiply; the output has the input dtype, the log-sum-exp is float32 in natural-log units of
  the *scaled* scores (``logsumexp(sm_scale * q @ k^T)`` over the kept keys).

Dispatch: :func:`block_sparse_attention` checks its inputs and calls the custom op
``torch.ops.dit_accel.block_sparse_attention`` (:mod:`dit_accel.kernels.ops`; ``torch.compile``
traces it as one node). The op runs the Triton kernel on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` is set (the interpreter, for tests); everywhere else the reference
(:func:`block_sparse_attention_reference`'s arithmetic). The Triton kernel is jitted lazily at the
first call, so whether it is interpreted is decided by the environment at call time, not at import
time.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "dense_block_table",
    "mask_to_block_table",
    "score_sorted_block_table",
    "block_table_to_mask",
    "triton_available",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_BLOCK_SIZES",
]

#: head dims the kernel accepts; 64 and 128 are the production ones, 16/32 are for tiny tests.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
#: block-table granularities (tokens per q-block / kv-block); ``tl.dot`` needs at least 16.
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- block tables


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dense_block_table(B: int, H: int, S: int, block_m: int, block_n: int,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The table that lists every kv-block for every q-block (dense attention).

    Returns ``(kv_indices, kv_counts)``: int32 ``[B, H, nq, nk]`` and int32 ``[B, H, nq]``.
    """
    for name, value in (("B", B), ("H", H), ("S", S), ("block_m", block_m), ("block_n", block_n)):
        if int(value) <= 0:
            raise ValueError(f"dense_block_table: {name} must be positive, got {value}")
    nq, nk = _cdiv(S, block_m), _cdiv(S, block_n)
    idx = torch.arange(nk, dtype=torch.int32, device=device).expand(B, H, nq, nk).contiguous()
    cnt = torch.full((B, H, nq), nk, dtype=torch.int32, device=device)
    return idx, cnt


def table_width(fn: str, name: str, requested: int | None, counts: torch.Tensor, nk: int) -> int:
    """A block table's width: ``requested`` (argument ``name`` of ``fn``; ValueError outside ``[1, nk]``), else the
    largest row count of ``counts``, at least 1 (a read-back: a host sync on CUDA)."""
    if requested is None:
        return max(int(counts.max()) if counts.numel() else 0, 1)
    if not 1 <= int(requested) <= max(nk, 1):
        raise ValueError(f"{fn}: {name} must lie in [1, {nk}], got {requested}")
    return int(requested)


def mask_to_block_table(block_mask: torch.Tensor, max_kv_blocks: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a boolean block mask ``[B, H, nq, nk]`` into ``(kv_indices, kv_counts)``.

    ``kv_indices`` is int32 ``[B, H, nq, max_kv]``: the kept kv-blocks of each row in ascending
    order, padded with 0; ``kv_counts`` is int32 ``[B, H, nq]``. ``max_kv`` is ``max_kv_blocks``
    when given (it must be at least the largest row count; ``nk`` always is), else the largest
    row count (at least 1) — which reads the counts back (a host sync on CUDA; pass
    ``max_kv_blocks`` to avoid it, e.g. under CUDA graphs or ``torch.compile``).
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 4:
        raise ValueError("mask_to_block_table: block_mask must be a 4-D tensor [B, H, num_q_blocks, "
                         f"num_kv_blocks], got {getattr(block_mask, 'shape', type(block_mask))}")
    if block_mask.dtype != torch.bool:
        raise ValueError(f"mask_to_block_table: block_mask must be torch.bool, got {block_mask.dtype}")
    nk = block_mask.shape[-1]
    counts = block_mask.sum(-1, dtype=torch.int32)
    max_kv = table_width("mask_to_block_table", "max_kv_blocks", max_kv_blocks, counts, nk)
    if max_kv > nk:  # nk == 0 edge case: keep one padding column
        block_mask = torch.nn.functional.pad(block_mask, (0, max_kv - nk))
    # Stable sort puts kept blocks (key 0) first, in ascending block order.
    order = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices[..., :max_kv]
    keep = torch.arange(max_kv, device=block_mask.device) < counts.unsqueeze(-1)
    idx = torch.where(keep, order, torch.zeros_like(order)).to(torch.int32)
    return idx.contiguous(), counts.contiguous()


def score_sorted_block_table(block_mask: torch.Tensor, scores: torch.Tensor, max_kv_blocks: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`mask_to_block_table`, but each row lists its kept kv-blocks by ``scores`` descending.

    ``scores`` (float, the shape of ``block_mask``) estimates each block's attention mass; the order is
    what the kernel's early stop (:mod:`dit_accel.kernels.pisa`) needs: heaviest blocks first, so a
    walk may stop once the rest is negligible. Ties keep ascending block order (a stable sort). Counts,
    padding and ``max_kv_blocks`` behave as in :func:`mask_to_block_table`."""
    idx, counts = mask_to_block_table(block_mask, max_kv_blocks)
    if not isinstance(scores, torch.Tensor) or scores.shape != block_mask.shape or not scores.is_floating_point():
        raise ValueError(f"score_sorted_block_table: scores must be a float tensor of the mask's shape "
                         f"{tuple(block_mask.shape)}, got {getattr(scores, 'shape', type(scores).__name__)}")
    max_kv = idx.shape[-1]
    valid = torch.arange(max_kv, device=idx.device) < counts.unsqueeze(-1)
    # the kept blocks' scores in table order; padding sorts last (-inf, then its index order)
    key = torch.where(valid, scores.float().gather(-1, idx.long()), torch.full_like(idx, 0, dtype=torch.float32)
                      - math.inf)
    key = torch.nan_to_num(key, nan=-math.inf)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    sorted_idx = torch.where(valid, idx.gather(-1, order), torch.zeros_like(idx))
    return sorted_idx.contiguous(), counts


def block_table_to_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """The boolean block mask ``[B, H, nq, num_kv_blocks]`` a block table describes."""
    return scatter_table(kv_indices, kv_counts, num_kv_blocks, True, False, torch.bool)


def scatter_table(kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_kv_blocks: int, value, fill,
                  dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, nq, num_kv_blocks]`` of ``dtype``: ``value`` (a scalar, or a tensor of ``kv_indices``' shape: one
    value per entry) at each kv-block a row of the table lists, ``fill`` elsewhere."""
    width = kv_indices.shape[-1]
    valid = torch.arange(width, device=kv_indices.device) < kv_counts.unsqueeze(-1).long()
    # Invalid entries scatter into a spare column that is dropped afterwards.
    target = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices, num_kv_blocks, dtype=torch.long))
    out = torch.full((*kv_indices.shape[:-1], num_kv_blocks + 1), fill, dtype=dtype, device=kv_indices.device)
    out.scatter_(-1, target, value)
    return out[..., :num_kv_blocks]


# ----------------------------------------------------------------------------- validation


def check_qkv(fn: str, q, k, v, dtypes: tuple, head_dims: tuple) -> None:
    """The q/k/v checks every attention kernel here shares: 4-D tensors ``[B, H, S, D]`` of one shape,
    dtype (in ``dtypes``) and device, ``D`` in ``head_dims``, no empty dimension."""
    words = [str(d).replace("torch.", "") for d in dtypes]
    names = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{fn}: {name} must be one of {names}, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{fn}: q, k, v must have the same shape [B, H, S, D] (self-attention), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, S, D = q.shape
    if D not in head_dims:
        raise ValueError(f"{fn}: head dim D={D} not supported; supported: {head_dims}")
    if S == 0 or B == 0 or H == 0:
        raise ValueError(f"{fn}: B, H and S must be positive, got shape {tuple(q.shape)}")


def check_block_sizes(fn: str, block_m, block_n) -> None:
    """``block_m`` and ``block_n`` are ints in :data:`SUPPORTED_BLOCK_SIZES`."""
    for name, bs in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(bs, bool) or not isinstance(bs, int) or bs not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{fn}: {name}={bs!r} not supported; supported: {SUPPORTED_BLOCK_SIZES}")


def check_sm_scale(fn: str, sm_scale) -> None:
    # Comparisons rather than math.isfinite: under torch.compile an argument float is a SymFloat, which
    # comparisons guard on but math.isfinite cannot trace. NaN fails both.
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and not isinstance(sm_scale, bool)
                                     and 0 < sm_scale < math.inf):
        raise ValueError(f"{fn}: sm_scale must be a positive finite float or None, got {sm_scale!r}")


def check_table_shapes(fn: str, q: torch.Tensor, kv_indices, kv_counts, block_m: int) -> None:
    """int32 block tables on q's device, shaped ``[B, H, ceil(S/block_m), >=1]`` and ``[B, H, ceil(S/block_m)]``."""
    B, H, S, _ = q.shape
    nq = _cdiv(S, block_m)
    for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise ValueError(f"{fn}: {name} must be int32 (a torch.Tensor), got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (B, H, nq) or kv_indices.shape[3] < 1:
        raise ValueError(f"{fn}: kv_indices must have shape [B, H, num_q_blocks, max_kv_blocks] = "
                         f"[{B}, {H}, {nq}, >=1] for S={S}, block_m={block_m}; got {tuple(kv_indices.shape)}")
    if tuple(kv_counts.shape) != (B, H, nq):
        raise ValueError(f"{fn}: kv_counts must have shape [B, H, num_q_blocks] = [{B}, {H}, {nq}] for "
                         f"S={S}, block_m={block_m}; got {tuple(kv_counts.shape)}")


def _check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale):
    """Shape/dtype checks shared by the kernel and the reference (no device sync)."""
    fn = "block_sparse_attention"
    check_qkv(fn, q, k, v, _FLOAT_DTYPES, SUPPORTED_HEAD_DIMS)
    check_block_sizes(fn, block_m, block_n)
    check_sm_scale(fn, sm_scale)
    check_table_shapes(fn, q, kv_indices, kv_counts, block_m)


def _check_table_values(kv_indices, kv_counts, S, block_n):
    """Value checks on the block table (these read the table back: a device sync on CUDA)."""
    fn = "block_sparse_attention"
    valid, used = check_table_entries(fn, "max_kv_blocks", kv_indices, kv_counts, S, block_n)
    if used.numel():
        check_no_repeats(fn, kv_indices, valid, "a kv-block is listed twice in one row of kv_indices")


def check_table_entries(fn: str, width_name: str, kv_indices, kv_counts, S: int, block_n: int):
    """The value checks every block table shares (they read it back: a device sync on CUDA): counts in
    ``[0, width]`` (the table width, argument ``width_name``), listed kv-blocks in ``[0, ceil(S / block_n))``.
    Returns ``(valid, used)``: the mask of listed entries and their kv-blocks."""
    nk = _cdiv(S, block_n)
    width = kv_indices.shape[-1]
    if kv_counts.numel() and (int(kv_counts.min()) < 0 or int(kv_counts.max()) > width):
        raise ValueError(f"{fn}: kv_counts must lie in [0, {width_name}={width}], got range "
                         f"[{int(kv_counts.min())}, {int(kv_counts.max())}]")
    valid = torch.arange(width, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    used = kv_indices[valid]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= nk):
        raise ValueError(f"{fn}: kv_indices must lie in [0, num_kv_blocks={nk}) for S={S}, block_n={block_n}; "
                         f"got range [{int(used.min())}, {int(used.max())}]")
    return valid, used


def check_no_repeats(fn: str, kv_indices, valid, message: str) -> None:
    """ValueError ``message`` where a row lists one kv-block twice among its ``valid`` entries."""
    sentinel = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices, -1, dtype=torch.long))
    srt = torch.sort(sentinel, dim=-1).values
    if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
        raise ValueError(f"{fn}: {message}")


# ----------------------------------------------------------------------------- reference


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     kv_indices: torch.Tensor, kv_counts: torch.Tensor, *,
                                     block_m: int = 128, block_n: int = 128, sm_scale: float | None = None,
                                     return_lse: bool = False, validate: bool = True,
                                     max_chunk_elements: int = 1 << 24):
    """Plain-PyTorch block-sparse attention in float32 (the CPU path and the test oracle).

    Materialises the token mask of each chunk of q-blocks from the block table and runs an
    explicit float32 softmax; rows with no kv-block give zeros (and ``lse = -inf``). Memory is
    bounded by processing q-blocks in chunks of about ``max_chunk_elements`` scores.
    ``validate`` checks the table's values (a host sync on CUDA); skipped while
    ``torch.compile`` traces (:func:`torch.compiler.is_compiling`), where reading values would break
    the graph.
    """
    _check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale)
    if validate and not torch.compiler.is_compiling():
        _check_table_values(kv_indices, kv_counts, q.shape[2], block_n)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _reference(q, k, v, kv_indices, kv_counts, block_m, block_n, scale, max_chunk_elements)
    return (out, lse) if return_lse else out


def _reference(q, k, v, kv_indices, kv_counts, block_m: int, block_n: int, scale: float,
               max_chunk_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's arithmetic on checked inputs: ``(out in q's dtype, float32 lse)``."""
    S = q.shape[2]
    nk = _cdiv(S, block_n)
    block_mask = block_table_to_mask(kv_indices, kv_counts, nk)          # [B, H, nq, nk]
    col_mask = block_mask.repeat_interleave(block_n, dim=-1)[..., :S]     # [B, H, nq, S]
    out, lse = masked_softmax_attention(q.float(), k.float(), v.float(), col_mask, block_m, scale, max_chunk_elements)
    return out.to(q.dtype), lse


def masked_softmax_attention(qf: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, col_mask: torch.Tensor,
                             block_m: int, scale: float, max_chunk_elements: int, bias: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(out, lse)`` of ``softmax(scale * qf @ keys^T + bias) @ vals`` over the keys each q-block's
    ``col_mask`` row keeps (``[B, H, nq, keys]``; rows keeping none: zeros, lse ``-inf``), ``qf`` ``[B, H, S, D]``,
    in chunks of q-blocks of about ``max_chunk_elements`` scores (the references' arithmetic)."""
    B, H, S, D = qf.shape
    nq, total = col_mask.shape[2], keys.shape[2]
    out = torch.empty(B, H, S, D, dtype=torch.float32, device=qf.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=qf.device)
    qb_per_chunk = max(1, max_chunk_elements // max(1, B * H * block_m * total))
    for qb0 in range(0, nq, qb_per_chunk):
        qb1 = min(nq, qb0 + qb_per_chunk)
        r0, r1 = qb0 * block_m, min(S, qb1 * block_m)
        mask = col_mask[:, :, qb0:qb1].repeat_interleave(block_m, dim=2)[:, :, : r1 - r0]  # [B, H, rows, keys]
        scores = torch.matmul(qf[:, :, r0:r1], keys.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        scores = scores.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)                        # -inf on empty rows
        p = torch.exp(scores - row_lse.unsqueeze(-1))
        p = torch.nan_to_num(p, nan=0.0)                                  # empty rows: exp(-inf + inf)
        out[:, :, r0:r1] = torch.matmul(p, vals)
        lse[:, :, r0:r1] = row_lse
    return out, lse


# ----------------------------------------------------------------------------- dispatch


def triton_available() -> bool:
    """Whether Triton can be imported (it is not required on CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _use_triton(q: torch.Tensor) -> bool:
    if q.is_cuda:
        return triton_available()
    return q.device.type == "cpu" and _interpret() and triton_available()


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           kv_indices: torch.Tensor, kv_counts: torch.Tensor, *,
                           block_m: int = 128, block_n: int = 128, sm_scale: float | None = None,
                           return_lse: bool = False, validate: bool | None = None):
    """Block-sparse attention forward: ``softmax(sm_scale * q @ k^T, masked to the table) @ v``.

    A thin wrapper: it checks the inputs here, in Python, and calls the custom op
    ``torch.ops.dit_accel.block_sparse_attention`` (:mod:`dit_accel.kernels.ops`), which
    ``torch.compile`` traces as one node (no graph break) and which picks the Triton kernel or the
    reference at run time. Plain eager calls run the op's function directly (the same code without
    the dispatcher's host overhead: :func:`dit_accel.kernels.ops.plain_eager`).

    Args:
        q, k, v: ``[B, H, S, D]`` float16 / bfloat16 (float32 too, mainly for tests); one dtype,
            one device; ``D`` in :data:`SUPPORTED_HEAD_DIMS`; any ``S``; any strides.
        kv_indices: int32 ``[B, H, ceil(S / block_m), max_kv_blocks]``, kv-block indices per
            q-block (entries past the row's count are ignored).
        kv_counts: int32 ``[B, H, ceil(S / block_m)]``, valid entries per row (0 allowed: the
            q-block's output rows are zeros and its log-sum-exp is ``-inf``).
        block_m, block_n: tokens per q-block / kv-block of the table (in
            :data:`SUPPORTED_BLOCK_SIZES`).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the float32 log-sum-exp ``[B, H, S]`` of the scaled scores.
        validate: check the table's *values* (indices in range, counts in range, no duplicates).
            Default: on for CPU tensors (the reference and the interpreter), off on CUDA (it reads
            the table back: a host sync). Never done while ``torch.compile`` traces the call
            (:func:`torch.compiler.is_compiling`: reading tensor values would break the graph) nor
            under a dispatch mode such as fake tensors, where there are no values to read.
            Shapes and dtypes are always checked (they are metadata, free under compile too).

    Returns:
        ``out`` ``[B, H, S, D]`` in q's dtype (laid out like ``torch.empty_like(q)``), or
        ``(out, lse)`` when ``return_lse``.

    Raises:
        ValueError: on a wrong dtype, shape, table shape, head dim or block size.
    """
    from . import ops

    _check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale)
    eager = ops.plain_eager(q, k, v, kv_indices, kv_counts)
    if eager and (validate if validate is not None else not q.is_cuda):
        _check_table_values(kv_indices, kv_counts, q.shape[2], block_n)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    op = ops.block_sparse_attention_impl if eager else torch.ops.dit_accel.block_sparse_attention.default
    out, lse = op(q, k, v, kv_indices, kv_counts, block_m, block_n, scale, return_lse)
    return (out, lse) if return_lse else out
