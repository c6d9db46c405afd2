"""PSA (pyramid sparse attention): the Triton kernel (under TRITON_INTERPRET=1 on CPU) against its PyTorch
reference, the reference against block-sparse / dense attention, the pooled-level logit offset, level
assignment, config errors and the ``sparse_self_attention`` wiring. Shapes are tiny (the interpreter is slow)."""

import os

# Before Triton is imported (see tests/test_kernels_block_sparse.py); restored right after the imports. Not in
# the CUDA test's child process, which runs the kernel compiled (test_cuda_kernel_matches_reference).
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
_COMPILED = os.environ.get("DIT_ACCEL_TEST_COMPILED_TRITON") == "1"
if not _COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dit_accel.attention.config import AttentionConfig, PSAConfig  # noqa: E402
from dit_accel.attention.pyramid import assign_levels  # noqa: E402
from dit_accel.attention.sparse import SparseRequest, sparse_self_attention  # noqa: E402
from dit_accel.attention.synthetic import structured_qkv  # noqa: E402
from dit_accel.config import PolicyError  # noqa: E402
from dit_accel.kernels import block_sparse_attention_reference, mask_to_block_table, triton_available  # noqa: E402
from dit_accel.kernels import pyramid as pyr  # noqa: E402
from dit_accel.kernels.pyramid import (pool_kv, pyramid_attention, pyramid_attention_reference,  # noqa: E402
                                       pyramid_pair_counts, pyramid_table, pyramid_table_to_levels)
from helpers import compile_ahead_of_time, fresh_process_only, interpreter_gate, qkv, run_in_fresh_process  # noqa: E402


INTERPRETER_READY, requires_triton, _interpreter = interpreter_gate(_PREVIOUS_INTERPRET, interpret=not _COMPILED)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def kernel(*args, **kwargs):
    """The Triton path (interpreted on CPU)."""
    assert pyr._use_triton(args[0])
    return pyramid_attention(*args, **kwargs)


