"""Block-sparse FlashAttention forward: Triton kernel (under TRITON_INTERPRET=1 on CPU) vs the
PyTorch reference vs dense SDPA. Shapes are tiny so the interpreter finishes in seconds."""

import os

# Before Triton is imported (it reads TRITON_INTERPRET when its language helpers are decorated);
# restored right after the imports, and set again only while this module's tests run (_interpreter).
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dit_accel.kernels import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    block_table_to_mask,
    dense_block_table,
    mask_to_block_table,
    triton_available,
)
from dit_accel.kernels import block_sparse as bsa_module  # noqa: E402
from helpers import compile_ahead_of_time, fresh_process_only, interpreter_gate, qkv, run_in_fresh_process  # noqa: E402


# Triton reads TRITON_INTERPRET when it is imported. In a full pytest run an earlier test module has
# usually imported it already (diffusers imports it) in compiled mode; then the kernel tests of this
# module run in a fresh subprocess instead (test_kernel_tests_in_fresh_process).
INTERPRETER_READY, requires_triton, _interpreter = interpreter_gate(_PREVIOUS_INTERPRET)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def kernel(*args, **kwargs):
    """The Triton path (interpreted on CPU)."""
    from dit_accel.kernels._block_sparse_triton import block_sparse_attention_triton  # noqa: F401

    assert bsa_module._use_triton(args[0])
    return block_sparse_attention(*args, **kwargs)


def random_table(B, H, S, bm, bn, density=0.5, seed=0, empty_rows=False):
    g = torch.Generator().manual_seed(seed)
    nq, nk = math.ceil(S / bm), math.ceil(S / bn)
    mask = torch.rand(B, H, nq, nk, generator=g) < density
    if not empty_rows:  # every q-block keeps at least one (random) kv-block
        mask[torch.arange(B)[:, None, None], torch.arange(H)[None, :, None], torch.arange(nq)[None, None, :],
             torch.randint(0, nk, (B, H, nq), generator=g)] = True
    return mask, *mask_to_block_table(mask)


def token_mask(block_mask, S, bm, bn):
    return block_mask.repeat_interleave(bm, 2)[:, :, :S].repeat_interleave(bn, 3)[..., :S]


# ----------------------------------------------------------------------------- block tables


def test_dense_block_table_shapes():
    idx, cnt = dense_block_table(2, 3, 77, 32, 16)
    assert idx.shape == (2, 3, 3, 5) and cnt.shape == (2, 3, 3)
    assert idx.dtype == cnt.dtype == torch.int32
    assert (cnt == 5).all() and (idx == torch.arange(5, dtype=torch.int32)).all()
    assert block_table_to_mask(idx, cnt, 5).all()


def test_mask_to_block_table_roundtrip():
    mask, idx, cnt = random_table(2, 3, 100, 16, 32, density=0.4, empty_rows=True)
    assert idx.dtype == cnt.dtype == torch.int32
    assert torch.equal(cnt, mask.sum(-1).int())
    assert torch.equal(block_table_to_mask(idx, cnt, mask.shape[-1]), mask)
    # kept blocks come in ascending order
    for b, h, r in [(0, 0, 0), (1, 2, 3)]:
        assert idx[b, h, r, : cnt[b, h, r]].tolist() == torch.nonzero(mask[b, h, r]).flatten().tolist()
    empty = torch.zeros(1, 1, 2, 3, dtype=torch.bool)
    idx0, cnt0 = mask_to_block_table(empty)
    assert idx0.shape == (1, 1, 2, 1) and (cnt0 == 0).all()


# ----------------------------------------------------------------------------- dense == SDPA


@pytest.mark.parametrize("S,bm,bn,D", [(64, 16, 16, 16), (77, 32, 16, 64)])
def test_reference_dense_matches_sdpa(S, bm, bn, D):
    q, k, v = qkv(2, 2, S, D)
    idx, cnt = dense_block_table(2, 2, S, bm, bn)
    out = block_sparse_attention_reference(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL[torch.float32])


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("S,bm,bn,D", [(64, 32, 32, 64), (77, 32, 16, 32)])
def test_kernel_dense_matches_sdpa(S, bm, bn, D, dtype):
    q, k, v = qkv(1, 2, S, D, dtype)
    idx, cnt = dense_block_table(1, 2, S, bm, bn)
    out = kernel(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    assert out.dtype == dtype and out.shape == q.shape
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


# ----------------------------------------------------------------------------- sparse


@requires_triton
@pytest.mark.parametrize("S,bm,bn,D", [(64, 16, 16, 16), (77, 16, 32, 64), (77, 32, 16, 32), (96, 32, 32, 64)])
def test_kernel_random_masks_match_reference(S, bm, bn, D):
    q, k, v = qkv(1, 2, S, D, seed=S + D)
    mask, idx, cnt = random_table(1, 2, S, bm, bn, density=0.5, seed=bm * bn)
    out = kernel(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # and both equal SDPA with the materialised token mask
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(mask, S, bm, bn))
    torch.testing.assert_close(ref, sdpa, **TOL[torch.float32])


@requires_triton
def test_tma_and_pointer_loads_agree(monkeypatch):
    """TMA descriptors (the sm_90 default; zero-filled tails) and pointer loads (masked tails) agree,
    also on strided q/k/v as diffusers passes them ([B, S, H, D] transposed)."""
    import dit_accel.kernels._block_sparse_triton as bst

    S, bm, bn, D = 77, 32, 16, 32
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(1, 2, S, D, torch.bfloat16, seed=11))
    _, idx, cnt = random_table(1, 2, S, bm, bn, density=0.5, seed=12)
    outs = []
    for tma in (True, False):
        monkeypatch.setattr(bst, "USE_TMA", tma)
        outs.append(kernel(q, k, v, idx, cnt, block_m=bm, block_n=bn))
    assert torch.equal(outs[0], outs[1])


