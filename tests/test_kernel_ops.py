"""The kernels as ``torch.library`` custom ops: opcheck (schema, fake tensors, AOT dispatch) on both CPU
paths (the PyTorch reference, and the Triton kernel under TRITON_INTERPRET=1), and ``torch.compile``
with ``fullgraph=True`` through the public wrappers: no graph break, the same output as eager."""

import math

import pytest
import torch

from dit_accel.kernels import block_sparse_attention, mask_to_block_table
from dit_accel.kernels import block_sparse as bsa_module
from dit_accel.kernels.quant_attention import quant_attention

from helpers import interpreter_ready


PATHS = ["reference", pytest.param("interpreter", marks=pytest.mark.skipif(
    not interpreter_ready(), reason="needs triton imported with TRITON_INTERPRET=1 on CPU (tests/conftest.py)"))]


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "interpreter" else "0")
    return request.param


def qkv(B=1, H=2, S=40, D=16, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # [B, S, H, D] memory viewed as [B, H, S, D], as diffusers hands SDPA its inputs
        return tuple(torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    return tuple(torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3))


def table(B=1, H=2, S=40, bm=16, bn=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, math.ceil(S / bm), math.ceil(S / bn), generator=g) < 0.5
    mask[..., 0] = True
    return mask_to_block_table(mask)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype,strided,return_lse", [(torch.float32, False, True), (torch.bfloat16, True, False),
                                                      (torch.float16, False, False)])
def test_opcheck_block_sparse(path, dtype, strided, return_lse):
    q, k, v = qkv(dtype=dtype, strided=strided)
    idx, cnt = table()
    assert bsa_module._use_triton(q) == (path == "interpreter")
    torch.library.opcheck(torch.ops.dit_accel.block_sparse_attention.default,
                          (q, k, v, idx, cnt, 16, 16, 0.25, return_lse))


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype,mode,pv,sparse,strided", [
    (torch.bfloat16, "int8", "fp16", True, False),
    (torch.float16, "int8", "fp8", False, True),
    (torch.bfloat16, "fp8", "fp8", False, False),
])
def test_opcheck_quant(path, dtype, mode, pv, sparse, strided):
    q, k, v = qkv(dtype=dtype, D=32, strided=strided)
    idx, cnt = table() if sparse else (None, None)
    torch.library.opcheck(torch.ops.dit_accel.quant_attention.default,
                          (q, k, v, idx, cnt, 16, 16, mode, pv, True, 32 ** -0.5, sparse))


def test_ops_are_functional_and_return_an_empty_lse_when_not_asked():
    q, k, v = qkv()
    idx, cnt = table()
    before = [t.clone() for t in (q, k, v, idx, cnt)]
    out, lse = torch.ops.dit_accel.block_sparse_attention(q, k, v, idx, cnt, 16, 16, 0.25, False)
    assert out.shape == q.shape and lse.shape == (0,) and lse.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, idx, cnt)))
    for schema in (torch.ops.dit_accel.block_sparse_attention.default._schema,
                   torch.ops.dit_accel.quant_attention.default._schema):
        assert not any(a.is_write for a in schema.arguments if a.alias_info is not None)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_output_follows_the_layout_of_q(path):
    """Both paths give ``empty_like(q)``'s strides (what the fake promises): a transposed q gives a
    transposed output, so the caller's transpose back to [B, S, H, D] is a view."""
    q, k, v = qkv(strided=True)
    idx, cnt = table()
    out = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
    assert out.stride() == torch.empty_like(q).stride() == q.stride()
    qq, kq, vq = qkv(D=32, dtype=torch.bfloat16, strided=True)
    assert quant_attention(qq, kq, vq, block_m=16, block_n=16).stride() == qq.stride()


# ----------------------------------------------------------------------------- torch.compile


def _compiled_matches_eager(fn, *args):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = fn(*args)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    return eager, compiled, breaks


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_compiled_block_sparse_has_no_graph_break(path):
    q, k, v = qkv(strided=True)
    idx, cnt = table()

    def block(q, k, v, idx, cnt):   # validation on (CPU default): its value checks are skipped in the graph
        out, lse = block_sparse_attention(q * 1.5, k, v, idx, cnt, block_m=16, block_n=16, return_lse=True,
                                          validate=True)
        return out.transpose(1, 2).reshape(1, 40, -1) + 1.0, lse

    eager, compiled, breaks = _compiled_matches_eager(block, q, k, v, idx, cnt)
    assert breaks == {}
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("sparse", [False, True])
def test_compiled_quant_attention_has_no_graph_break(path, sparse):
    q, k, v = qkv(D=32, dtype=torch.bfloat16)
    idx, cnt = table() if sparse else (None, None)

    def block(q, k, v, idx, cnt):
        return quant_attention(q, k, v, idx, cnt, block_m=16, block_n=16, mode="int8") * 2

    eager, compiled, breaks = _compiled_matches_eager(block, q, k, v, idx, cnt)
    assert breaks == {}
    assert torch.equal(eager, compiled)


