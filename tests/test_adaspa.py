"""AdaSpa: the block-mass kernel (Triton under TRITON_INTERPRET=1) against its PyTorch reference, the
recall selection, and the search / reuse cycle through ``sparse_self_attention``."""

import math

import pytest
import torch

from dit_accel.attention import adaspa
from dit_accel.attention.config import AttentionConfig
from dit_accel.attention.sparse import SparseRequest, sparse_self_attention
from dit_accel.attention.synthetic import structured_qkv
from dit_accel.config import PolicyError
from dit_accel.kernels import block_sparse as bsa_module
from dit_accel.kernels import block_sparse_attention_reference, mask_to_block_table
from dit_accel.kernels.block_mass import block_mass, block_mass_reference
from helpers import interpreter_ready, qkv

requires_interpreter = pytest.mark.skipif(not interpreter_ready(),
                                          reason="needs triton under TRITON_INTERPRET=1 on a CPU-only machine")


def true_lse(q, k, scale):
    return torch.logsumexp(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)


def dense(q, k, v):
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v.float()


def config(**sparse):
    return AttentionConfig.from_dict({"sparse": {"method": "adaspa", "refresh_interval": 4, **sparse},
                                      "block_size": 16})


# ----------------------------------------------------------------------------- kernel


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,bm,bn,D", [(64, 32, 32, 16), (77, 32, 16, 32), (50, 16, 32, 24)])
def test_kernel_matches_reference(S, bm, bn, D, dtype):
    q, k, _ = qkv(1, 2, S, D, dtype)
    scale = 0.7 / math.sqrt(D)
    lse = true_lse(q, k, scale)
    assert bsa_module._use_triton(q)
    out = block_mass(q, k, lse, block_m=bm, block_n=bn, sm_scale=scale)
    ref = block_mass_reference(q, k, lse, block_m=bm, block_n=bn, sm_scale=scale)
    assert out.shape == (1, 2, -(-S // bm), -(-S // bn)) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-4)


@pytest.mark.parametrize("S,bm,bn", [(64, 16, 16), (77, 32, 16)])
def test_masses_of_a_row_sum_to_one_with_the_true_lse(S, bm, bn):
    q, k, _ = qkv(2, 2, S, 16, seed=1)
    mass = block_mass_reference(q, k, true_lse(q, k, 0.25), block_m=bm, block_n=bn)
    rows = torch.full((mass.shape[2],), float(bm))
    rows[-1] = S - bm * (mass.shape[2] - 1)
    torch.testing.assert_close(mass.sum(-1), rows.expand(2, 2, -1), rtol=1e-5, atol=1e-5)
    # one q-block of single rows: the masses are the attention matrix summed over kv-blocks
    p = torch.softmax(q[:, :, :bm] @ k.transpose(-1, -2) * 0.25, -1)
    assert torch.allclose(mass[:, :, 0, 0], p[..., :bn].sum((-1, -2)), atol=1e-5)


@requires_interpreter
def test_kernel_rows_sum_to_one_and_empty_rows_add_nothing():
    q, k, _ = qkv(1, 1, 48, 16, seed=2)
    lse = true_lse(q, k, 0.25)
    lse[0, 0, :16] = float("-inf")  # a row a sparse pass left empty
    mass = block_mass(q, k, lse, block_m=16, block_n=16, sm_scale=0.25)
    torch.testing.assert_close(mass.sum(-1)[0, 0], torch.tensor([0.0, 16.0, 16.0]), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    q, k, _ = qkv(1, 1, 32, 16)
    with pytest.raises(ValueError, match="lse"):
        block_mass(q, k, torch.zeros(1, 1, 31))
    with pytest.raises(ValueError, match="block_m"):
        block_mass(q, k, torch.zeros(1, 1, 32), block_m=24)


# ----------------------------------------------------------------------------- selection


def test_select_by_recall_keeps_the_fewest_pairs_per_head():
    mass = torch.tensor([[0.5, 0.3], [0.15, 0.05]]).view(1, 1, 2, 2)
    keep = lambda r: adaspa.select_by_recall(mass, r).flatten().tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.8) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1.0) == [True] * 4
    # per head: a concentrated head keeps one pair, a flat one all four
    two = torch.stack([mass.view(2, 2), torch.full((2, 2), 0.25)]).unsqueeze(0)
    counts = adaspa.select_by_recall(two, 0.45).sum((-1, -2)).flatten().tolist()
    assert counts == [1, 2]
    eye = torch.eye(2, dtype=torch.bool)
    assert adaspa.select_by_recall(mass, 0.5, always=eye).flatten().tolist() == [True, False, False, True]
    assert adaspa.select_by_recall(two, 0.9, density=0.5).sum((-1, -2)).flatten().tolist() == [2, 2]


# ----------------------------------------------------------------------------- search and reuse


def test_search_step_is_dense_and_recall_one_keeps_every_block():
    q, k, v = structured_qkv((2, 4, 8), 3, 16)
    request = SparseRequest(config(recall=1.0))
    first = sparse_self_attention(q, k, v, request)
    torch.testing.assert_close(first.out, dense(q, k, v), rtol=1e-4, atol=1e-5)
    assert first.kept.item() == first.total and request.exact is None
    assert first.block_mask.all()
    second = sparse_self_attention(q, k, v, request)  # reuse: the sparse kernel with every block = dense
    torch.testing.assert_close(second.out, dense(q, k, v), rtol=1e-4, atol=1e-5)


def test_search_step_output_is_dense_at_any_recall():
    q, k, v = structured_qkv((2, 4, 8), 3, 16, seed=1)
    result = sparse_self_attention(q, k, v, SparseRequest(config(recall=0.6)))
    torch.testing.assert_close(result.out, dense(q, k, v), rtol=1e-4, atol=1e-5)
    assert not result.block_mask.all()
    assert torch.equal(torch.diagonal(result.block_mask, dim1=-2, dim2=-1),
                       torch.ones(1, 3, result.block_mask.shape[-1], dtype=torch.bool))  # self blocks


def test_mask_is_reused_between_search_steps(monkeypatch):
    q, k, v = structured_qkv((2, 4, 8), 3, 16, seed=2)
    request = SparseRequest(config(recall=0.9))
    first = sparse_self_attention(q, k, v, request)
    selection = request.selection
    mass = block_mass_reference(q, k, true_lse(q, k, 0.25), block_m=16, block_n=16)
    kept = (mass * selection.block_mask).sum((-1, -2)) / mass.sum((-1, -2))
    assert (kept >= 0.9 - 1e-5).all()                     # each head reaches its recall
    monkeypatch.setattr(adaspa, "search", lambda *a, **k: pytest.fail("searched on a reuse step"))
    q2, k2, v2 = structured_qkv((2, 4, 8), 3, 16, seed=3)  # the next step's tokens
    second = sparse_self_attention(q2, k2, v2, request)
    assert request.selection is selection and torch.equal(second.block_mask, first.block_mask)
    expected = block_sparse_attention_reference(q2, k2, v2, *mask_to_block_table(selection.block_mask),
                                                block_m=16, block_n=16)
    torch.testing.assert_close(second.out, expected, rtol=1e-4, atol=1e-5)
    assert second.kept.item() < second.total


def test_reordered_search_returns_input_order():
    q, k, v = structured_qkv((2, 4, 8), 2, 16, seed=4)
    cfg = AttentionConfig.from_dict({"sparse": {"method": "adaspa", "refresh_interval": 2, "recall": 1.0},
                                     "reorder": "pbs", "block_size": 16})
    request = SparseRequest(cfg)
    for _ in range(2):  # search (dense), then the reused mask with every block
        torch.testing.assert_close(sparse_self_attention(q, k, v, request).out, dense(q, k, v), rtol=1e-4,
                                   atol=1e-5)


def test_config_errors():
    with pytest.raises(PolicyError, match="refresh_interval"):
        AttentionConfig.from_dict({"sparse": {"method": "adaspa"}})
    with pytest.raises(PolicyError, match="recall"):
        config(recall=0.0)
    with pytest.raises(PolicyError, match="recall"):
        config(recall=1.5)
    assert config().sparse.recall == 0.95


def test_pipeline_searches_every_refresh_interval():
    """A tiny Wan pipeline, 4 steps, the first dense: sparse steps 1, 2, 3 with refresh_interval 2 -> searches
    (dense, exact) at steps 1 and 3 of each layer and branch, the mask reused at step 2; at recall 1 the mask
    keeps every block, so the whole generation matches the baseline."""
    import dit_accel
    from dit_accel.testing import tiny_generate, tiny_pipeline

    pipe = tiny_pipeline("wan")
    size = dict(height=64, width=64, num_frames=9)
    base = tiny_generate(pipe, "wan", **size)
    outs, stats = {}, {}
    for recall in (1.0, 0.5):
        policy = {"name": "adaspa", "attention": {"sparse": {"method": "adaspa", "recall": recall,
                                                             "refresh_interval": 2},
                                                  "block_size": 16, "warmup_steps": 1}}
        with dit_accel.accelerated(pipe, policy):
            outs[recall] = tiny_generate(pipe, "wan", **size)
            stats[recall] = dit_accel.stats(pipe).extra["attention"]
    sparse = stats[1.0]["calls"]["sparse"]
    assert sparse > 0 and stats[1.0]["selections"] * 3 == sparse * 2
    torch.testing.assert_close(outs[1.0], base, rtol=1e-3, atol=1e-4)
    assert not torch.equal(outs[0.5], base) and torch.isfinite(outs[0.5]).all()
    assert stats[0.5]["density"] < stats[1.0]["density"]
