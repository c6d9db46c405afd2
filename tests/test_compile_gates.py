"""Skipped work never enters a compiled frame: with regionally compiled blocks (diffusers'
``compile_repeated_blocks``), a reused step runs no compiled code for its skipped blocks, a block's
compiled region holds none of our code (``fullgraph=True`` works), in either order of compile and
``accelerate``, and ``remove`` leaves the user's compiled blocks as they were."""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_generate, tiny_pipeline, tiny_transformer

POLICIES = {"fora": {"cache": {"method": "fora", "interval": 2}},
            "fbcache": {"cache": {"method": "fbcache", "threshold": 10.0}},
            "taylorseer": {"cache": {"method": "taylorseer", "interval": 2, "warmup_steps": 1}}}
STEPS = 6


def flux_call(tr):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 16, generator=g)
    kwargs = dict(encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(16, 3), guidance=torch.tensor([3.5]))

    def run():
        outs = []
        with torch.no_grad():
            for step in range(STEPS):
                outs.append(tr(hidden_states=hidden, timestep=torch.tensor([1 - step / STEPS]), return_dict=False,
                               **kwargs)[0])
        return outs
    return run


def blocks_of(tr):
    return [*tr.transformer_blocks, *tr.single_transformer_blocks]


def count_compiled_entries(tr) -> list[int]:
    """Wrap each block's compiled call in a counter (as the user's compiled callable) and return the counters."""
    counts = []
    for block in blocks_of(tr):
        compiled = block._compiled_call_impl
        counter = [0]

        def counting(*args, _compiled=compiled, _counter=counter, **kwargs):
            _counter[0] += 1
            return _compiled(*args, **kwargs)

        block._compiled_call_impl = counting
        counts.append(counter)
    return counts


@pytest.mark.parametrize("order", ["compile-then-accelerate", "accelerate-then-compile"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_skipped_blocks_enter_no_compiled_region_and_fullgraph_compiles(order, policy):
    torch._dynamo.reset()
    reference_tr = tiny_transformer("flux")
    dit_accel.accelerate(reference_tr, POLICIES[policy])
    expected = flux_call(reference_tr)()
    reference = dit_accel.stats(reference_tr)
    dit_accel.remove(reference_tr)

    tr = tiny_transformer("flux")
    if order == "compile-then-accelerate":
        tr.compile_repeated_blocks(fullgraph=True, backend="eager")  # a graph break inside a block would raise
        counts = count_compiled_entries(tr)
        dit_accel.accelerate(tr, POLICIES[policy])
    else:
        dit_accel.accelerate(tr, POLICIES[policy])
        tr.compile_repeated_blocks(fullgraph=True, backend="eager")
        counts = count_compiled_entries(tr)
    got = flux_call(tr)()
    stats = dit_accel.stats(tr)
    view = dit_accel.inspect(tr)["transformer"]
    dit_accel.remove(tr)
    torch._dynamo.reset()
    assert stats.blocks_reused == reference.blocks_reused > 0
    assert [c[0] for c in counts] == stats.computed, "a compiled region was entered by a skipped block"
    assert view.compiled_blocks == len(blocks_of(tr))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_remove_gives_back_the_users_compiled_blocks():
    tr = tiny_transformer("flux")
    tr.compile_repeated_blocks(backend="eager")
    before = [b._compiled_call_impl for b in blocks_of(tr)]
    dit_accel.accelerate(tr, POLICIES["fora"])
    flux_call(tr)()
    dit_accel.remove(tr)
    assert [b._compiled_call_impl for b in blocks_of(tr)] == before
    assert not any(hasattr(b, "_diffusers_hook") for b in blocks_of(tr)[1:])
    torch._dynamo.reset()


def test_uncompiling_while_accelerated_falls_back_to_eager_gates():
    tr = tiny_transformer("flux")
    dit_accel.accelerate(tr, POLICIES["fora"])
    run = flux_call(tr)
    eager = run()
    tr.compile_repeated_blocks(backend="eager")
    compiled = run()
    assert dit_accel.inspect(tr)["transformer"].compiled_blocks == len(blocks_of(tr))
    for block in blocks_of(tr):  # the way scripts undo a compile
        block._compiled_call_impl = None
    again = run()
    stats = dit_accel.stats(tr)
    assert dit_accel.inspect(tr)["transformer"].compiled_blocks == 0
    dit_accel.remove(tr)
    torch._dynamo.reset()
    assert stats.blocks_reused > 0
    for a, b, c in zip(eager, compiled, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, c)


def test_compile_section_compiles_the_blocks_and_remove_uncompiles_them(caplog):
    tr = tiny_transformer("flux")
    expected = flux_call(tr)()
    policy = {"cache": {"method": "fora", "interval": 1}, "compile": {"backend": "eager", "fullgraph": True}}
    dit_accel.accelerate(tr, policy)
    got = flux_call(tr)()
    view = dit_accel.inspect(tr)["transformer"]
    dit_accel.remove(tr)
    torch._dynamo.reset()
    assert view.compiled_blocks == len(blocks_of(tr))
    assert all(b.__dict__.get("_compiled_call_impl") is None for b in blocks_of(tr))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert dit_accel.load_policy(policy).to_dict()["compile"]["fullgraph"] is True
    with pytest.raises(dit_accel.PolicyError, match="compile.mode"):
        dit_accel.load_policy({"compile": {"mode": "whole"}})


SPARSE = {"sparse": {"method": "topp", "density": 0.5}, "block_size": 16, "warmup_steps": 1}
SIZES = {"flux": dict(height=64, width=64), "wan": dict(height=64, width=64, num_frames=9)}


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_sparse_attention_compiles_fullgraph_once_and_matches_eager(family):
    # the decisions run inside the routed op at run time: one graph per block class, every step and branch
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline(family)
    policy = {"attention": SPARSE, "cache": {"method": "fora", "interval": 2}}
    dit_accel.accelerate(pipe, policy)
    expected = tiny_generate(pipe, family, **SIZES[family])
    eager_calls = dit_accel.stats(pipe).extra["attention"]["calls"]
    dit_accel.remove(pipe)
    torch._dynamo.reset()
    counters.clear()
    dit_accel.accelerate(pipe, {**policy, "compile": {"backend": "eager"}})
    try:
        got = tiny_generate(pipe, family, **SIZES[family])
        graphs = counters["stats"]["unique_graphs"]
        again = tiny_generate(pipe, family, **SIZES[family])
        stats = dit_accel.stats(pipe)
    finally:
        dit_accel.remove(pipe)
        torch._dynamo.reset()
    assert stats.extra["compile"] == "regional (eager, fullgraph=True)"
    assert stats.extra["attention"]["calls"] == eager_calls and eager_calls["sparse"] > 0
    assert counters["stats"]["unique_graphs"] == graphs  # the second generation compiled nothing
    assert torch.equal(got, expected) and torch.equal(again, expected)


def test_dynamic_activation_quantization_without_compile_warns(caplog):
    pytest.importorskip("torchao")
    tr = tiny_transformer("flux")
    with caplog.at_level("WARNING", logger="dit_accel"):
        dit_accel.accelerate(tr, {"quant": {"linear": "int8_dynamic"}})
        dit_accel.remove(tr)
    assert "compile" in caplog.text and "slower than bf16" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dit_accel"):
        dit_accel.accelerate(tr, {"quant": {"linear": "int8_dynamic"}, "compile": {"backend": "eager"}})
        dit_accel.remove(tr)
    torch._dynamo.reset()
    assert "slower than bf16" not in caplog.text