def test_explain_counts_one_graph_and_the_op_in_it():
    q, k, v = qkv()
    idx, cnt = table()

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(q, k, v)
    torch._dynamo.reset()
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert "dit_accel.block_sparse_attention" in explanation.graphs[0].code


def test_compiled_wrapper_still_rejects_bad_shapes():
    """The shape checks are traced: the ValueError reaches the caller (with ``fullgraph=True`` dynamo
    reports it wrapped, as an exception the graph cannot contain)."""
    q, k, v = qkv()
    idx, cnt = table()

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)

    torch._dynamo.reset()
    with pytest.raises(ValueError, match="same shape"):
        torch.compile(fn, backend="aot_eager")(q, k[:, :, :16], v)
    with pytest.raises(Exception, match="same shape"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k[:, :, :16], v)
    torch._dynamo.reset()


def test_value_checks_run_eagerly_but_not_while_compiling(monkeypatch):
    calls = []
    check = bsa_module._check_table_values
    monkeypatch.setattr(bsa_module, "_check_table_values", lambda *a: calls.append(1) or check(*a))
    q, k, v = qkv()
    idx, cnt = table()
    block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
    assert calls == [1]
    torch._dynamo.reset()
    torch.compile(lambda q: block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16), fullgraph=True,
                  backend="aot_eager")(q)
    torch._dynamo.reset()
    assert calls == [1]


def test_compiled_with_dynamic_shapes_and_a_float_argument(monkeypatch):
    """``dynamic=True`` (symbolic S) and ``sm_scale`` passed in (a SymFloat under dynamo): the checks
    trace, the op's fake impl handles symbolic shapes; no graph break, eager results."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def fn(q, k, v, idx, cnt, scale):
        return block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, sm_scale=scale)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for S, scale in ((40, 0.3), (56, 0.2)):
        q, k, v = qkv(S=S, seed=S)
        idx, cnt = table(S=S, seed=S)
        assert torch.equal(compiled(q, k, v, idx, cnt, scale), fn(q, k, v, idx, cnt, scale))
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    torch._dynamo.reset()


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_eager_shortcut_and_op_give_the_same_output(path):
    """Plain eager calls run the op's function without the dispatcher; both give identical results."""
    from dit_accel.kernels import ops

    q, k, v = qkv(strided=True)
    idx, cnt = table()
    assert ops.plain_eager(q, k, v, idx, cnt)
    direct = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, return_lse=True)
    via_op = torch.ops.dit_accel.block_sparse_attention(q, k, v, idx, cnt, 16, 16, 0.25, True)
    assert torch.equal(direct[0], via_op[0]) and torch.equal(direct[1], via_op[1])
    qq, kq, vq = qkv(D=32, dtype=torch.bfloat16)
    assert torch.equal(quant_attention(qq, kq, vq, idx, cnt, block_m=16, block_n=16),
                       torch.ops.dit_accel.quant_attention(qq, kq, vq, idx, cnt, 16, 16, "int8", "fp16", True,
                                                           32 ** -0.5, False)[0])


def test_fake_tensors_go_through_the_op_without_reading_values():
    """Under FakeTensorMode the wrappers call the op (its fake impl) and skip the value checks, which
    would need real values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dit_accel.kernels import ops

    q, k, v = qkv(strided=True)
    idx, cnt = table()
    with FakeTensorMode() as mode:
        fq, fk, fv, fidx, fcnt = (mode.from_tensor(t) for t in (q, k, v, idx, cnt))
        assert not ops.plain_eager(fq)
        out, lse = block_sparse_attention(fq, fk, fv, fidx, fcnt, block_m=16, block_n=16, return_lse=True)
        qout = quant_attention(fq.bfloat16(), fk.bfloat16(), fv.bfloat16(), fidx, fcnt, block_m=16, block_n=16)
    assert out.shape == q.shape and out.stride() == q.stride() and lse.shape == (1, 2, 40)
    assert qout.shape == q.shape and qout.dtype == torch.bfloat16
