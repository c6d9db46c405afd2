"""ProxyAttn selection: pooled proxy heads rank the kv-blocks for their member heads, each head with its
own budget (dit_accel.attention.proxy), alone and through sparse_self_attention."""

import pytest
import torch
import torch.nn.functional as F

from dit_accel.attention import AttentionConfig, SparseRequest, sparse_self_attention
from dit_accel.attention import proxy as proxy_module
from dit_accel.attention.proxy import (group_of_heads, head_budgets, pool_heads, proxy_scores, proxy_select,
                                       selection_flops)
from dit_accel.attention.select import pooled_scores, select_blocks, self_blocks, xattention_scores
from dit_accel.attention.synthetic import structured_qkv
from dit_accel.config import PolicyError

SCALE = 16 ** -0.5


def _cfg(**sparse):
    return AttentionConfig.from_dict({"block_size": 16, "warmup_steps": 0, "sparse": {"method": "proxy", **sparse}})


def _qk(heads=4, grid=(2, 6, 8), seed=0):
    q, k, v = structured_qkv(grid, heads=heads, head_dim=16, seed=seed)
    return q, k, v


def test_groups_are_contiguous_and_nearly_equal():
    assert group_of_heads(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert group_of_heads(5, 2).tolist() == [0, 0, 0, 1, 1]
    assert group_of_heads(4, 4).tolist() == [0, 1, 2, 3]


def test_pool_heads_is_the_group_mean():
    x = torch.randn(2, 6, 5, 3)
    torch.testing.assert_close(pool_heads(x, 2), torch.stack([x[:, :3].mean(1), x[:, 3:].mean(1)], 1))
    torch.testing.assert_close(pool_heads(x[:, :5], 2), torch.stack([x[:, :3].mean(1), x[:, 3:5].mean(1)], 1))
    assert pool_heads(x, 6) is x


def test_one_proxy_per_head_equals_per_head_scoring():
    """proxy_heads == H: the proxy scores are each head's own XAttention scores, and with a fixed budget the
    mask is the xattention method's; each head's threshold budget is the count top-p keeps on its pooled scores."""
    q, k, _ = _qk()
    always = self_blocks(None, None, (1, 4, q.shape[2]), 16, q.device)
    own = xattention_scores(q, k, 16, 4, SCALE)
    torch.testing.assert_close(proxy_scores(q, k, 16, SCALE, 4, 4), own)
    mask, max_kv = proxy_select(q, k, 16, SCALE, proxy_heads=4, stride=4, threshold=0.9, density=0.3, always=always)
    assert torch.equal(mask, select_blocks(own, density=0.3, always=always))
    assert max_kv == 2 + 1   # ceil(0.3 * 6) blocks plus the self block
    budget = head_budgets(q, k, 16, SCALE, 0.8)
    assert torch.equal(budget, select_blocks(pooled_scores(q, k, 16, SCALE), threshold=0.8).sum(-1))
    mask, max_kv = proxy_select(q, k, 16, SCALE, proxy_heads=4, stride=4, threshold=0.8)
    assert max_kv is None and torch.equal(mask.sum(-1), budget)
    # the kept blocks are the head's own best: every kept score >= every dropped score
    kept_min = own.masked_fill(~mask, 2).amin(-1)
    dropped_max = own.masked_fill(mask, -1).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_members_share_the_proxy_ranking_with_their_own_budgets():
    q, k, _ = _qk(heads=4, seed=1)
    mask, _ = proxy_select(q, k, 16, SCALE, proxy_heads=1, stride=4, threshold=0.9)
    budget = head_budgets(q, k, 16, SCALE, 0.9)
    assert torch.equal(mask.sum(-1), budget)
    assert len({tuple(b.flatten().tolist()) for b in budget[0]}) > 1  # heads differ in sparsity: budgets differ
    ranks = proxy_module._ranks(proxy_scores(q, k, 16, SCALE, 1, 4))   # [1, 1, nq, nk]
    assert torch.equal(mask, ranks < budget.unsqueeze(-1))               # each head: its budget's best proxy blocks
    # nested: a head with a smaller budget keeps a subset of a head with a larger one
    small, large = mask[0, budget[0].sum(-1).argmin()], mask[0, budget[0].sum(-1).argmax()]
    rows = budget[0, budget[0].sum(-1).argmin()] <= budget[0, budget[0].sum(-1).argmax()]
    assert (small[rows] <= large[rows]).all()


def test_uneven_groups():
    q, k, _ = _qk(heads=5)
    mask, _ = proxy_select(q, k, 16, SCALE, proxy_heads=2, stride=4, threshold=0.9)
    ranks = proxy_module._ranks(proxy_scores(q, k, 16, SCALE, 2, 4))
    budget = head_budgets(q, k, 16, SCALE, 0.9)
    for h, g in enumerate([0, 0, 0, 1, 1]):
        assert torch.equal(mask[:, h], ranks[:, g] < budget[:, h, :, None])


def test_scorer_runs_on_the_proxy_heads_only(monkeypatch):
    calls = []
    real = proxy_module.xattention_scores
    monkeypatch.setattr(proxy_module, "xattention_scores", lambda q, k, *a: calls.append(q.shape[1]) or real(q, k, *a))
    q, k, _ = _qk(heads=8)
    proxy_select(q, k, 16, SCALE, proxy_heads=2, stride=4, threshold=0.9)
    assert calls == [2]
    # multiply-adds of scoring: G antidiagonal heads plus H cheap pooled heads, against XAttention on all H
    h, s, d = 40, 75600, 128
    assert selection_flops(h, s, d, 64, 8, 4) < 0.2 * selection_flops(h, s, d, 64, 8, None)
    assert selection_flops(h, s, d, 64, 8, h) > selection_flops(h, s, d, 64, 8, None)  # G == H saves nothing


def test_full_density_through_the_pipeline_equals_dense():
    q, k, v = _qk(heads=4, grid=(2, 5, 7))   # 70 tokens: a partial last block
    result = sparse_self_attention(q, k, v, SparseRequest(_cfg(density=1.0, proxy_heads=2, stride=4)))
    torch.testing.assert_close(result.out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert float(result.kept) == result.total


def test_structured_inputs_end_to_end():
    """On video-like heads the proxy selection is sparse and close to dense, and the output is exactly the
    attention masked to its blocks."""
    q, k, v = structured_qkv((4, 8, 8), heads=4, head_dim=16, kinds=("temporal", "temporal", "spatial", "spatial"),
                             seed=3)
    dense = F.scaled_dot_product_attention(q, k, v)
    result = sparse_self_attention(q, k, v, SparseRequest(_cfg(threshold=0.9, proxy_heads=2, stride=4)))
    density = float(result.kept) / result.total
    assert density < 0.7
    token_mask = result.block_mask.repeat_interleave(16, -1).repeat_interleave(16, -2)
    torch.testing.assert_close(result.out, F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask),
                               atol=1e-5, rtol=1e-5)
    rel = float((result.out - dense).norm() / dense.norm())
    assert rel < 0.35
    # the method's premise: a proxy must pool heads that look alike. One proxy over temporal and spatial heads
    # ranks blocks for neither kind and errs far more.
    mixed = sparse_self_attention(q, k, v, SparseRequest(_cfg(threshold=0.9, proxy_heads=1, stride=4)))
    assert float((mixed.out - dense).norm() / dense.norm()) > 1.5 * rel
    # per-head budgets: the selection is not one mask copied to the group's heads
    assert not torch.equal(result.block_mask[:, 0], result.block_mask[:, 1]) or \
        not torch.equal(result.block_mask[:, 2], result.block_mask[:, 3])


def test_config_errors():
    with pytest.raises(PolicyError, match="proxy_heads"):
        _cfg(proxy_heads=0)
    with pytest.raises(PolicyError, match="proxy_heads"):
        _cfg(proxy_heads=2.5)
    with pytest.raises(PolicyError, match="reorder"):
        AttentionConfig.from_dict({"sparse": {"method": "proxy"}, "reorder": "paro"})
    assert _cfg().sparse.proxy_heads == 4
    q, k, v = _qk(heads=2)
    with pytest.raises(ValueError, match="attention.sparse.proxy_heads"):  # more proxies than the layer's heads
        sparse_self_attention(q, k, v, SparseRequest(_cfg(proxy_heads=4)))
