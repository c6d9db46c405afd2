"""SVG-EAR error-aware routing: the probe, equal block counts, lower error than score routing on an input
where scores point at the block compensation gets right, and the config rules."""

import math

import pytest
import torch

from dit_accel.attention.config import AttentionConfig
from dit_accel.attention.routing import compensation_error, error_route
from dit_accel.attention.select import pooled_scores, select_blocks
from dit_accel.attention.sparse import SparseRequest, sparse_self_attention
from dit_accel.config import PolicyError

BS = 16


def built(seed: int, nb: int = 8, d: int = 16):
    """Every kv-block holds one repeated key and value (centroid compensation is exact for it) except block 5,
    whose keys and values are spread out; block 1 has the largest mass, block 5 a smaller one. A score
    selector spends its budget on block 1, which compensation would have reproduced exactly."""
    g = torch.Generator().manual_seed(seed)
    n = nb * BS
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    q = torch.randn(1, 1, n, d, generator=g) * 0.3 + 2.0 * u
    kb = torch.randn(nb, d, generator=g) * 0.3
    kb[1] += 3.0 * u
    kb[5] += 1.0 * u
    k = kb.repeat_interleave(BS, 0).clone()
    v = torch.randn(nb, d, generator=g).repeat_interleave(BS, 0).clone()
    k[5 * BS:6 * BS] += torch.randn(BS, d, generator=g) * 1.5
    v[5 * BS:6 * BS] = torch.randn(BS, d, generator=g) * 2.0
    return q, k.view(1, 1, n, d), v.view(1, 1, n, d)


def cfg(route: str, method: str = "topp", **extra) -> AttentionConfig:
    return AttentionConfig.from_dict({"sparse": {"method": method, "density": 0.125, "route": route},
                                      "block_size": BS, "compensate": True, **extra})


def rel_error(result, q, k, v) -> float:
    dense = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
    return float((result.out.float() - dense).norm() / dense.norm())


def test_probe_sees_only_the_spread_block():
    q, k, v = built(0)
    err = compensation_error(q, k, v, BS, 0.25)
    assert err.shape == (1, 1, 8, 8)
    spread = err[..., 5]
    others = torch.cat([err[..., :5], err[..., 6:]], -1)
    assert others.max() < 1e-5 < spread.min()


def test_error_route_keeps_the_counts_and_the_self_blocks():
    q, k, v = built(1)
    always = torch.eye(8, dtype=torch.bool).expand(1, 1, 8, 8)
    score_mask = select_blocks(pooled_scores(q, k, BS, 0.25), density=0.25, always=always)
    mask = error_route(q, k, v, score_mask, always, BS, 0.25)
    assert torch.equal(mask.sum(-1), score_mask.sum(-1))
    assert (mask & always).sum() == 8
    rows = torch.arange(8) != 5
    assert mask[0, 0, rows, 5].all()  # the block compensation gets wrong is computed wherever the budget allows


@pytest.mark.parametrize("method", ["topp", "xattention"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_routing_beats_score_routing_at_equal_density(method, seed):
    q, k, v = built(seed)
    by_score = sparse_self_attention(q, k, v, SparseRequest(cfg("score", method)))
    by_error = sparse_self_attention(q, k, v, SparseRequest(cfg("error", method)))
    assert by_error.kept.item() == by_score.kept.item()
    assert rel_error(by_error, q, k, v) < 0.6 * rel_error(by_score, q, k, v)


def test_config_errors():
    with pytest.raises(PolicyError, match="attention.compensate"):
        AttentionConfig.from_dict({"sparse": {"route": "error"}})
    with pytest.raises(PolicyError, match="attention.sparse.route"):
        AttentionConfig.from_dict({"sparse": {"route": "errors"}, "compensate": True})
    with pytest.raises(PolicyError, match="attention.sparse.route"):
        AttentionConfig.from_dict({"sparse": {"method": "static", "route": "error"}, "compensate": True})
    with pytest.raises(PolicyError, match="attention.sparse.route"):
        AttentionConfig.from_dict({"sparse": {"method": "adaspa", "refresh_interval": 2, "route": "error"},
                                   "compensate": True})
    assert AttentionConfig.from_dict({}).sparse.route == "score"
    assert cfg("error").sparse.route == "error"
