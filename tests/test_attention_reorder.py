"""PARO orders and SVG2 k-means permutations."""

import pytest
import torch

from dit_accel.attention import AttentionConfig
from dit_accel.calibration.attention import AttentionRecorder
from dit_accel.attention.reorder_paro import ORDERS, candidate_orders, order_permutation, tile_shape
from dit_accel.attention.reorder_svg2 import centroid_block_scores, kmeans, semantic_permutation
from dit_accel.attention.synthetic import structured_qkv


def test_orders_are_permutations_and_put_the_named_axis_innermost():
    grid = (3, 4, 5)
    for order in ORDERS:
        perm = order_permutation(grid, order, block_size=16)
        assert torch.equal(perm.sort().values, torch.arange(60))
    assert torch.equal(order_permutation(grid, "fhw"), torch.arange(60))
    hwf = order_permutation(grid, "hwf")
    f = hwf // 20  # frame of each position: consecutive positions walk through the frames first
    assert f[:3].tolist() == [0, 1, 2] and (hwf[:3] % 20 == 0).all()
    assert candidate_orders((1, 8, 8)) == ("fhw", "fwh", "tile") and len(candidate_orders((2, 8, 8))) == 7


def test_tile_order_groups_local_tiles_into_blocks():
    grid = (4, 8, 8)
    assert tile_shape(grid, 64) == (4, 4, 4)
    perm = order_permutation(grid, "tile", block_size=64)
    f, h, w = perm // 64, (perm // 8) % 8, perm % 8
    first = slice(0, 64)  # the first block is the 4x4x4 corner tile
    assert f[first].max() == 3 and h[first].max() == 3 and w[first].max() == 3


@pytest.mark.parametrize("with_values", [False, True])  # concentration criterion / output error at 25 %
def test_paro_calibration_recovers_the_axis_each_head_attends_along(with_values):
    grid = (8, 8, 8)
    q, k, v = structured_qkv(grid, heads=3, head_dim=64, kinds=("temporal", "row", "spatial"), seed=1)
    recorder = AttentionRecorder(AttentionConfig(block_size=32, warmup_steps=0), threshold=0.9)
    recorder.observe(0, q, k, grid, None, v=v if with_values else None)
    temporal, row, spatial = recorder.paro_orders(1, {0: 3})[0]
    assert temporal[-1] == "f"          # frames innermost: the same location across frames is one block
    assert row in ("fhw", "hfw")        # w innermost, f and h outside it
    assert spatial[0] == "f" or spatial == "tile"  # within one frame


def test_kmeans_finds_planted_clusters_and_the_permutation_makes_them_contiguous():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 10
    truth = torch.randint(0, 4, (64,), generator=g)
    x = centres[truth] + 0.1 * torch.randn(64, 8, generator=g)
    labels, cent = kmeans(x[None], 4, iterations=10)
    # same partition as the truth (up to renaming)
    assert len({(int(a), int(b)) for a, b in zip(labels[0], truth)}) == 4
    q = torch.stack([x, x[torch.randperm(64, generator=g)]])[:, None]  # batch 2, one head
    perm = semantic_permutation(q, q, 4, 4, iterations=10)
    for b in range(2):
        labels_sorted = perm.q_labels[b, 0]
        assert (labels_sorted[1:] >= labels_sorted[:-1]).all()           # sorted by cluster
        tokens = q[b, 0][perm.q_perm[b, 0]]                                # the tokens in sorted order
        planted = torch.cdist(tokens, centres).argmin(-1)                  # their true cluster
        assert int((planted[1:] != planted[:-1]).sum()) == 3              # 4 contiguous runs
    assert perm.q_perm[0, 0].tolist() != perm.q_perm[1, 0].tolist()      # per batch element
    warm = semantic_permutation(q, q, 4, 4, iterations=1, init=(perm.q_centroids, perm.k_centroids))
    assert torch.allclose(warm.q_centroids, perm.q_centroids, atol=1e-4)  # converged centroids are a fixed point


def test_centroid_block_scores_are_row_distributions():
    q, k, _ = structured_qkv((2, 8, 8), heads=2, head_dim=32, batch=2)
    perm = semantic_permutation(q, k, 8, 16, iterations=3)
    scores = centroid_block_scores(perm, block_size=16, scale=32 ** -0.5)
    assert scores.shape == (2, 2, 8, 8)
    assert torch.allclose(scores.sum(-1), torch.ones(2, 2, 8), atol=1e-5)
    assert (scores >= 0).all()


def test_paro_keeps_the_natural_order_unless_another_is_clearly_better():
    """An order replaces the natural one only when its score beats it by the margin (5 % by default)."""
    recorder = AttentionRecorder(AttentionConfig(block_size=32, warmup_steps=0), threshold=0.9)
    recorder.density[0] = {"fhw": [torch.tensor([1.0, 1.0, 1.0])], "fwh": [torch.tensor([0.97, 0.5, 1.2])],
                           "tile": [torch.tensor([0.99, 0.6, 0.96])]}
    assert recorder.paro_orders(1, {0: 3})[0] == ("fhw", "fwh", "fhw")
    recorder.margin = 0.0
    assert recorder.paro_orders(1, {0: 3})[0] == ("fwh", "fwh", "tile")


def test_kmeans_on_bf16_inputs_with_many_clusters_uses_spaced_seeds():
    """Above GREEDY_SEEDING_MAX clusters the seeds are evenly spaced tokens; 16-bit inputs cluster like float32."""
    from dit_accel.attention.reorder_svg2 import GREEDY_SEEDING_MAX

    g = torch.Generator().manual_seed(0)
    c = GREEDY_SEEDING_MAX + 16
    centres = torch.randn(c, 16, generator=g) * 10
    truth = torch.arange(c).repeat_interleave(8)[torch.randperm(8 * c, generator=g)]
    x = (centres[truth] + 0.05 * torch.randn(8 * c, 16, generator=g))[None]
    purity = {}
    for dtype in (torch.float32, torch.bfloat16):
        labels, cent = kmeans(x.to(dtype), c, iterations=10)
        assert cent.dtype == torch.float32
        # share of found clusters that hold a single planted cluster
        purity[dtype] = sum(len(set(truth[labels[0] == k].tolist())) <= 1 for k in range(c)) / c
    assert purity[torch.float32] > 0.7 and purity[torch.bfloat16] > purity[torch.float32] - 0.05, purity


def test_xattention_scores_in_bf16_match_float32():
    from dit_accel.attention.select import xattention_scores

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 256, 32, generator=g), torch.randn(1, 2, 256, 32, generator=g)
    ref = xattention_scores(q, k, 32, 8, 32 ** -0.5)
    low = xattention_scores(q.to(torch.bfloat16), k.to(torch.bfloat16), 32, 8, 32 ** -0.5)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=2e-2, rtol=0)
