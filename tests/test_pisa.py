"""PISA compensation and the early stop in the block-sparse kernel (dit_accel.kernels.pisa): the Triton kernel
under TRITON_INTERPRET=1 against the PyTorch reference, the reference against dense attention and the separate
compensation pass, the config's modes and the wiring in sparse_self_attention. Shapes are tiny (interpreter)."""

import os

# Before Triton is imported (see tests/test_kernels_block_sparse.py, which this module mirrors).
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dit_accel.attention import AttentionConfig  # noqa: E402
from dit_accel.attention.compensate import compensate as separate_pass  # noqa: E402
from dit_accel.attention.select import pooled_scores  # noqa: E402
from dit_accel.attention.sparse import SparseRequest, sparse_self_attention  # noqa: E402
from dit_accel.attention.synthetic import structured_qkv  # noqa: E402
from dit_accel.config import PolicyError  # noqa: E402
from dit_accel.kernels import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    block_table_to_mask,
    dense_block_table,
    mask_to_block_table,
)
from dit_accel.kernels import block_sparse as bsa_module  # noqa: E402
from dit_accel.kernels.block_sparse import score_sorted_block_table  # noqa: E402
from dit_accel.kernels.pisa import block_summaries, pisa_attention, pisa_attention_reference, walked_pairs  # noqa: E402
from helpers import fresh_process_only, interpreter_gate, qkv, run_in_fresh_process  # noqa: E402


INTERPRETER_READY, requires_triton, _interpreter = interpreter_gate(_PREVIOUS_INTERPRET)

MODES = ("none", "centroid", "pisa")


