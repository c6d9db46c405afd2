"""Block-sparse attention that approximates the skipped blocks (PISA) and stops early (after S2O).

**PISA** — Li, Shao, Zhong, Zhou, Bai, Xiong, Xie, 2026, "PISA: Piecewise Sparse Attention Is Wiser
for Efficient Diffusion Transformers" (arXiv 2602.01077). Block-sparse attention computes the
selected kv-blocks exactly and *drops* the rest; PISA keeps exact computation for the selected
blocks and replaces every other block ``j`` (``n_j`` keys, mean key ``kmean_j``, mean value
``vmean_j``) by a Taylor expansion of ``exp(s q . k_i)`` around ``kmean_j``:

* zeroth order: ``n_j exp(s q . kmean_j)`` joins the softmax denominator and
  ``n_j exp(s q . kmean_j) vmean_j`` the numerator (SVG-EAR's centroid compensation,
  :mod:`dit_accel.attention.compensate`, is the same term);
* first order: ``exp(s q . kmean_j) s q H_j`` joins the numerator, with
  ``H_j = sum_{i in j} (k_i - kmean_j)^T v_i`` (``D x D``); the denominator's first-order term is
  zero because the centred keys of a block sum to zero.

The per-block first-order term costs a ``D x D`` product per query and skipped block — as much as
computing a 64-key block exactly at ``D = 128`` — so the paper shares it. Its released kernel
(``piecewise_sparse_attn_hyd.py`` of github.com/xie-lab-ml/piecewise-sparse-attention; the paper's
text was not available to us, so that kernel is the reading implemented here) sums ``H_j`` over
*all* blocks of the sequence into one matrix ``H`` per (batch, head) and weights it by the mean
zeroth-order weight per key: ``G(q) / S`` with ``G(q) = sum_{j skipped} n_j exp(s q . kmean_j)``,
so the numerator gains ``G(q) (s / S) q H``. This equals the per-block sum exactly when
``H_j = (n_j / S) H`` (every block's keys and values co-vary alike — the "distributional
stability" the paper observes) and is an estimate otherwise. ``compensate="centroid"`` is the
zeroth order alone, ``"pisa"`` adds this first-order term.

Fused: after the exact loop over the row's listed kv-blocks, the Triton kernel
(:mod:`dit_accel.kernels._block_sparse_triton`, constexpr ``COMPENSATE``) streams the block means of
the blocks the row does *not* list through the same online softmax (64 per step), then adds the
first-order term once per program; no separate pass over ``[B, H, S, num_kv_blocks]`` exists. The
block means and ``(s / S) H`` are made once per call here (:func:`block_summaries`, PyTorch).

Departures from the released kernel: the approximated mass is rescaled whenever the running max
moves (the released kernel accumulates it without rescaling); selection is not part of this op
(any block table works: the caller's selector decides, :mod:`dit_accel.attention.sparse`); the
first-order matrix is centred per block and summed over all blocks as there (its "hyd" variant),
not around one global mean (its minimal variant).

**Early stop** — after Zhang, Liu, Yan, Lin, Ning, Chen, Wang, 2026, "S2O: Early Stopping for
Sparse Attention via Online Permutation" (arXiv 2602.22575; only its abstract was available to us).
S2O visits blocks from high to low estimated importance and stops once the current block's score
falls below a threshold. Our reading: each table row lists its kv-blocks by estimated mass,
descending (:func:`~dit_accel.kernels.block_sparse.score_sorted_block_table`); after each kv-block the
kernel takes that block's exact mass ``b_r`` per query row as a bound on every later block of the
row and stops once, for every row ``r`` of the q-block, ``remaining * b_r <= early_stop * l_r``
(``remaining``: blocks left in the row, ``l_r``: the mass accumulated so far, exact part only). A
row's dropped mass is then at most ``early_stop * rho * l_r``, ``rho`` the heaviest dropped block over
the block it stopped at: at most ``early_stop * l_r`` where no later block is heavier for that row
(the order, by pooled score per q-block, is then the row's own). So a selection can hand over a
generous list and pay only for the blocks that matter. Departures: S2O permutes and stops at token granularity inside
FlashAttention's tiles; here the unit is the table's kv-block, the test is per q-block (one program
per table row: the early-stop kernel uses ``BLOCK_M = block_m``) and the threshold is relative to
the accumulated mass rather than an absolute score. Blocks cut by the early stop are dropped, not
compensated (compensation covers the blocks the row does not list).

:func:`pisa_attention` is the entry point: the Triton kernel on CUDA (or under
``TRITON_INTERPRET=1``), else :func:`pisa_attention_reference`'s float32 PyTorch maths (the CPU path
and the test oracle), through the custom op ``torch.ops.dit_accel.pisa_attention``.
"""