def random_levels(B, H, S, bm, bn, seed=0, skip=0.3):
    """A random level map: each block skipped with probability ``skip``, else a uniform level 0..3."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = math.ceil(S / bm), math.ceil(S / bn)
    levels = torch.randint(0, 4, (B, H, nq, nk), generator=g)
    return torch.where(torch.rand(B, H, nq, nk, generator=g) < skip, -1, levels).to(torch.int8)


# ----------------------------------------------------------------------------- pooling and tables


def test_pool_kv_means_real_tokens_only():
    x = torch.arange(11.0).view(1, 1, 11, 1).expand(1, 1, 11, 16).contiguous()
    levels = pool_kv(x)
    assert [t.shape[2] for t in levels] == [11, 6, 3, 2]
    assert levels[0] is x
    assert levels[1][0, 0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5, 8.5, 10.0]   # last group: token 10 alone
    assert levels[2][0, 0, :, 0].tolist() == [1.5, 5.5, 9.0]                   # last group: tokens 8..10
    assert levels[3][0, 0, :, 0].tolist() == [3.5, 9.0]
    assert all(t.is_contiguous() for t in levels[1:])


def test_pyramid_table_roundtrip_and_order():
    levels = random_levels(2, 3, 100, 16, 32, seed=1)
    idx, lvl, cnt = pyramid_table(levels)
    assert idx.dtype == lvl.dtype == cnt.dtype == torch.int32
    assert torch.equal(cnt, (levels >= 0).sum(-1).int())
    assert torch.equal(pyramid_table_to_levels(idx, lvl, cnt, levels.shape[-1]), levels)
    for b, h, r in [(0, 0, 0), (1, 2, 5)]:
        n = int(cnt[b, h, r])
        got = list(zip(lvl[b, h, r, :n].tolist(), idx[b, h, r, :n].tolist()))
        assert got == sorted(got)          # grouped by level, ascending block within a level
    wide = pyramid_table(levels, max_entries=levels.shape[-1])
    assert wide[0].shape[-1] == levels.shape[-1]
    assert torch.equal(pyramid_table_to_levels(*wide, levels.shape[-1]), levels)


def test_pair_counts_weight_pooled_keys():
    S, bs = 100, 32                        # 4 blocks, the last holds 4 tokens
    levels = torch.full((1, 1, 4, 4), -1, dtype=torch.int8)
    levels[0, 0, 0] = torch.tensor([3, 2, 1, 0])   # 4 + 8 + 16 pooled keys, then the 4 real keys of block 3
    levels[0, 0, 3, 3] = 3                 # partial q-block (4 rows) x partial kv-block at 8x: 1 pooled key
    expected = 32 * (4 + 8 + 16 + 4) + 4 * 1
    assert float(pyramid_pair_counts(levels, S, bs, bs)) == expected


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("S,bm,bn,D", [(64, 16, 16, 16), (77, 32, 16, 32), (100, 16, 32, 16)])
def test_reference_level0_matches_block_sparse(S, bm, bn, D):
    q, k, v = qkv(1, 2, S, D, seed=S)
    levels = random_levels(1, 2, S, bm, bn, seed=S)
    levels = torch.where(levels >= 0, 0, -1).to(torch.int8)
    out, lse = pyramid_attention_reference(q, k, v, *pyramid_table(levels), block_m=bm, block_n=bn, return_lse=True)
    idx, cnt = mask_to_block_table(levels >= 0)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_m=bm, block_n=bn, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])
    full = torch.zeros_like(levels)
    dense = pyramid_attention_reference(q, k, v, *pyramid_table(full), block_m=bm, block_n=bn)
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v), **TOL[torch.float32])


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("S", [64, 61])
def test_constant_key_block_pooled_equals_full(level, S):
    """Keys constant inside each kv-block, values arbitrary: a pooled block gives the same attention as full
    resolution (each pooled key stands for its count of equal keys, the partial last group included)."""
    bs, D = 16, 16
    q, k, v = qkv(1, 2, S, D, seed=level)
    nk = math.ceil(S / bs)
    k = k[:, :, ::bs][:, :, :nk].repeat_interleave(bs, 2)[:, :, :S].contiguous()
    levels = random_levels(1, 2, S, bs, bs, seed=level, skip=0.2)
    full = torch.where(levels >= 0, 0, -1).to(torch.int8)
    pooled = torch.where(levels >= 0, level, -1).to(torch.int8)
    out_full, lse_full = pyramid_attention_reference(q, k, v, *pyramid_table(full), block_m=bs, block_n=bs,
                                                     return_lse=True)
    out_pool, lse_pool = pyramid_attention_reference(q, k, v, *pyramid_table(pooled), block_m=bs, block_n=bs,
                                                     return_lse=True)
    torch.testing.assert_close(out_pool, out_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_pool, lse_full, rtol=1e-5, atol=1e-5)
    if INTERPRETER_READY:
        out_k, lse_k = kernel(q, k, v, *pyramid_table(pooled), block_m=bs, block_n=bs, return_lse=True)
        torch.testing.assert_close(out_k, out_full, **TOL[torch.float32])
        torch.testing.assert_close(lse_k, lse_full, **TOL[torch.float32])


def test_pooled_levels_change_the_output():
    """Pooling is not a no-op on ordinary keys (the test above would pass if levels were ignored)."""
    q, k, v = qkv(1, 1, 64, 16)
    full = torch.zeros(1, 1, 4, 4, dtype=torch.int8)
    out0 = pyramid_attention_reference(q, k, v, *pyramid_table(full), block_m=16, block_n=16)
    out2 = pyramid_attention_reference(q, k, v, *pyramid_table(full + 2), block_m=16, block_n=16)
    assert (out0 - out2).abs().max() > 1e-2


# ----------------------------------------------------------------------------- kernel == reference


@requires_triton
@pytest.mark.parametrize("S,bm,bn,D", [(64, 16, 16, 16), (77, 32, 32, 16), (100, 16, 64, 32), (96, 32, 32, 32)])
def test_kernel_matches_reference_mixed_levels(S, bm, bn, D):
    q, k, v = qkv(1, 2, S, D, seed=S + bn)
    levels = random_levels(1, 2, S, bm, bn, seed=bm * bn)
    levels[0, 0, 0] = -1                   # an empty row: zeros, lse -inf
    table = pyramid_table(levels)
    out, lse = kernel(q, k, v, *table, block_m=bm, block_n=bn, return_lse=True)
    ref, ref_lse = pyramid_attention_reference(q, k, v, *table, block_m=bm, block_n=bn, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])
    assert (out[0, 0, :bm] == 0).all() and torch.isneginf(lse[0, 0, :bm]).all()


@requires_triton
def test_kernel_bf16_strided_kv():
    """bfloat16, and K/V as transposed views ([B, S, H, D] memory) at level 0."""
    S, bs, D = 77, 32, 32
    q, k, v = qkv(1, 2, S, D, torch.bfloat16, seed=3)
    k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    levels = random_levels(1, 2, S, bs, bs, seed=4, skip=0.1)
    table = pyramid_table(levels)
    out = kernel(q, k_t, v_t, *table, block_m=bs, block_n=bs)
    ref = pyramid_attention_reference(q, k, v, *table, block_m=bs, block_n=bs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])


@fresh_process_only(INTERPRETER_READY)
def test_kernel_tests_in_fresh_process():
    """Where triton was imported before TRITON_INTERPRET=1, run this module's kernel tests in a fresh process."""
    run_in_fresh_process(__file__, "-k", "kernel and not fresh", check_covered=False)


