"""PBS-Attn key permutation: a permutation inside segments, exact at density 1, and where it must help
(keys that every query attends, scattered over many blocks); numbers on structured inputs are printed."""

import math

import pytest
import torch

from dit_accel.attention.config import AttentionConfig
from dit_accel.attention.reorder_pbs import SEGMENT_BLOCKS, key_importance, pbs_permutation
from dit_accel.attention.sparse import SparseRequest, sparse_self_attention
from dit_accel.attention.synthetic import structured_qkv

BS = 16


def dense(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def rel_error(result, q, k, v) -> float:
    ref = dense(q, k, v)
    return float((result.out.float() - ref).norm() / ref.norm())


def run(q, k, v, reorder: str, method: str, density: float):
    cfg = AttentionConfig.from_dict({"sparse": {"method": method, "density": density}, "reorder": reorder,
                                     "block_size": BS})
    return sparse_self_attention(q, k, v, SparseRequest(cfg))


def test_keys_move_only_inside_their_segment_by_descending_importance():
    q, k, _ = structured_qkv((2, 4, 9), 3, 16)  # 72 tokens: a partial last block and segment
    q_perm, k_perm, segments = pbs_permutation(q, k, BS, 0.25)
    assert q_perm is None and k_perm.shape == (1, 3, 72) and k_perm.dtype == torch.long
    assert torch.equal(k_perm.sort(-1).values, torch.arange(72).expand(1, 3, 72))   # a permutation
    seg = SEGMENT_BLOCKS * BS
    assert torch.equal(k_perm // seg, (torch.arange(72) // seg).expand(1, 3, 72))    # inside its segment
    score = torch.gather(key_importance(q, k, BS, 0.25), -1, k_perm)
    for s0 in range(0, 72, seg):
        part = score[..., s0:s0 + seg]
        assert (part[..., 1:] <= part[..., :-1]).all()
    nb = 5
    assert segments.shape == (nb, nb) and segments.diagonal().all() and segments[0, 1] and not segments[1, 2]


@pytest.mark.parametrize("method", ["topp", "xattention"])
def test_density_one_is_dense_in_the_input_order(method):
    q, k, v = structured_qkv((2, 4, 8), 3, 16, seed=1)
    result = run(q, k, v, "pbs", method, 1.0)
    assert result.block_mask.all()
    torch.testing.assert_close(result.out, dense(q, k, v), rtol=1e-4, atol=1e-5)


def sinks(seed: int, n: int = 256, d: int = 32, amp: float = 7.0):
    """Random tokens plus 8 'sink' keys that every query attends strongly: one in each block of the first
    four segments, so they span 8 blocks in the natural order but only 4 after PBS."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, d, generator=g) for _ in range(3))
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    q = q + amp * u
    pos = torch.arange(8) * BS + torch.randint(0, BS, (8,), generator=g)
    k[:, :, pos] += amp * u
    return q, k, v


@pytest.mark.parametrize("method", ["topp", "xattention"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pbs_gathers_scattered_important_keys(method, seed):
    q, k, v = sinks(seed)
    # natural order: 5 blocks + self per q-block; PBS: 4 + its 2-block diagonal segment (no more pairs)
    natural = run(q, k, v, "none", method, 5 / 16)
    permuted = run(q, k, v, "pbs", method, 4 / 16)
    assert permuted.kept.item() <= natural.kept.item()
    assert rel_error(permuted, q, k, v) < 0.5 * rel_error(natural, q, k, v)


def test_structured_inputs_report(capsys):
    """Numbers only (PBS' importance is global per key; these heads attend locally): printed with -s."""
    q, k, v = structured_qkv((4, 8, 8), 5, 32)
    lines = []
    for method in ("topp", "xattention"):
        for density in (0.25, 0.5):
            row = {r: run(q, k, v, r, method, density) for r in ("none", "pbs")}
            errors = {r: rel_error(res, q, k, v) for r, res in row.items()}
            kept = {r: res.kept.item() / res.total for r, res in row.items()}
            assert all(math.isfinite(e) for e in errors.values())
            lines.append(f"{method} density {density}: none {errors['none']:.3f} (kept {kept['none']:.3f}), "
                         f"pbs {errors['pbs']:.3f} (kept {kept['pbs']:.3f})")
    with capsys.disabled():
        print("\nPBS on structured_qkv((4, 8, 8), 5 heads, D=32), relative L2 error:\n  " + "\n  ".join(lines))