from __future__ import annotations

import math

import torch

from . import block_sparse as _bs
from .block_sparse import _cdiv, _check_inputs, _check_table_values, block_table_to_mask

__all__ = ["COMPENSATIONS", "block_summaries", "pisa_attention", "pisa_attention_reference", "walked_pairs"]

#: ``compensate`` modes: drop the skipped blocks, zeroth order (centroids), zeroth + first order (PISA).
COMPENSATIONS = ("none", "centroid", "pisa")
_MODE = {"none": 0, "centroid": 1, "pisa": 2}
#: the early-stop kernel runs one program per table row, so its table block is its tile
_EARLY_STOP_MAX_BLOCK = 128


def block_summaries(k: torch.Tensor, v: torch.Tensor, block_n: int, sm_scale: float, first_order: bool,
                    dtype: torch.dtype | None = None, max_chunk_elements: int = 1 << 24
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(kmean, vmean, hsum)`` of k, v ``[B, H, S, D]`` in kv-blocks of ``block_n`` tokens (the last may be
    partial): the block means ``[B, H, nk, D]`` and, with ``first_order``, ``(sm_scale / S) sum_j H_j``
    ``[B, H, D, D]`` with ``H_j = sum_{i in j} (k_i - kmean_j)^T v_i`` (else None). Means are reduced in
    float32; the first-order product runs in float32 for float32 inputs, else in the inputs' dtype (tensor
    cores; its result is rounded to that dtype for the kernel anyway), over head chunks of about
    ``max_chunk_elements`` elements. Outputs are contiguous, in ``dtype`` (default float32)."""
    b, h, s, d = k.shape
    nk = _cdiv(s, block_n)
    pad = nk * block_n - s
    sizes = torch.full((nk, 1), float(block_n), device=k.device)
    sizes[-1] = block_n - pad
    out_dtype = dtype or torch.float32

    def means(x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return padded.reshape(b, h, nk, block_n, d).sum(-2, dtype=torch.float32) / sizes

    kmean, vmean = means(k), means(v)
    hsum = None
    if first_order:
        work = torch.float32 if k.dtype == torch.float32 or not k.is_cuda else k.dtype
        step = max(1, max_chunk_elements // max(1, b * nk * block_n * d))
        parts = []
        for i in range(0, h, step):
            kp = torch.nn.functional.pad(k[:, i:i + step], (0, 0, 0, pad)).reshape(b, -1, nk, block_n, d)
            vp = torch.nn.functional.pad(v[:, i:i + step], (0, 0, 0, pad)).to(work)  # padded values are 0
            centred = (kp.float() - kmean[:, i:i + step].unsqueeze(-2)).to(work).reshape(b, -1, nk * block_n, d)
            parts.append(centred.transpose(-1, -2) @ vp)
        hsum = (torch.cat(parts, 1).float() * (sm_scale / s)).to(out_dtype).contiguous()
    return kmean.to(out_dtype).contiguous(), vmean.to(out_dtype).contiguous(), hsum


def _check_options(compensate: str, early_stop, block_m: int) -> float:
    """Validate the two options; returns the early-stop bound (0.0: off)."""
    fn = "pisa_attention"
    if compensate not in COMPENSATIONS:
        raise ValueError(f"{fn}: compensate={compensate!r} not supported; choose one of {list(COMPENSATIONS)}")
    if early_stop is None:
        return 0.0
    if isinstance(early_stop, bool) or not isinstance(early_stop, (int, float)) or not 0 <= early_stop < math.inf:
        raise ValueError(f"{fn}: early_stop must be None or a finite number >= 0, got {early_stop!r}")
    if early_stop > 0 and block_m > _EARLY_STOP_MAX_BLOCK:
        raise ValueError(f"{fn}: early_stop needs block_m <= {_EARLY_STOP_MAX_BLOCK} (one program per q-block), "
                         f"got {block_m}")
    return float(early_stop)


def pisa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                   kv_counts: torch.Tensor, *, block_m: int = 128, block_n: int = 128, sm_scale: float | None = None,
                   compensate: str = "pisa", early_stop: float | None = None, return_lse: bool = False,
                   return_walked: bool = False, validate: bool | None = None):
    """Block-sparse attention over the table's kv-blocks plus the approximation of every other block.

    Args:
        q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale, validate: as for
            :func:`dit_accel.kernels.block_sparse_attention` (same checks, same table layout).
        compensate: ``"none"`` (the unlisted blocks are dropped), ``"centroid"`` (zeroth order) or
            ``"pisa"`` (zeroth + the shared first order): the module docstring has the maths.
        early_stop: None / 0 (walk every listed block) or the relative remaining-mass bound: walk each
            row's listed blocks in table order (make it by score, descending:
            :func:`~dit_accel.kernels.block_sparse.score_sorted_block_table`) and stop once the rest is
            at most ``early_stop`` times the mass so far (module docstring). Needs ``block_m <= 128``.
        return_lse: also return the float32 log-sum-exp ``[B, H, S]`` of the exact plus approximated mass.
        return_walked: also return the int32 ``[B, H, nq]`` listed entries walked per row (``kv_counts``
            when there is no early stop).

    Returns:
        ``out`` (q's dtype, laid out like ``torch.empty_like(q)``), then ``lse`` and ``walked`` if asked.
    """
    from .ops import plain_eager

    _check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale)
    stop = _check_options(compensate, early_stop, block_m)
    eager = plain_eager(q, k, v, kv_indices, kv_counts)
    if eager and (validate if validate is not None else not q.is_cuda):
        _check_table_values(kv_indices, kv_counts, q.shape[2], block_n)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    op = pisa_attention_impl if eager else torch.ops.dit_accel.pisa_attention.default
    out, lse, walked = op(q, k, v, kv_indices, kv_counts, block_m, block_n, scale, _MODE[compensate], stop,
                          return_lse)
    if return_walked and stop == 0.0:
        walked = kv_counts
    extra = ((lse,) if return_lse else ()) + ((walked,) if return_walked else ())
    return (out, *extra) if extra else out


def pisa_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                             kv_counts: torch.Tensor, *, block_m: int = 128, block_n: int = 128,
                             sm_scale: float | None = None, compensate: str = "pisa", early_stop: float | None = None,
                             return_lse: bool = False, return_walked: bool = False, validate: bool = True,
                             max_chunk_elements: int = 1 << 24):
    """Plain-PyTorch float32 maths of :func:`pisa_attention` (the CPU path and the test oracle); same
    arguments and returns. Rows are processed in chunks of q-blocks of about ``max_chunk_elements`` scores."""
    _check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale)
    stop = _check_options(compensate, early_stop, block_m)
    if validate and not torch.compiler.is_compiling():
        _check_table_values(kv_indices, kv_counts, q.shape[2], block_n)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse, walked = _reference(q, k, v, kv_indices, kv_counts, block_m, block_n, scale, _MODE[compensate], stop,
                                  max_chunk_elements)
    extra = ((lse,) if return_lse else ()) + ((walked if walked is not None else kv_counts,) if return_walked else ())
    return (out, *extra) if extra else out


def _walked(scores: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor, qb0: int, block_m: int,
            block_n: int, eps: float) -> torch.Tensor:
    """Entries walked ``[B, H, chunk q-blocks]`` under the early-stop rule, from the chunk's scaled scores
    ``[B, H, rows, S]`` (the rows of whole q-blocks from ``qb0``; the last q-block may be partial)."""
    b, h, rows, s = scores.shape
    nk = _cdiv(s, block_n)
    nqc = _cdiv(rows, block_m)
    padded = torch.nn.functional.pad(scores, (0, nk * block_n - s), value=-math.inf)
    block_lse = torch.logsumexp(padded.reshape(b, h, rows, nk, block_n), -1)                   # [B, H, rows, nk]
    row_q = torch.arange(rows, device=scores.device) // block_m                                 # row -> chunk q-block
    idx = kv_indices[:, :, qb0:qb0 + nqc].long()[:, :, row_q]                                  # [B, H, rows, max_kv]
    cnt = kv_counts[:, :, qb0:qb0 + nqc].long()[:, :, row_q].unsqueeze(-1)
    pos = torch.arange(idx.shape[-1], device=scores.device)
    valid = pos < cnt
    mass = block_lse.gather(-1, idx).masked_fill(~valid, -math.inf)                # each walked block's mass, log
    done = torch.logcumsumexp(mass, -1)                                            # mass walked so far, log
    remaining = (cnt - 1 - pos).clamp(min=0).float()
    ok = (remaining.log() + mass <= math.log(eps) + done) | ~valid
    # one decision per q-block: every one of its rows must pass (rows past S do not exist here)
    ok = torch.nn.functional.pad(ok, (0, 0, 0, nqc * block_m - rows), value=True)
    ok = ok.view(b, h, nqc, block_m, -1).all(-2)
    first = torch.where(ok, pos, torch.full_like(pos, idx.shape[-1])).min(-1).values
    return torch.minimum(first + 1, kv_counts[:, :, qb0:qb0 + nqc].long()).to(torch.int32)


def _reference(q, k, v, kv_indices, kv_counts, block_m: int, block_n: int, scale: float, mode: int, eps: float,
               max_chunk_elements: int = 1 << 24):
    """The reference's arithmetic on checked inputs: ``(out in q's dtype, float32 lse, walked or None)``."""
    b, h, s, d = q.shape
    nq, nk = _cdiv(s, block_m), _cdiv(s, block_n)
    qf, kf, vf = q.float(), k.float(), v.float()
    listed = block_table_to_mask(kv_indices, kv_counts, nk)                                    # [B, H, nq, nk]
    if mode:
        kmean, vmean, hsum = block_summaries(k, v, block_n, scale, mode == 2)
        sizes = torch.full((nk,), float(block_n), device=q.device)
        sizes[-1] = s - block_n * (nk - 1)
    out = torch.empty(b, h, s, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    walked = torch.empty(b, h, nq, dtype=torch.int32, device=q.device) if eps > 0 else None
    qb_per_chunk = max(1, max_chunk_elements // max(1, b * h * block_m * s))
    for qb0 in range(0, nq, qb_per_chunk):
        qb1 = min(nq, qb0 + qb_per_chunk)
        r0, r1 = qb0 * block_m, min(s, qb1 * block_m)
        scores = torch.matmul(qf[:, :, r0:r1], kf.transpose(-1, -2)) * scale                  # [B, H, rows, S]
        chunk_listed = listed[:, :, qb0:qb1]
        walked_mask = chunk_listed
        if walked is not None:
            walked[:, :, qb0:qb1] = _walked(scores, kv_indices, kv_counts, qb0, block_m, block_n, eps)
            walked_mask = block_table_to_mask(kv_indices[:, :, qb0:qb1], walked[:, :, qb0:qb1], nk)
        per_row = lambda m: m.repeat_interleave(block_m, dim=2)[:, :, : r1 - r0]  # noqa: E731
        col_mask = per_row(walked_mask).repeat_interleave(block_n, dim=-1)[..., :s]
        exact = scores.masked_fill(~col_mask, -math.inf)
        row_lse = torch.logsumexp(exact, -1)
        if mode:
            comp = (qf[:, :, r0:r1] @ kmean.transpose(-1, -2)) * scale + sizes.log()           # [B, H, rows, nk]
            comp = comp.masked_fill(per_row(chunk_listed), -math.inf)
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(comp, -1))
        total = row_lse.unsqueeze(-1)
        o = torch.exp(exact - total).nan_to_num(0.0) @ vf
        if mode:
            w = torch.exp(comp - total).nan_to_num(0.0)
            o = o + w @ vmean
            if mode == 2:
                o = o + w.sum(-1, keepdim=True) * (qf[:, :, r0:r1] @ hsum)
        out[:, :, r0:r1] = o
        lse[:, :, r0:r1] = row_lse
    return out.to(q.dtype), lse, walked


def walked_pairs(kv_indices: torch.Tensor, walked: torch.Tensor, seq_len: int, block_m: int,
                 block_n: int) -> torch.Tensor:
    """Float32 scalar: query-key pairs the walk computed (each row's first ``walked`` entries of the table)."""
    nq, nk = kv_indices.shape[2], _cdiv(seq_len, block_n)
    key_sizes = torch.full((nk,), float(block_n), device=kv_indices.device)
    key_sizes[-1] = seq_len - block_n * (nk - 1)
    row_sizes = torch.full((nq,), float(block_m), device=kv_indices.device)
    row_sizes[-1] = seq_len - block_m * (nq - 1)
    mask = block_table_to_mask(kv_indices, walked, nk).float()
    return torch.einsum("bhqk,q,k->", mask, row_sizes, key_sizes)


# ----------------------------------------------------------------------------- custom op


def _no_walk(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.int32)


def pisa_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                        kv_counts: torch.Tensor, block_m: int, block_n: int, sm_scale: float, compensate: int,
                        early_stop: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's function on checked inputs: Triton (CUDA, or CPU under the interpreter) or the reference.
    Returns ``(out, lse or an empty [0], walked int32 [B, H, nq] or an empty [0])``."""
    from .ops import _like_q, _no_lse

    eps = early_stop if early_stop > 0 else None
    if _bs._use_triton(q):
        from ._block_sparse_triton import block_sparse_attention_triton

        summaries = kept = None
        if compensate:
            kmean, vmean, hsum = block_summaries(k, v, block_n, sm_scale, compensate == 2, dtype=q.dtype)
            summaries = (kmean, vmean, hsum if hsum is not None else kmean)
            nk = _cdiv(q.shape[2], block_n)
            kept = block_table_to_mask(kv_indices, kv_counts, nk).to(torch.uint8).contiguous()
        res = block_sparse_attention_triton(q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n,
                                            qk_scale=sm_scale * _bs._LOG2E, interpret=not q.is_cuda,
                                            return_lse=return_lse, compensate=compensate, summaries=summaries,
                                            kept=kept, early_stop=eps)
        out, lse = res[0], res[1]
        walked = res[2] if eps is not None else _no_walk(q)
    else:
        out, lse, walked = _reference(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale, compensate,
                                      early_stop)
        out = _like_q(q, out)
        walked = walked if walked is not None else _no_walk(q)
    return out, (lse if return_lse else _no_lse(q)), walked


pisa_attention_op = torch.library.custom_op("dit_accel::pisa_attention", pisa_attention_impl, mutates_args=())


@pisa_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_m, block_n, sm_scale, compensate, early_stop, return_lse):
    b, h, s, _ = q.shape
    lse = q.new_empty((b, h, s), dtype=torch.float32) if return_lse else q.new_empty((0,), dtype=torch.float32)
    walked = q.new_empty((b, h, kv_indices.shape[2]), dtype=torch.int32) if early_stop > 0 else _no_walk(q)
    return torch.empty_like(q), lse, walked