@requires_triton
def test_kernel_fp16_sparse_matches_reference():
    S, bm, bn, D = 77, 32, 16, 64
    q, k, v = qkv(1, 2, S, D, torch.float16, seed=3)
    _, idx, cnt = random_table(1, 2, S, bm, bn, density=0.3, seed=5)
    out = kernel(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.float16])


@requires_triton
def test_lse_matches_logsumexp_of_scaled_scores():
    S, bm, bn, D, scale = 77, 32, 16, 32, 0.3
    q, k, v = qkv(1, 2, S, D, seed=7)
    mask, idx, cnt = random_table(1, 2, S, bm, bn, density=0.5, seed=11)
    scores = (q @ k.transpose(-1, -2)) * scale
    expected = torch.logsumexp(scores.masked_fill(~token_mask(mask, S, bm, bn), float("-inf")), dim=-1)
    out, lse = kernel(q, k, v, idx, cnt, block_m=bm, block_n=bn, sm_scale=scale, return_lse=True)
    out_r, lse_r = block_sparse_attention_reference(q, k, v, idx, cnt, block_m=bm, block_n=bn, sm_scale=scale,
                                                    return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, S)
    torch.testing.assert_close(lse, expected, **TOL[torch.float32])
    torch.testing.assert_close(lse_r, expected, **TOL[torch.float32])
    torch.testing.assert_close(out, out_r, **TOL[torch.float32])
    # dense table: lse == logsumexp of all scaled scores
    didx, dcnt = dense_block_table(1, 2, S, bm, bn)
    _, dlse = kernel(q, k, v, didx, dcnt, block_m=bm, block_n=bn, sm_scale=scale, return_lse=True)
    torch.testing.assert_close(dlse, torch.logsumexp(scores, -1), **TOL[torch.float32])


@requires_triton
def test_batches_and_heads_use_their_own_tables():
    B, H, S, bm, bn, D = 2, 3, 48, 16, 16, 16
    q, k, v = qkv(B, H, S, D, seed=13)
    _, idx, cnt = random_table(B, H, S, bm, bn, density=0.4, seed=17)
    assert not torch.equal(idx[0, 0], idx[1, 2])
    out = kernel(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    for b in range(B):
        for h in range(H):
            sl = (slice(b, b + 1), slice(h, h + 1))
            one = block_sparse_attention_reference(q[sl], k[sl], v[sl], idx[sl].contiguous(), cnt[sl].contiguous(),
                                                   block_m=bm, block_n=bn)
            torch.testing.assert_close(out[sl], one, **TOL[torch.float32])


@requires_triton
def test_non_contiguous_inputs():
    """[B, S, H, D] activations viewed as [B, H, S, D] (strided), as diffusers produces them."""
    B, H, S, bm, bn, D = 1, 2, 40, 16, 32, 32
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(B, H, S, D, seed=19))
    assert not q.is_contiguous()
    _, idx, cnt = random_table(B, H, S, bm, bn, density=0.6, seed=23)
    out = kernel(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    ref = block_sparse_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), idx, cnt,
                                           block_m=bm, block_n=bn)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("path", ["reference", pytest.param("kernel", marks=requires_triton)])
def test_empty_rows_give_zeros_and_minus_inf_lse(path):
    S, bm, bn, D = 77, 32, 16, 16
    q, k, v = qkv(1, 2, S, D, seed=29)
    mask, idx, cnt = random_table(1, 2, S, bm, bn, density=0.5, seed=31)
    cnt[0, 0, 1] = 0          # q-block 1 of head 0 sees nothing
    cnt[0, 1, 2] = 0          # the partial last q-block of head 1 sees nothing
    fn = kernel if path == "kernel" else block_sparse_attention_reference
    out, lse = fn(q, k, v, idx, cnt, block_m=bm, block_n=bn, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[0, 0, 32:64] == 0).all() and (out[0, 1, 64:] == 0).all()
    assert torch.isneginf(lse[0, 0, 32:64]).all() and torch.isneginf(lse[0, 1, 64:]).all()
    assert torch.isfinite(lse[0, 0, :32]).all() and torch.isfinite(lse[0, 1, :64]).all()
    if path == "kernel":
        ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_m=bm, block_n=bn)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


# ----------------------------------------------------------------------------- dispatch


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(1, 1, 20, 16)
    idx, cnt = dense_block_table(1, 1, 20, 16, 16)
    assert not bsa_module._use_triton(q)
    out = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL[torch.float32])


