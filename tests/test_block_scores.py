"""Fused XAttention block scoring: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against the
PyTorch reference in dit_accel.attention.select, on ragged lengths, several strides and block sizes."""

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before Triton's import (see tests/test_kernels_block_sparse.py)


import pytest  # noqa: E402
import torch  # noqa: E402

from dit_accel.attention import select as select_module  # noqa: E402
from dit_accel.attention.select import _xattention_scores_torch, xattention_scores  # noqa: E402
from dit_accel.kernels import block_scores, triton_available  # noqa: E402
from dit_accel.kernels.block_scores import block_scores_kernel_available, xattention_block_scores  # noqa: E402
from helpers import fresh_process_only, interpreter_gate, run_in_fresh_process  # noqa: E402


INTERPRETER_READY, requires_triton, _interpreter = interpreter_gate(_PREVIOUS_INTERPRET)


def qk(B, H, S, D, dtype=torch.float32, seed=0, structured=False):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, S, D, generator=g) for _ in range(2))
    if structured:  # a shared direction in a few key tokens: peaked rows, as in real attention
        k[..., ::7, :] += 3 * q.mean(2, keepdim=True)
    return q.to(dtype), k.to(dtype)


def reference(q, k, bs, stride, scale):
    return _xattention_scores_torch(q, k, bs, stride, scale, 1 << 25)


