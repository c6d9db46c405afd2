"""Block selection, the sparse pipeline (reorder -> select -> kernel -> inverse permutation), joint text
handling and SVG-EAR compensation."""

import math

import pytest
import torch
import torch.nn.functional as F

from dit_accel.attention import AttentionConfig, SparseRequest, joint_attention, sparse_self_attention
from dit_accel.attention.reorder_paro import head_permutations
from dit_accel.attention.select import (decode_mask, encode_mask, pooled_scores, select_blocks, self_blocks,
                                        xattention_scores)
from dit_accel.attention.synthetic import structured_qkv
from dit_accel.kernels import block_table_to_mask


def _cfg(**kw):
    return AttentionConfig.from_dict({"block_size": 16, "warmup_steps": 0, **kw})


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fixed_density_keeps_exactly_that_many_blocks_plus_the_diagonal():
    scores = torch.softmax(torch.randn(2, 3, 10, 10), -1)
    eye = self_blocks(None, None, (2, 3, 160), 16, torch.device("cpu"))
    mask = select_blocks(scores, density=0.3, always=eye)
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    counts = mask.sum(-1)
    assert ((counts == 3) | (counts == 4)).all()  # 3 best, plus the diagonal when it is not among them
    top3 = scores.topk(3, -1).indices
    assert torch.gather(mask, -1, top3).all()


def test_threshold_keeps_the_smallest_set_reaching_the_mass():
    scores = torch.tensor([[[[0.5, 0.3, 0.15, 0.05]]]])
    assert select_blocks(scores, threshold=0.5).tolist() == [[[[True, False, False, False]]]]
    assert select_blocks(scores, threshold=0.79).tolist() == [[[[True, True, False, False]]]]
    assert select_blocks(scores, threshold=0.81).tolist() == [[[[True, True, True, False]]]]


def test_scorers_estimate_the_true_block_mass():
    q, k, _ = structured_qkv((4, 8, 8), heads=4, head_dim=32, seed=2)
    scale = 32 ** -0.5
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, -1)
    true = p.view(1, 4, 16, 16, 16, 16).sum(-1).mean(-2)  # [B, H, nq, nk] block mass
    for scores in (xattention_scores(q, k, 16, 4, scale), pooled_scores(q, k, 16, scale)):
        assert torch.allclose(scores.sum(-1), torch.ones(1, 4, 16), atol=1e-5)
        # the best estimated block holds far more than the average true mass (1/16)
        best = torch.gather(true, -1, scores.argmax(-1, keepdim=True))
        assert float(best.mean()) > 4 / 16


def test_static_mask_hex_round_trip():
    mask = torch.rand(5, 7) > 0.5
    assert torch.equal(decode_mask(encode_mask(mask), (5, 7)), mask)


