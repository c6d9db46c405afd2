"""Quantized attention (SageAttention-style): Triton kernels under TRITON_INTERPRET=1 on CPU vs the
PyTorch reference vs float32 SDPA. Shapes are tiny so the interpreter finishes in seconds."""

import math

import pytest
import torch
import torch.nn.functional as F

from dit_accel.kernels import block_sparse_attention_reference, mask_to_block_table, triton_available
from dit_accel.kernels import quant_attention as qa_module
from dit_accel.kernels.quant_attention import quant_attention, quant_attention_reference, quantize_per_block

from helpers import interpreter_ready


requires_interpreter = pytest.mark.skipif(
    not interpreter_ready(),
    reason="needs triton imported with TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it before any import)")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def qkv(B=1, H=2, S=77, D=32, dtype=torch.bfloat16, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    return (q * q_scale).to(dtype), k.to(dtype), v.to(dtype)


def rel_l1(a, b):
    return ((a.float() - b.float()).abs().sum() / b.float().abs().sum()).item()


def sdpa32(q, k, v):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def kernel(*args, **kwargs):
    assert qa_module._use_triton(args[0]), "the Triton path must run (interpreter)"
    return quant_attention(*args, **kwargs)


# (mode, pv) -> bound on mean relative L1 vs float32 attention on N(0, 1) inputs. FP8 has three
# mantissa bits: on zero-mean random V its P·V error is ~0.03 (see the module docstring).
SDPA_BOUND = {("int8", "fp16"): 0.02, ("int8", "fp8"): 0.05, ("fp8", "fp8"): 0.07}


@requires_interpreter
@pytest.mark.parametrize("mode,pv", list(SDPA_BOUND))
def test_kernel_matches_reference_and_sdpa(interpret, mode, pv):
    q, k, v = qkv(S=77, D=32)                         # 77: tails in both the q- and kv-blocks
    out, lse = kernel(q, k, v, block_m=32, block_n=16, mode=mode, pv=pv, return_lse=True)
    ref, ref_lse = quant_attention_reference(q, k, v, block_m=32, block_n=16, mode=mode, pv=pv, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    # The reference rounds Q, K, V exactly as the kernel; only P's rounding (16-bit or FP8) differs.
    assert rel_l1(out, ref) < (0.008 if pv == "fp16" else 0.03)
    assert torch.allclose(lse, ref_lse, atol=1e-4)
    exact_lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) / math.sqrt(32), dim=-1)
    assert (lse - exact_lse).abs().max().item() < 0.1  # LSE of the *unsmoothed* scores
    assert rel_l1(out, sdpa32(q, k, v)) < SDPA_BOUND[(mode, pv)]


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,S", [(64, 96), (16, 20)])
def test_default_int8_within_two_percent_of_sdpa(interpret, dtype, D, S):
    q, k, v = qkv(S=S, D=D, dtype=dtype, seed=1)
    out = kernel(q, k, v, block_m=32, block_n=16)       # defaults: mode int8, 16-bit P·V, smoothing
    assert rel_l1(out, sdpa32(q, k, v)) <= 0.02