_AOT_SCRIPT = """
from dit_accel.kernels._pyramid_triton import aot_compile
for table, tile, even in ((128, (128, 128, 8, 3), False), (64, (64, 64, 4, 2), False)):
    k = aot_compile(table_block=table, block_m=tile[0], block_n=tile[1], num_warps=tile[2], num_stages=tile[3],
                    even=even)
    print("RESULT", k.asm["ttgir"].count("warp_group_dot"), k.metadata.shared)
"""


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_kernel_compiles_for_hopper_without_gpu():
    """The compiled path (sm_90, no GPU needed): the largest autotune tile with tail masking at table block 128,
    and table block 64, whose 8x level gathers two entries per tile; wgmma, within shared memory."""
    stdout = compile_ahead_of_time(_AOT_SCRIPT, skip_on=("ImportError",))
    for line in stdout.split("RESULT")[1:]:
        wgmma, shared = (int(x) for x in line.split())
        assert wgmma > 0 and shared <= 227 * 1024


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    if not _COMPILED:  # this process may have triton in interpreter mode: run the test where it is compiled
        env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
        env["DIT_ACCEL_TEST_COMPILED_TRITON"] = "1"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "cuda_kernel"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-8000:] + proc.stderr[-4000:]
        return
    S, bs, D = 1000, 64, 64
    q, k, v = (t.cuda() for t in qkv(1, 2, S, D, torch.bfloat16, seed=5))
    levels = random_levels(1, 2, S, bs, bs, seed=6).cuda()
    table = pyramid_table(levels)
    out, lse = pyramid_attention(q, k, v, *table, block_m=bs, block_n=bs, return_lse=True, validate=True)
    ref, ref_lse = pyramid_attention_reference(q, k, v, *table, block_m=bs, block_n=bs, return_lse=True)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.bfloat16])


# ----------------------------------------------------------------------------- validation