@requires_triton
@pytest.mark.parametrize("S,bs,stride,D", [
    (64, 16, 4, 16),     # whole blocks
    (50, 16, 4, 16),     # ragged: last block partial, last reduced row partial
    (45, 16, 8, 32),     # ragged, 2 reduced rows per block: one program holds 8 q-blocks
    (70, 32, 2, 16),     # 16 reduced rows per block
    (37, 16, 1, 8),      # stride 1: exact block masses; head dim below 16 (padded in the kernel)
    (40, 16, 16, 16),    # stride = block size: one reduced row per block
    (33, 32, 8, 24),     # head dim not a power of two; a single padding-heavy last block
])
def test_kernel_matches_reference(S, bs, stride, D):
    q, k = qk(2, 3, S, D, seed=S, structured=True)
    scale = D ** -0.5
    out = xattention_block_scores(q, k, bs, stride, scale)
    ref = reference(q, k, bs, stride, scale)
    assert out.shape == ref.shape == (2, 3, -(-S // bs), -(-S // bs)) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, out.shape[2]), rtol=1e-5, atol=1e-5)


@requires_triton
def test_larger_tiles_agree():
    """Key tiles spanning several kv-blocks, row tiles several q-blocks, and a sequence shorter than a tile."""
    q, k = qk(1, 2, 90, 16, seed=3)
    ref = reference(q, k, 16, 4, 0.25)
    for tile in [(16, 16), (32, 64), (64, 32)]:
        torch.testing.assert_close(xattention_block_scores(q, k, 16, 4, 0.25, tile=tile), ref, rtol=1e-4, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_16bit(dtype):
    q, k = qk(1, 2, 48, 16, dtype=dtype, seed=1, structured=True)
    out = xattention_block_scores(q, k, 16, 4, 0.25)
    ref = reference(q.float(), k.float(), 16, 4, 0.25)  # the kernel accumulates the products in float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=5e-3)


@requires_triton
def test_non_contiguous_inputs():
    """Diffusers' [B, S, H, D] memory viewed as [B, H, S, D]: no copy needed."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 40, 2, 16, generator=g).transpose(1, 2)
    k = torch.randn(1, 40, 2, 16, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    torch.testing.assert_close(xattention_block_scores(q, k, 16, 4, 0.25),
                               reference(q.contiguous(), k.contiguous(), 16, 4, 0.25), rtol=1e-4, atol=1e-5)


@requires_triton
def test_padding_only_rows_do_not_count():
    """A q-block whose last reduced rows are all padding equals the mean over its real rows only."""
    S, bs, stride = 34, 16, 4   # last block: tokens 32, 33 -> one real reduced row of four
    q, k = qk(1, 1, S, 16, seed=5)
    out = xattention_block_scores(q, k, bs, stride, 0.25)
    qp = torch.nn.functional.pad(q, (0, 0, 0, 2))
    kp = torch.nn.functional.pad(k, (0, 0, 0, 2))
    # reduced row 8 (tokens 32..35, reversed phase) against the 9 real reduced keys
    q_red = torch.cat([qp[0, 0, 32 + stride - 1 - r] for r in range(stride)])
    k_red = torch.stack([torch.cat([kp[0, 0, j * stride + r] for r in range(stride)]) for j in range(9)])
    p = torch.softmax(k_red @ q_red * 0.25 / stride, -1)
    expect = torch.stack([p[0:4].sum(), p[4:8].sum(), p[8:9].sum()])
    torch.testing.assert_close(out[0, 0, 2], expect, rtol=1e-4, atol=1e-6)


@requires_triton
def test_select_dispatches_to_kernel_only_on_cuda(monkeypatch):
    """xattention_scores: the kernel for CUDA tensors, the PyTorch reference on CPU (even under the
    interpreter: it is for kernel tests only)."""
    calls = []
    monkeypatch.setattr(select_module, "xattention_block_scores", lambda *a, **kw: calls.append(a) or None)
    q, k = qk(1, 1, 32, 16)
    out = xattention_scores(q, k, 16, 4, 0.25)
    assert calls == [] and out.shape == (1, 1, 2, 2)

    class FakeCuda:
        is_cuda = True
        dtype = torch.float32
    monkeypatch.setattr(select_module, "block_scores_kernel_available", lambda t, bs: True)
    monkeypatch.delenv("DIT_ACCEL_SCORE_KERNEL", raising=False)
    with pytest.raises(AttributeError):  # opt-in: without DIT_ACCEL_SCORE_KERNEL=1 the PyTorch path runs
        xattention_scores(FakeCuda(), FakeCuda(), 16, 6, 0.25)
    assert calls == []
    monkeypatch.setenv("DIT_ACCEL_SCORE_KERNEL", "1")
    assert xattention_scores(FakeCuda(), FakeCuda(), 16, 6, 0.25) is None  # stride 6 -> 4 divides 16
    assert calls and calls[0][2:] == (16, 4, 0.25)


def test_kernel_availability_rules(monkeypatch):
    q = torch.zeros(1, 1, 8, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not block_scores_kernel_available(q, 16)  # CPU without the interpreter: the reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert block_scores_kernel_available(q, 16) == triton_available()
    assert not block_scores_kernel_available(q, 24)  # not a power of two
    assert not block_scores_kernel_available(q.long(), 16)
    monkeypatch.setenv("DIT_ACCEL_SCORE_KERNEL", "0")
    assert not block_scores_kernel_available(q, 16)


@pytest.mark.parametrize("case,match", [
    (dict(k=torch.zeros(1, 1, 9, 16)), "one shape"),
    (dict(k=torch.zeros(1, 1, 8, 16, dtype=torch.float16)), "dtype"),
    (dict(block_size=24), "power of two"),
    (dict(stride=3), "divisor"),
    (dict(stride=0), "divisor"),
])
def test_bad_inputs_raise(case, match):
    args = dict(q=torch.zeros(1, 1, 8, 16), k=torch.zeros(1, 1, 8, 16), block_size=16, stride=4, scale=0.25)
    args.update(case)
    with pytest.raises(ValueError, match=match):
        block_scores.xattention_block_scores(**args)


def test_no_kernel_device_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        xattention_block_scores(torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16), 16, 4, 0.25)


def test_reference_rows_sum_to_one_and_ignore_padding():
    """The reference itself: rows sum to 1; appending zero tokens beyond S changes nothing but the grid."""
    q, k = qk(1, 2, 40, 16, seed=4)
    ref = reference(q, k, 16, 4, 0.25)
    torch.testing.assert_close(ref.sum(-1), torch.ones(1, 2, 3))
    a = reference(q[:, :, :34], k[:, :, :34], 16, 4, 0.25)   # last block: 2 tokens, 1 real reduced row
    assert a.shape == (1, 2, 3, 3)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 2, 3))


@pytest.mark.parametrize("S,bs", [(64, 16), (50, 16), (7, 16), (100, 32)])
def test_pooled_scores_match_padded_float_pooling(S, bs):
    """pooled_scores pools from the inputs' own memory; the same as padding a float32 copy and averaging."""
    q, k = qk(2, 2, S, 16, dtype=torch.bfloat16, seed=S)
    n, pad = -(-S // bs), -(-S // bs) * bs - S
    sizes = torch.tensor([float(bs)] * (n - 1) + [float(bs - pad)])

    def pool(t):
        return torch.nn.functional.pad(t.float(), (0, 0, 0, pad)).view(2, 2, n, bs, 16).sum(3) / sizes[:, None]

    expect = torch.softmax(0.25 * pool(q) @ pool(k).transpose(-1, -2) + sizes.log(), -1)
    torch.testing.assert_close(select_module.pooled_scores(q, k, bs, 0.25), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(select_module.block_means(q.transpose(1, 2).contiguous().transpose(1, 2), bs),
                               pool(q), rtol=1e-5, atol=1e-6)   # strided views too


@fresh_process_only(INTERPRETER_READY)
def test_kernel_tests_in_fresh_process():
    run_in_fresh_process(__file__)