@requires_triton
def test_interpreter_runs_the_kernel(monkeypatch):
    from dit_accel.kernels import _block_sparse_triton

    calls = []
    launch = _block_sparse_triton.block_sparse_attention_triton
    monkeypatch.setattr(_block_sparse_triton, "block_sparse_attention_triton",
                        lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    q, k, v = qkv(1, 1, 20, 16)
    idx, cnt = dense_block_table(1, 1, 20, 16, 16)
    block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
    assert calls == [1]


@fresh_process_only(INTERPRETER_READY)
def test_kernel_tests_in_fresh_process():
    """Run this module again in a process where TRITON_INTERPRET=1 is set before triton's import."""
    run_in_fresh_process(__file__, "-k", "not hopper")


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_autotune_space_is_pruned_to_the_table():
    from dit_accel.kernels._block_sparse_triton import _prune, hopper_configs

    def shapes(tbm, tbn, d):
        kept = _prune(hopper_configs(), {}, TABLE_BM=tbm, TABLE_BN=tbn, HEAD_DIM=d)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}

    full = shapes(128, 128, 128)
    assert {(128, 128, 8, 3), (64, 64, 4, 2)} <= full
    assert not any(bm == 128 and w == 4 for bm, _, w, _ in full)       # would spill with D=128
    assert (128, 128, 4, 2) in shapes(128, 128, 64)
    assert {bm for bm, *_ in shapes(64, 128, 128)} == {64}
    assert shapes(32, 16, 64) == {(32, 16, 4, 2), (32, 16, 4, 3)}      # small tables: tile = table block


_AOT_SCRIPT = """
from dit_accel.kernels._block_sparse_triton import aot_compile
k = aot_compile(dtype="bf16", head_dim=128, block_m=128, block_n=128, num_warps=8, num_stages=3, even=False)
ptx = k.asm["ptx"]
print("RESULT", ptx.count("wgmma.mma_async"), ptx.count("cp.async"), k.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_kernel_compiles_for_hopper_without_gpu():
    """The GPU path, compiled ahead of time for sm_90 (no GPU needed): the largest autotune config,
    with tail masking, uses wgmma, pipelines K/V with cp.async and fits in shared memory."""
    stdout = compile_ahead_of_time(_AOT_SCRIPT)
    wgmma, cp_async, shared = (int(x) for x in stdout.split("RESULT")[1].split())
    assert wgmma > 0 and cp_async > 0
    assert shared <= 227 * 1024


# ----------------------------------------------------------------------------- bad inputs


def _good(S=32, D=16, bm=16, bn=16):
    q, k, v = qkv(1, 2, S, D)
    idx, cnt = dense_block_table(1, 2, S, bm, bn)
    return q, k, v, idx, cnt


@pytest.mark.parametrize("fn", [block_sparse_attention, block_sparse_attention_reference])
@pytest.mark.parametrize("case,match", [
    ("int_q", "float16, bfloat16 or float32"),
    ("mixed_dtype", "share one dtype"),
    ("3d_q", "4-D"),
    ("shape_mismatch", "same shape"),
    ("head_dim", "head dim D=24 not supported"),
    ("head_dim_big", "head dim D=256 not supported"),
    ("int64_table", "kv_indices must be int32"),
    ("table_shape", "kv_indices must have shape"),
    ("counts_shape", "kv_counts must have shape"),
    ("block_size", "block_m=24"),
    ("sm_scale", "sm_scale"),
    ("count_range", "kv_counts must lie in"),
    ("index_range", "kv_indices must lie in"),
    ("duplicate", "listed twice"),
])
def test_bad_inputs_raise_value_error(fn, case, match):
    q, k, v, idx, cnt = _good()
    kw = dict(block_m=16, block_n=16)
    if case == "int_q":
        q = q.to(torch.int32)
    elif case == "mixed_dtype":
        k = k.half()
    elif case == "3d_q":
        q = q[0]
    elif case == "shape_mismatch":
        k = k[:, :, :16]
    elif case == "head_dim":
        q, k, v = (t.new_zeros(1, 2, 32, 24) for t in (q, k, v))
    elif case == "head_dim_big":
        q, k, v = (t.new_zeros(1, 2, 32, 256) for t in (q, k, v))
    elif case == "int64_table":
        idx = idx.long()
    elif case == "table_shape":
        idx = idx[:, :, :1]
    elif case == "counts_shape":
        cnt = cnt[0]
    elif case == "block_size":
        kw["block_m"] = 24
    elif case == "sm_scale":
        kw["sm_scale"] = -1.0
    elif case == "count_range":
        cnt = cnt + 5
    elif case == "index_range":
        idx = idx + 2
    elif case == "duplicate":
        idx = idx.clone()
        idx[0, 0, 0, 1] = idx[0, 0, 0, 0]
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, idx, cnt, **kw)


def test_block_table_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="torch.bool"):
        mask_to_block_table(torch.ones(1, 1, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="4-D"):
        mask_to_block_table(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="S must be positive"):
        dense_block_table(1, 1, 0, 16, 16)