def test_bad_tables_are_refused():
    q, k, v = qkv(1, 1, 64, 16)
    levels = torch.zeros(1, 1, 4, 4, dtype=torch.int8)
    idx, lvl, cnt = pyramid_table(levels)
    call = lambda i, lv, c: pyramid_attention_reference(q, k, v, i, lv, c, block_m=16, block_n=16)  # noqa: E731
    with pytest.raises(ValueError, match="kv_levels must lie"):
        call(idx, lvl + 4, cnt)
    bad = lvl.clone()
    bad[0, 0, 0, 0] = 2                    # level 2 before level 0 in the same row
    with pytest.raises(ValueError, match="non-decreasing level"):
        call(idx, bad, cnt)
    dup = idx.clone()
    dup[0, 0, 0, 1] = dup[0, 0, 0, 0]
    with pytest.raises(ValueError, match="listed twice"):
        call(dup, lvl, cnt)
    with pytest.raises(ValueError, match="kv_levels must be int32"):
        call(idx, lvl.long(), cnt)
    with pytest.raises(ValueError, match="kv_levels must have kv_indices' shape"):
        call(idx, lvl[..., :2].contiguous(), cnt)
    with pytest.raises(ValueError, match="block_n"):
        pyramid_attention_reference(q, k, v, idx, lvl, cnt, block_m=16, block_n=24)


# ----------------------------------------------------------------------------- level assignment


def test_assign_levels_quota():
    scores = torch.softmax(torch.randn(1, 2, 3, 20, generator=torch.Generator().manual_seed(0)), -1)
    psa = PSAConfig(mode="quota", full=0.1, pool2=0.2, pool4=0.2, pool8=0.5, min_full=0.0)
    levels = assign_levels(scores, psa)
    counts = [(levels == lv).sum(-1) for lv in (0, 1, 2, 3, -1)]
    assert [int(c.unique().item()) for c in counts] == [2, 2, 0, 6, 10]
    ranked = torch.argsort(scores, -1, descending=True)
    assert (torch.gather(levels, -1, ranked[..., :2]) == 0).all()      # the best blocks are full
    assert (torch.gather(levels, -1, ranked[..., 10:]) == -1).all()    # the worst are skipped
    always = torch.zeros(1, 1, 3, 20, dtype=torch.bool)
    always[..., 19] = True
    assert (assign_levels(scores, psa, always)[..., 19] == 0).all()


def test_assign_levels_threshold():
    scores = torch.tensor([[[[0.5, 0.03125, 0.25, 0.125, 0.09375]]]])   # ranked: 0, 2, 3, 4, 1 (exact in binary)
    psa = PSAConfig(mode="threshold", full=0.5, pool2=0.75, pool4=0.875, pool8=0.96875, min_full=0.0)
    # mass of the better blocks: 0, 0.5, 0.75, 0.875, 0.96875 -> full, 2x (0.5 < 0.75), 4x, 8x, skipped
    assert assign_levels(scores, psa).tolist() == [[[[0, -1, 1, 2, 3]]]]
    psa_min = PSAConfig(mode="threshold", full=0.1, pool2=0.1, pool4=0.1, pool8=0.1, min_full=0.4)
    assert assign_levels(scores, psa_min).tolist() == [[[[0, -1, 0, -1, -1]]]]  # ceil(0.4 * 5) = 2 full


# ----------------------------------------------------------------------------- config


def test_psa_config_round_trip_and_errors():
    cfg = AttentionConfig.from_dict({"sparse": {"method": "psa"},
                                     "psa": {"mode": "quota", "full": 0.1, "pool2": 0.15, "pool4": 0.15,
                                             "pool8": 0.35, "scorer": "pooled"}})
    assert cfg.psa.mode == "quota" and cfg.psa.pool8 == 0.35
    assert AttentionConfig.from_dict(cfg.to_dict()) == cfg
    assert AttentionConfig().psa == PSAConfig()
    with pytest.raises(PolicyError, match="must not decrease"):
        AttentionConfig.from_dict({"psa": {"full": 0.5, "pool2": 0.4}})
    with pytest.raises(PolicyError, match="attention.psa.mode"):
        AttentionConfig.from_dict({"psa": {"mode": "topk"}})
    with pytest.raises(PolicyError, match="attention.psa.pool8"):
        AttentionConfig.from_dict({"psa": {"pool8": 1.5}})
    with pytest.raises(PolicyError, match="attention.psa"):
        AttentionConfig.from_dict({"psa": {"levels": 3}})
    with pytest.raises(PolicyError, match="attention.sparse.density"):
        AttentionConfig.from_dict({"sparse": {"method": "psa", "density": 0.2}})
    with pytest.raises(PolicyError, match="attention.quant"):
        AttentionConfig.from_dict({"sparse": {"method": "psa"}, "quant": "int8"})