@requires_interpreter
def test_k_smoothing_matters(interpret):
    """A large per-channel offset in K (outlier channels, as in DiT keys) wrecks INT8 without smoothing."""
    q, k, v = qkv(S=64, D=32, dtype=torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    offset = 40.0 * torch.randn(1, 1, 1, 32, generator=g)
    q, k, v = q.bfloat16(), (k + offset).bfloat16(), v.bfloat16()
    exact = sdpa32(q, k, v)
    smooth = rel_l1(kernel(q, k, v, block_m=32, block_n=16, smooth_k=True), exact)
    raw = rel_l1(kernel(q, k, v, block_m=32, block_n=16, smooth_k=False), exact)
    assert smooth <= 0.02
    assert raw > 5 * smooth, (smooth, raw)


@requires_interpreter
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_sparse_with_all_blocks_equals_dense(interpret, pv):
    q, k, v = qkv(S=77, D=32, seed=4)
    nq, nk = math.ceil(77 / 32), math.ceil(77 / 16)
    idx, cnt = mask_to_block_table(torch.ones(1, 2, nq, nk, dtype=torch.bool))
    sparse, sparse_lse = kernel(q, k, v, idx, cnt, block_m=32, block_n=16, pv=pv, return_lse=True)
    dense, dense_lse = kernel(q, k, v, block_m=32, block_n=16, pv=pv, return_lse=True)
    # Same quantized operands; the kernel's kv tiles differ (16 sparse, 32 dense), so only the
    # accumulation order and the per-tile rounding of P differ.
    assert (sparse.float() - dense.float()).abs().max().item() < (0.02 if pv == "fp16" else 0.05)
    assert rel_l1(sparse, dense) < (2e-3 if pv == "fp16" else 0.02)
    assert torch.allclose(sparse_lse, dense_lse, atol=1e-4)


@requires_interpreter
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_tma_and_pointer_loads_agree(interpret, monkeypatch, pv):
    """K/V tiles by TMA descriptors (the sm_90 default) and by pointer loads give the same result,
    with tails past S (the descriptor zero-fills them, the pointer path masks them)."""
    import dit_accel.kernels._block_sparse_triton as bst   # one TMA switch for both kernels

    q, k, v = qkv(S=77, D=32, seed=8)
    g = torch.Generator().manual_seed(9)
    idx, cnt = mask_to_block_table(torch.rand(1, 2, 3, 5, generator=g) < 0.6)
    outs = []
    for tma in (True, False):
        monkeypatch.setattr(bst, "USE_TMA", tma)
        outs.append(kernel(q, k, v, idx, cnt, block_m=32, block_n=16, pv=pv, return_lse=True))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@requires_interpreter
def test_sparse_matches_bf16_block_sparse_and_empty_rows(interpret):
    q, k, v = qkv(S=100, D=32, seed=5)
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(1, 2, 4, 7, generator=g) < 0.5
    mask[..., 0] = True
    mask[0, 1, 2] = False                                # one empty row -> zeros, lse -inf
    idx, cnt = mask_to_block_table(mask)
    out, lse = kernel(q, k, v, idx, cnt, block_m=32, block_n=16, return_lse=True)
    exact = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, block_m=32, block_n=16)
    assert rel_l1(out, exact) <= 0.02
    rows = slice(64, 96)
    assert torch.equal(out[0, 1, rows], torch.zeros_like(out[0, 1, rows]))
    assert torch.isneginf(lse[0, 1, rows]).all()
    ref = quant_attention_reference(q, k, v, idx, cnt, block_m=32, block_n=16)
    assert rel_l1(out, ref) < 0.008


@requires_interpreter
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_k_v_quantization_matches_torch(fp8):
    from dit_accel.kernels._quant_attention_triton import PAD, quantize_kv_triton

    _, k, v = qkv(S=50, D=32, seed=7)
    k_q, k_scale, v_t, v_scale, k_mean = quantize_kv_triton(k, v, kgran=16, k_fp8=fp8, v_fp8=True, smooth_k=True,
                                                            interpret=True)
    mean = k.float().mean(dim=2, keepdim=True)
    ref_q, ref_scale = quantize_per_block(k.float() - mean, 16, "fp8" if fp8 else "int8")
    assert k_q.shape == (2, PAD, 32) and v_t.shape == (2, 32, PAD)
    assert torch.allclose(k_mean.view(1, 2, 1, 32), mean, atol=1e-6)
    assert torch.equal(k_q.view(1, 2, PAD, 32)[:, :, :50].float(), ref_q.float())
    assert torch.equal(k_q.view(1, 2, PAD, 32)[:, :, 50:].float(), torch.zeros(1, 2, PAD - 50, 32))  # padding
    assert torch.allclose(k_scale.view(1, 2, -1)[..., :4], ref_scale, rtol=1e-6)
    vs = v.float().abs().amax(dim=2) / 448.0
    assert torch.allclose(v_scale.view(1, 2, 32), vs, rtol=1e-6)
    ref_v = (v.float() / vs[:, :, None]).to(torch.float8_e4m3fn).float()
    assert torch.equal(v_t.view(1, 2, 32, PAD)[..., :50].transpose(-1, -2).float(), ref_v)