def random_table(B, H, S, bm, bn, density=0.4, seed=0, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    nq, nk = math.ceil(S / bm), math.ceil(S / bn)
    mask = torch.rand(B, H, nq, nk, generator=g) < density
    mask[..., 0, 0] = True
    if empty_row:
        mask[0, 0, -1] = False   # a q-block that lists nothing: compensation alone
    return mask, *mask_to_block_table(mask)


def kernel(*args, **kwargs):
    assert bsa_module._use_triton(args[0])
    return pisa_attention(*args, **kwargs)


# ----------------------------------------------------------------------------- kernel == reference


@requires_triton
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("S,bm,bn", [(70, 16, 16), (90, 32, 32), (75, 16, 32)])
def test_kernel_matches_reference(mode, S, bm, bn):
    """Ragged S (partial last blocks), odd kv-block counts (5, 3 blocks), sub-tiles (bn 32 = 2 tiles of 16),
    several programs per table row (bm 32) and a row without listed blocks."""
    q, k, v = qkv(1, 2, S, 16, seed=1)
    _, idx, cnt = random_table(1, 2, S, bm, bn, empty_row=True)
    out, lse = kernel(q, k, v, idx, cnt, block_m=bm, block_n=bn, compensate=mode, return_lse=True)
    ref, ref_lse = pisa_attention_reference(q, k, v, idx, cnt, block_m=bm, block_n=bn, compensate=mode,
                                            return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


@requires_triton
def test_kernel_matches_reference_bf16():
    q, k, v = qkv(1, 2, 70, 32, dtype=torch.bfloat16, seed=2)
    _, idx, cnt = random_table(1, 2, 70, 16, 16, seed=2)
    out = kernel(q, k, v, idx, cnt, block_m=16, block_n=16, compensate="pisa")
    ref = pisa_attention_reference(q.float(), k.float(), v.float(), idx, cnt, block_m=16, block_n=16,
                                   compensate="pisa")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


@requires_triton
def test_transposed_inputs():
    """diffusers' [B, S, H, D] memory viewed as [B, H, S, D] (no copy), S a multiple of the block."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(1, 2, 64, 16, seed=10))
    assert not q.is_contiguous()
    _, idx, cnt = random_table(1, 2, 64, 16, 16, seed=10)
    out = kernel(q, k, v, idx, cnt, block_m=16, block_n=16, compensate="pisa")
    ref = pisa_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), idx, cnt, block_m=16,
                                   block_n=16, compensate="pisa")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pisa_attention_reference(q, k, v, idx, cnt, block_m=16, block_n=16,
                                                        compensate="pisa"), ref, rtol=1e-5, atol=1e-5)


@requires_triton
def test_no_compensation_is_the_plain_kernel_bitwise():
    q, k, v = qkv(1, 2, 70, 16, seed=3)
    _, idx, cnt = random_table(1, 2, 70, 16, 16, seed=3)
    plain = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
    assert torch.equal(kernel(q, k, v, idx, cnt, block_m=16, block_n=16, compensate="none"), plain)
    assert torch.equal(kernel(q, k, v, idx, cnt, block_m=16, block_n=16, compensate="none", early_stop=0), plain)


@requires_triton
@pytest.mark.parametrize("mode", ("none", "pisa"))
def test_kernel_early_stop_matches_reference(mode):
    q, k, v = structured_qkv((2, 6, 6), heads=2, head_dim=16, sharpness=8.0, seed=4)   # S = 72: ragged
    S, bs = q.shape[2], 16
    nk = math.ceil(S / bs)
    full = torch.ones(1, 2, nk, nk, dtype=torch.bool)
    idx, cnt = score_sorted_block_table(full, pooled_scores(q, k, bs, 16 ** -0.5))
    out, walked = kernel(q, k, v, idx, cnt, block_m=bs, block_n=bs, compensate=mode, early_stop=0.05,
                         return_walked=True)
    ref, ref_walked = pisa_attention_reference(q, k, v, idx, cnt, block_m=bs, block_n=bs, compensate=mode,
                                               early_stop=0.05, return_walked=True)
    assert torch.equal(walked, ref_walked)
    assert int(walked.sum()) < int(cnt.sum())            # it did stop early somewhere
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- reference maths


@pytest.mark.parametrize("mode", MODES)
def test_all_blocks_listed_is_dense(mode):
    q, k, v = qkv(2, 2, 50, 16, seed=5)
    idx, cnt = dense_block_table(2, 2, 50, 16, 16)
    out, lse = pisa_attention_reference(q, k, v, idx, cnt, block_m=16, block_n=16, compensate=mode, return_lse=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp((q @ k.transpose(-1, -2)) / 4.0, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ("centroid", "pisa"))
def test_fused_maths_equals_the_separate_pass(mode):
    """The reference's fused form == the block-sparse reference followed by the separate PyTorch pass."""
    q, k, v = qkv(1, 2, 70, 16, seed=6)
    mask, idx, cnt = random_table(1, 2, 70, 16, 16, seed=6, empty_row=True)
    out, lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_m=16, block_n=16, return_lse=True)
    sep, sep_lse = separate_pass(out, lse, q, k, v, mask, 16, 0.25, first_order=mode == "pisa")
    fused, fused_lse = pisa_attention_reference(q, k, v, idx, cnt, block_m=16, block_n=16, compensate=mode,
                                                return_lse=True)
    torch.testing.assert_close(fused, sep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_lse, sep_lse, rtol=1e-5, atol=1e-5)


def test_first_order_term_is_the_papers_shared_matrix():
    """(s / S) sum_j sum_{i in j} (k_i - kmean_j)^T v_i, computed here the long way."""
    _, k, v = qkv(1, 2, 40, 16, seed=7)
    kmean, vmean, hsum = block_summaries(k, v, 16, 0.25, True)
    expected = torch.zeros(1, 2, 16, 16)
    for j, start in enumerate(range(0, 40, 16)):
        kj, vj = k[:, :, start:start + 16], v[:, :, start:start + 16]
        torch.testing.assert_close(kmean[:, :, j], kj.mean(2))
        torch.testing.assert_close(vmean[:, :, j], vj.mean(2))
        expected += (kj - kj.mean(2, keepdim=True)).transpose(-1, -2) @ vj
    torch.testing.assert_close(hsum, expected * 0.25 / 40, rtol=1e-5, atol=1e-6)


def test_first_order_beats_zeroth_order_on_smooth_keys():
    """Keys = block mean + small noise, values linear in the keys (every block's keys and values co-vary
    alike, the regime PISA's shared first-order term assumes): the error falls none > centroid > pisa."""
    g = torch.Generator().manual_seed(8)
    B, H, S, D, bs = 1, 2, 128, 16, 16
    centres = torch.randn(B, H, S // bs, 1, D, generator=g) * 0.5
    k = (centres + 0.15 * torch.randn(B, H, S // bs, bs, D, generator=g)).view(B, H, S, D)
    a = torch.randn(D, D, generator=g)
    v = k @ a + 0.1 * torch.randn(B, H, S, D, generator=g)
    q = 2.0 * torch.randn(B, H, S, D, generator=g)
    dense = F.scaled_dot_product_attention(q, k, v)
    _, idx, cnt = random_table(B, H, S, bs, bs, density=0.25, seed=8)
    err = {m: float((pisa_attention_reference(q, k, v, idx, cnt, block_m=bs, block_n=bs, compensate=m) - dense).norm()
                    / dense.norm()) for m in MODES}
    assert err["pisa"] < err["centroid"] < err["none"], err
    assert err["pisa"] < 0.7 * err["centroid"], err   # measured: about half


# ----------------------------------------------------------------------------- early stop


def test_sorted_table_orders_by_score():
    mask = torch.tensor([[[[True, False, True, True], [True, True, False, False]]]])
    scores = torch.tensor([[[[0.1, 0.9, 0.5, 0.3], [0.2, 0.2, 0.6, 0.0]]]])
    idx, cnt = score_sorted_block_table(mask, scores)
    assert cnt.tolist() == [[[3, 2]]]
    assert idx[0, 0, 0].tolist() == [2, 3, 0] and idx[0, 0, 1, :2].tolist() == [0, 1]   # tie: index order
    assert torch.equal(block_table_to_mask(idx, cnt, 4), mask)
    with pytest.raises(ValueError, match="scores"):
        score_sorted_block_table(mask, scores[..., :3])


def test_early_stop_off_is_exact():
    q, k, v = qkv(1, 2, 70, 16, seed=9)
    _, idx, cnt = random_table(1, 2, 70, 16, 16, seed=9)
    base = pisa_attention_reference(q, k, v, idx, cnt, block_m=16, block_n=16, compensate="pisa")
    for off in (None, 0, 0.0):
        out, walked = pisa_attention_reference(q, k, v, idx, cnt, block_m=16, block_n=16, compensate="pisa",
                                               early_stop=off, return_walked=True)
        assert torch.equal(out, base) and torch.equal(walked, cnt)


def test_early_stop_drops_pairs_within_the_rule_bound():
    """Structured heads, every block listed by pooled score: the walk computes fewer pairs as the bound grows,
    and each row's dropped mass obeys the rule: dropped <= early_stop * kept * rho, rho = the heaviest dropped
    block over the block the walk stopped at (1 when the row's order is its true order)."""
    q, k, v = structured_qkv((4, 8, 8), heads=3, head_dim=32, seed=1)
    B, H, S, D = q.shape
    bs, nk = 16, S // 16
    scale = D ** -0.5
    idx, cnt = score_sorted_block_table(torch.ones(B, H, nk, nk, dtype=torch.bool), pooled_scores(q, k, bs, scale))
    dense = F.scaled_dot_product_attention(q, k, v)
    block_mass = torch.exp((q @ k.transpose(-1, -2)) * scale).view(B, H, S, nk, bs).sum(-1)        # [B, H, S, nk]
    rows_q = torch.arange(S) // bs
    in_order = block_mass.gather(-1, idx[:, :, rows_q].long())                                     # table order
    pairs = []
    for eps in (0.001, 0.01, 0.05):
        out, walked = pisa_attention_reference(q, k, v, idx, cnt, block_m=bs, block_n=bs, compensate="none",
                                               early_stop=eps, return_walked=True)
        pairs.append(float(walked_pairs(idx, walked, S, bs, bs)))
        w = walked[:, :, rows_q].long().unsqueeze(-1)                                               # [B, H, S, 1]
        pos = torch.arange(nk)
        kept = (in_order * (pos < w)).sum(-1)
        dropped = (in_order * (pos >= w)).sum(-1)
        stop_block = in_order.gather(-1, (w - 1).clamp(min=0)).squeeze(-1)
        rho = ((in_order * (pos >= w)).max(-1).values / stop_block).clamp(min=1.0)
        assert bool((dropped <= eps * kept * rho * (1 + 1e-4) + 1e-30).all())
        # the output error is the dropped share times the distance of the dropped values' mean from the output
        share = dropped / (kept + dropped)
        err = (out - dense).norm(dim=-1)
        assert bool((err <= 2 * share * v.norm(dim=-1).max() + 1e-5).all())
    full = float(B * H * S * S)
    assert full > pairs[0] > pairs[1] > pairs[2]


def test_early_stop_in_sparse_self_attention_counts_the_walked_pairs():
    q, k, v = structured_qkv((4, 8, 8), heads=2, head_dim=32, seed=2)
    dense = F.scaled_dot_product_attention(q, k, v)
    common = {"block_size": 16, "warmup_steps": 0}
    full = sparse_self_attention(q, k, v, SparseRequest(AttentionConfig.from_dict(
        {**common, "sparse": {"method": "topp", "top_p": 0.99}})))
    stopped = sparse_self_attention(q, k, v, SparseRequest(AttentionConfig.from_dict(
        {**common, "sparse": {"method": "topp", "top_p": 0.99, "early_stop": 0.01}})))
    assert torch.equal(stopped.block_mask, full.block_mask)
    assert float(stopped.kept) < float(full.kept)
    err = float((stopped.out - dense).norm() / dense.norm())
    assert err < float((full.out - dense).norm() / dense.norm()) + 0.05


# ----------------------------------------------------------------------------- config and wiring


def test_config_modes_and_back_compat():
    assert AttentionConfig.from_dict({"compensate": True}).compensate == "centroid"
    assert AttentionConfig.from_dict({"compensate": False}).compensate == "none"
    cfg = AttentionConfig.from_dict({"compensate": "pisa", "sparse": {"early_stop": 0.02}})
    assert cfg.to_dict()["compensate"] == "pisa" and cfg.sparse.early_stop == 0.02
    assert AttentionConfig.from_dict(cfg.to_dict()) == cfg
    assert AttentionConfig().compensate == "none" and AttentionConfig().sparse.early_stop is None
    for bad, field in (({"compensate": "taylor"}, "attention.compensate"), ({"compensate": 2}, "attention.compensate"),
                       ({"sparse": {"early_stop": -0.1}}, "attention.sparse.early_stop"),
                       ({"sparse": {"early_stop": 1.5}}, "attention.sparse.early_stop"),
                       ({"sparse": {"early_stop": 0.1}, "quant": "int8"}, "attention.sparse.early_stop")):
        with pytest.raises(PolicyError, match=field.replace(".", r"\.")):
            AttentionConfig.from_dict(bad)


def test_bad_kernel_options_raise():
    q, k, v = qkv(1, 1, 32, 16)
    idx, cnt = dense_block_table(1, 1, 32, 16, 16)
    for fn in (pisa_attention, pisa_attention_reference):
        with pytest.raises(ValueError, match="compensate"):
            fn(q, k, v, idx, cnt, block_m=16, block_n=16, compensate="taylor")
        with pytest.raises(ValueError, match="early_stop"):
            fn(q, k, v, idx, cnt, block_m=16, block_n=16, early_stop=-1.0)
    q, k, v = qkv(1, 1, 300, 16)
    idx, cnt = dense_block_table(1, 1, 300, 256, 16)
    with pytest.raises(ValueError, match="block_m"):
        pisa_attention_reference(q, k, v, idx, cnt, block_m=256, block_n=16, early_stop=0.1)


@pytest.mark.parametrize("mode", ("centroid", "pisa"))
def test_sparse_self_attention_uses_the_fused_maths(mode):
    """The CPU path of sparse_self_attention: the selection's table through pisa_attention_reference, equal to
    the plain kernel followed by the separate pass (what compensate: true computed before)."""
    q, k, v = structured_qkv((4, 8, 8), heads=2, head_dim=32, sharpness=4.0, seed=3)
    cfg = AttentionConfig.from_dict({"sparse": {"method": "topp", "density": 0.25}, "compensate": mode,
                                     "block_size": 16})
    result = sparse_self_attention(q, k, v, SparseRequest(cfg))
    plain = sparse_self_attention(q, k, v, SparseRequest(cfg.replace(compensate="none")))
    sep, _ = separate_pass(plain.out, plain.lse, q, k, v, plain.block_mask, 16, 32 ** -0.5,
                           first_order=mode == "pisa")
    torch.testing.assert_close(result.out, sep, rtol=1e-5, atol=1e-5)
    assert float(result.kept) == float(plain.kept)


@pytest.mark.parametrize("path", ["reference", pytest.param("interpreter", marks=requires_triton)])
@pytest.mark.parametrize("mode,early_stop,dtype", [(2, 0.0, torch.float32), (1, 0.05, torch.bfloat16),
                                                   (0, 0.05, torch.float32)])
def test_opcheck_and_compile(path, mode, early_stop, dtype, monkeypatch):
    """The custom op: schema, fake tensors and AOT dispatch (opcheck), and a fullgraph compile of the wrapper."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "interpreter" else "0")
    q, k, v = (t.to(dtype) for t in qkv(1, 2, 40, 16, seed=11))
    _, idx, cnt = random_table(1, 2, 40, 16, 16, seed=11)
    assert bsa_module._use_triton(q) == (path == "interpreter")
    torch.library.opcheck(torch.ops.dit_accel.pisa_attention.default,
                          (q, k, v, idx, cnt, 16, 16, 0.25, mode, early_stop, True))
    compensate = ("none", "centroid", "pisa")[mode]

    def fn(q, k, v, idx, cnt):
        return pisa_attention(q, k, v, idx, cnt, block_m=16, block_n=16, compensate=compensate,
                              early_stop=early_stop or None, return_lse=True)

    torch._dynamo.reset()
    eager = fn(q, k, v, idx, cnt)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, idx, cnt)
    torch._dynamo.reset()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@fresh_process_only(INTERPRETER_READY)
def test_kernel_tests_in_fresh_process():
    run_in_fresh_process(__file__, "-k", "not fresh_process")