# ----------------------------------------------------------------------------- sparse_self_attention


def _psa_config(**psa):
    return AttentionConfig.from_dict({"sparse": {"method": "psa"}, "block_size": 16, "psa": psa})


def _dense(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


@pytest.mark.parametrize("reorder", ["none", "svg2"])
def test_sparse_self_attention_all_full_is_dense(reorder):
    q, k, v = structured_qkv((2, 6, 6), heads=2, head_dim=16, seed=0)
    cfg = _psa_config(mode="quota", full=1.0, pool2=1.0, pool4=1.0, pool8=1.0).replace(
        reorder=reorder, svg2={"q_clusters": 4, "k_clusters": 4})
    result = sparse_self_attention(q, k, v, SparseRequest(cfg))
    torch.testing.assert_close(result.out, _dense(q, k, v), rtol=1e-4, atol=1e-4)
    assert float(result.kept) == result.total and result.block_mask.all()


@pytest.mark.parametrize("reorder", ["none", "paro", "svg2"])
def test_sparse_self_attention_psa_levels(reorder):
    """Mixed levels: the output is the pyramid reference of the permuted tokens over the selection's levels,
    inverse-permuted; ``kept`` weights pooled keys; the block mask is "visited at any level"."""
    q, k, v = structured_qkv((2, 6, 6), heads=2, head_dim=16, seed=1)
    n, bs = q.shape[2], 16
    cfg = _psa_config(mode="quota", full=0.2, pool2=0.4, pool4=0.6, pool8=0.8, scorer="pooled").replace(
        reorder=reorder, svg2={"q_clusters": 4, "k_clusters": 4})
    head_perm = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(h)) for h in range(2)])
    request = SparseRequest(cfg, head_perm=head_perm if reorder == "paro" else None)
    result = sparse_self_attention(q, k, v, request)
    sel = request.selection
    levels = sel.levels
    assert set(levels.unique().tolist()) == {-1, 0, 1, 2, 3}
    assert torch.equal(result.block_mask, levels >= 0)
    assert float(result.kept) == float(pyramid_pair_counts(levels, n, bs, bs)) < result.total

    def gather(x, perm):
        return x if perm is None else torch.gather(x, 2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))

    qp, kp, vp = gather(q, sel.q_perm), gather(k, sel.k_perm), gather(v, sel.k_perm)
    out = pyramid_attention_reference(qp, kp, vp, *pyramid_table(levels), block_m=bs, block_n=bs)
    if sel.q_perm is not None:
        out = torch.empty_like(out).scatter_(2, sel.q_perm.unsqueeze(-1).expand_as(out), out)
    torch.testing.assert_close(result.out, out, rtol=1e-5, atol=1e-5)
    again = sparse_self_attention(q, k, v, request)        # reuses the selection (refresh_interval)
    assert request.selection is sel
    torch.testing.assert_close(again.out, result.out)


def test_psa_without_pooled_levels_is_top_p_at_that_density():
    """Quota mode with the pooled bounds equal to ``full`` and the pooled scorer selects exactly what top-p at
    ``density = full`` selects, so PSA's pooled levels are the only difference between the two methods."""
    q, k, v = structured_qkv((2, 8, 8), heads=3, head_dim=16, seed=2)
    psa = sparse_self_attention(q, k, v, SparseRequest(_psa_config(
        mode="quota", full=0.25, pool2=0.25, pool4=0.25, pool8=0.25, min_full=0.0, scorer="pooled")))
    topp = sparse_self_attention(q, k, v, SparseRequest(AttentionConfig.from_dict(
        {"sparse": {"method": "topp", "density": 0.25}, "block_size": 16})))
    assert torch.equal(psa.block_mask, topp.block_mask)
    assert float(psa.kept) == float(topp.kept)
    torch.testing.assert_close(psa.out, topp.out, rtol=1e-5, atol=1e-5)