def test_reference_path_without_triton(monkeypatch):
    """On CPU without the interpreter, quant_attention is the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(S=40, D=16, seed=8)
    assert not qa_module._use_triton(q)
    out = quant_attention(q, k, v, block_m=16, block_n=16, mode="fp8")
    assert torch.equal(out, quant_attention_reference(q, k, v, block_m=16, block_n=16, mode="fp8"))
    assert rel_l1(out, sdpa32(q, k, v)) < SDPA_BOUND[("fp8", "fp8")]


def test_quantize_per_block_roundtrip():
    x = torch.randn(1, 1, 70, 16)
    for mode, tol in (("int8", 0.01), ("fp8", 0.07)):
        xq, scale = quantize_per_block(x, 32, mode)
        assert scale.shape == (1, 1, 3)
        back = xq.float() * scale.repeat_interleave(32, dim=-1)[..., :70, None]
        assert rel_l1(back, x) < tol
    xq, _ = quantize_per_block(x, 32, "int8")
    assert xq.dtype == torch.int8 and int(xq.abs().max()) == 127


@pytest.mark.parametrize("change,match", [
    (dict(dtype=torch.float32), "float16 or bfloat16"),
    (dict(D=48), "head dim"),
    (dict(block_m=256), "block_m"),
    (dict(block_n=24), "block_n"),
    (dict(mode="int4"), "mode"),
    (dict(pv="int8"), "pv"),
    (dict(sm_scale=-1.0), "sm_scale"),
    (dict(only_indices=True), "both kv_indices and kv_counts"),
    (dict(bad_table_shape=True), "kv_indices must have shape"),
    (dict(bad_index=True), "kv_indices must lie in"),
    (dict(k_shape=True), "same shape"),
])
def test_bad_inputs(change, match):
    q, k, v = qkv(S=40, D=change.get("D", 16), dtype=change.get("dtype", torch.bfloat16))
    kwargs = {key: change[key] for key in ("block_m", "block_n", "mode", "pv", "sm_scale") if key in change}
    kwargs.setdefault("block_m", 16)
    kwargs.setdefault("block_n", 16)
    idx = cnt = None
    if change.get("only_indices"):
        idx = torch.zeros(1, 2, 3, 1, dtype=torch.int32)
    if change.get("bad_table_shape"):
        idx, cnt = torch.zeros(1, 2, 2, 1, dtype=torch.int32), torch.ones(1, 2, 2, dtype=torch.int32)
    if change.get("bad_index"):
        idx, cnt = torch.full((1, 2, 3, 1), 9, dtype=torch.int32), torch.ones(1, 2, 3, dtype=torch.int32)
    if change.get("k_shape"):
        k = k[:, :, :20]
    with pytest.raises(ValueError, match=match):
        quant_attention(q, k, v, idx, cnt, **kwargs)
    with pytest.raises(ValueError, match=match):
        quant_attention_reference(q, k, v, idx, cnt, **kwargs)


@requires_interpreter
def test_strided_inputs_as_diffusers_passes_them(interpret):
    """diffusers' native attention hands SDPA ``[B, S, H, D]`` tensors permuted to ``[B, H, S, D]``."""
    q, k, v = qkv(S=50, D=32, seed=9)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    for pv in ("fp16", "fp8"):
        assert torch.equal(kernel(qs, ks, vs, block_m=32, block_n=16, pv=pv),
                           kernel(q, k, v, block_m=32, block_n=16, pv=pv))


@pytest.mark.gpu
@pytest.mark.parametrize("mode,pv", list(SDPA_BOUND))
@pytest.mark.parametrize("S", [1024, 1000])
def test_cuda_kernel_matches_reference(mode, pv, S):
    """On the GPU (``pytest -m gpu``): the compiled kernel, dense and block-sparse, vs the reference."""
    if mode == "fp8" or pv == "fp8":
        if not qa_module.fp8_supported("cuda"):
            pytest.skip("FP8 needs compute capability >= 8.9")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, S, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    out = quant_attention(q, k, v, mode=mode, pv=pv)
    ref = quant_attention_reference(q, k, v, mode=mode, pv=pv)
    assert rel_l1(out, ref) < (0.008 if pv == "fp16" else 0.03)
    assert rel_l1(out, sdpa32(q, k, v)) < SDPA_BOUND[(mode, pv)]
    nq, nk = math.ceil(S / 128), math.ceil(S / 64)
    mask = torch.rand(1, 4, nq, nk, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[..., 0] = True
    idx, cnt = mask_to_block_table(mask.cuda())
    sparse = quant_attention(q, k, v, idx, cnt, mode=mode, pv=pv)
    sparse_ref = quant_attention_reference(q, k, v, idx, cnt, mode=mode, pv=pv)
    assert rel_l1(sparse, sparse_ref) < (0.008 if pv == "fp16" else 0.03)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_autotune_space_respects_the_table(monkeypatch):
    from dit_accel.kernels._quant_attention_triton import _prune, hopper_configs

    def tiles(**kw):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in _prune(hopper_configs(), {}, **kw)}

    dense = tiles(TABLE_BM=128, TABLE_BN=64, DENSE=True)
    assert (128, 64, 8) in dense and (128, 128, 8) in dense and (64, 64, 4) in dense  # kv tile free when dense
    assert all(bn == 64 for _, bn, _ in tiles(TABLE_BM=128, TABLE_BN=64, DENSE=False))  # one K scale per tile
    assert all(bm == 64 for bm, _, _ in tiles(TABLE_BM=64, TABLE_BN=128, DENSE=False))
    assert tiles(TABLE_BM=32, TABLE_BN=16, DENSE=False) == {(32, 16, 4)}                # tiny tables
    monkeypatch.setenv("DIT_ACCEL_QATTN_CONFIG", "64,64,4,2")
    assert tiles(TABLE_BM=128, TABLE_BN=64, DENSE=True) == {(64, 64, 4)}