@pytest.mark.parametrize("reorder", ["none", "paro", "svg2"])
@pytest.mark.parametrize("method", ["xattention", "topp"])
def test_full_density_equals_dense_sdpa(method, reorder):
    grid = (2, 5, 7)  # 70 tokens: a partial last block
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, batch=2)
    perm = head_permutations(grid, ("hwf", "tile"), 16) if reorder == "paro" else None
    cfg = _cfg(sparse={"method": method, "density": 1.0}, reorder=reorder, svg2={"q_clusters": 5, "k_clusters": 7})
    result = sparse_self_attention(q, k, v, SparseRequest(cfg, head_perm=perm))
    assert torch.allclose(result.out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    assert float(result.kept) == result.total


@pytest.mark.parametrize("reorder", ["paro", "svg2"])
def test_sparse_output_is_masked_attention_in_the_permuted_order(reorder):
    grid = (2, 4, 8)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, batch=1)
    perm = head_permutations(grid, ("hwf", "fwh"), 16)
    cfg = _cfg(sparse={"method": "xattention", "density": 0.5, "stride": 4}, reorder=reorder,
               svg2={"q_clusters": 6, "k_clusters": 6})
    request = SparseRequest(cfg, head_perm=perm)
    result = sparse_self_attention(q, k, v, request)
    if reorder == "paro":
        q_perm = k_perm = perm.unsqueeze(0)
    else:
        from dit_accel.attention.reorder_svg2 import semantic_permutation

        sem = semantic_permutation(q, k, 6, 6, cfg.svg2.init_iterations)
        q_perm, k_perm = sem.q_perm, sem.k_perm
    # token-level mask: query i may see key j iff their blocks (in the permuted orders) are kept
    qpos, kpos = torch.argsort(q_perm, -1), torch.argsort(k_perm, -1)
    allowed = torch.stack([result.block_mask[0, h][qpos[0, h] // 16][:, kpos[0, h] // 16] for h in range(2)])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(0))
    assert torch.allclose(result.out, expected, atol=1e-5)
    assert self_blocks(q_perm, k_perm, (1, 2, 64), 16, q.device).le(result.block_mask).all()  # self blocks kept
    density = float(result.kept) / result.total
    assert density < 0.8


def test_unsupported_head_dims_are_zero_padded():
    q, k, v = structured_qkv((1, 6, 6), heads=2, head_dim=12)
    result = sparse_self_attention(q, k, v, SparseRequest(_cfg(sparse={"method": "topp", "density": 1.0})))
    assert torch.allclose(result.out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("text_first", [True, False])
def test_joint_attention_keeps_text_dense_and_masks_padded_text_keys(text_first):
    torch.manual_seed(0)
    n, t, d = 64, 9, 16
    q, k, v = (torch.randn(2, 2, n + t, d) for _ in range(3))
    visual = slice(t, t + n) if text_first else slice(0, n)
    text = torch.ones(n + t, dtype=torch.bool)
    text[visual] = False
    key_mask = torch.ones(2, 1, 1, n + t, dtype=torch.bool)
    pad = text.nonzero().squeeze(-1)[-3:]  # the last 3 text tokens of sample 1 are padding
    key_mask[1, :, :, pad] = False
    cfg = _cfg(sparse={"method": "topp", "density": 0.25})
    out, result = joint_attention(q, k, v, visual, SparseRequest(cfg), F.scaled_dot_product_attention, key_mask)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    assert torch.allclose(out[:, :, text], dense[:, :, text], atol=1e-6)     # text rows: exact
    # visual rows: sparse over visual keys, dense over the (unpadded) text keys
    block = result.block_mask.repeat_interleave(16, -1).repeat_interleave(16, -2)
    allowed = torch.ones(2, 2, n + t, n + t, dtype=torch.bool) & key_mask
    vis_idx = torch.arange(n + t)[visual]
    allowed[:, :, vis_idx[:, None], vis_idx[None, :]] &= block
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(out[:, :, visual], expected[:, :, visual], atol=1e-5)
    assert not torch.allclose(out[:, :, visual], dense[:, :, visual], atol=1e-3)  # it is sparse


def test_compensation_lowers_the_error_at_equal_density():
    q, k, v = structured_qkv((4, 8, 8), heads=4, head_dim=32, sharpness=4.0, seed=3)
    dense = F.scaled_dot_product_attention(q, k, v)
    errors = {}
    for compensate in (False, True):
        cfg = _cfg(sparse={"method": "topp", "density": 0.25}, compensate=compensate)
        result = sparse_self_attention(q, k, v, SparseRequest(cfg))
        errors[compensate] = (_rel(result.out, dense), float(result.kept))
    assert errors[True][1] == errors[False][1]
    assert errors[True][0] < 0.9 * errors[False][0]


def test_reordering_beats_no_reordering_at_equal_density():
    grid = (8, 8, 8)
    kinds = ("temporal", "row", "spatial", "local")
    q, k, v = structured_qkv(grid, heads=4, head_dim=32, kinds=kinds, seed=4)
    dense = F.scaled_dot_product_attention(q, k, v)
    perm = head_permutations(grid, ("hwf", "fhw", "fhw", "tile"), 32)
    err = {}
    for reorder in ("none", "paro"):
        cfg = AttentionConfig.from_dict({"block_size": 32, "sparse": {"method": "xattention", "density": 0.15},
                                         "reorder": reorder})
        err[reorder] = _rel(sparse_self_attention(q, k, v, SparseRequest(cfg, head_perm=perm)).out, dense)
    assert err["paro"] < 0.5 * err["none"]
    assert math.isfinite(err["paro"])


def test_block_table_of_the_mask_is_what_the_kernel_reads():
    scores = torch.softmax(torch.randn(1, 2, 4, 4), -1)
    mask = select_blocks(scores, density=0.5, always=torch.eye(4, dtype=torch.bool))
    from dit_accel.kernels import mask_to_block_table

    idx, cnt = mask_to_block_table(mask)
    assert torch.equal(block_table_to_mask(idx, cnt, 4), mask)


@pytest.mark.parametrize("quant, tolerance", [("int8", 0.03), ("fp8", 0.08)])
def test_quantized_kernel_runs_the_same_blocks(quant, tolerance):
    q, k, v = structured_qkv((2, 4, 8), heads=2, head_dim=32, sharpness=4.0)
    exact = {}
    for mode in ("none", quant):
        cfg = _cfg(sparse={"method": "topp", "density": 0.5}, quant=mode)
        exact[mode] = sparse_self_attention(q, k, v, SparseRequest(cfg))
    assert torch.equal(exact["none"].block_mask, exact[quant].block_mask)
    assert _rel(exact[quant].out, exact["none"].out) < tolerance


@pytest.mark.parametrize("reorder", ["none", "svg2"])
def test_fixed_density_selection_bounds_its_table_and_keeps_it_for_reuse(reorder, monkeypatch):
    # the bound (budget + self block) replaces the read-back of the largest row count, and the table is made
    # once per selection: a reusing call builds none
    from dit_accel.attention import sparse as sparse_module
    from dit_accel.kernels import mask_to_block_table

    q, k, v = structured_qkv((2, 8, 8), 2, 16, seed=3)  # 128 tokens: 8 blocks of 16
    cfg = AttentionConfig.from_dict({"sparse": {"method": "topp", "density": 0.3}, "reorder": reorder,
                                     "block_size": 16})
    first = SparseRequest(config=cfg)
    out = sparse_self_attention(q, k, v, first).out
    sel = first.selection
    exact_cnt = mask_to_block_table(sel.block_mask)[1]
    idx, cnt = sel.tables
    assert sel.max_kv == math.ceil(0.3 * 8) + 1 >= int(exact_cnt.max())
    assert idx.shape[-1] == sel.max_kv and torch.equal(cnt, exact_cnt)
    assert torch.equal(block_table_to_mask(idx, cnt, 8), sel.block_mask)
    built = []
    monkeypatch.setattr(sparse_module, "mask_to_block_table", lambda *a: built.append(a) or mask_to_block_table(*a))
    again = sparse_self_attention(q, k, v, SparseRequest(config=cfg, selection=sel)).out
    assert not built and torch.equal(again, out)
