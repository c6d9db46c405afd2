"""The ``memory:`` section (Feature Slicer / Operator Grouping, ``dit_accel.runtime.memory``): same outputs up to
rounding on the tiny FLUX, Wan, PixArt and DiT pipelines with every FFN really run in slices, lower peak activation
memory on a long tiny-Wan sequence (measured), composition with ``cache:`` and regional ``torch.compile``,
refusals, and no footprint after ``remove``."""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.adapters import get_adapter
from dit_accel.testing import tiny_generate, tiny_pipeline, tiny_transformer
from dit_accel.testing.memory import PeakTensorMemory

SLICE = 5  # tiny sequences are 16-64 tokens: several slices and a remainder


def ffn_modules(transformer):
    adapter = get_adapter(transformer)
    return [m for m in (adapter.sub_module(b, "ffn") for b in adapter.blocks(transformer)) if m is not None]


def count_ffn_rows(transformer):
    """Token counts each FFN's first linear layer sees (a slice runs it once per slice)."""
    seen: list[int] = []
    handles = []
    for ffn in ffn_modules(transformer):
        first = next(m for m in ffn.modules() if isinstance(m, torch.nn.Linear))
        handles.append(first.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1])))
    return seen, handles


@pytest.mark.parametrize("family", ["flux", "wan", "pixart", "dit"])
def test_sliced_ffn_gives_the_same_outputs(family):
    pipe = tiny_pipeline(family)
    modules = ffn_modules(pipe.transformer)
    before = [set(m.__dict__) for m in modules]
    seen, handles = count_ffn_rows(pipe.transformer)
    expected = tiny_generate(pipe, family)
    full = list(seen)
    seen.clear()
    with dit_accel.accelerated(pipe, {"memory": {"slice_tokens": SLICE}}):
        got = tiny_generate(pipe, family)
        stats = dit_accel.stats(pipe)
    for h in handles:
        h.remove()
    assert full and max(full) > SLICE
    assert max(seen) <= SLICE and sum(seen) == sum(full), "every token went through the FFN once, in slices"
    assert stats.extra["memory"]["sliced_modules"] == len(ffn_modules(pipe.transformer)) > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(tiny_generate(pipe, family), expected), "remove: bit-identical again"
    assert not any(hasattr(m, "_diffusers_hook") or set(m.__dict__) - clean for m, clean in zip(modules, before))


WAN_LONG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=32, ffn_dim=373, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)  # FFN 5.8x the hidden size, as Wan 2.1


def test_peak_activation_memory_drops_on_a_long_sequence():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_LONG).eval()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, 16, 8, 32, 32, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 16, 32, generator=g), return_dict=False)  # 2,048 tokens

    def measured():
        with torch.no_grad(), PeakTensorMemory() as mem:
            out = model(**kwargs)[0]
        return out, mem.peak

    expected, dense = measured()
    with dit_accel.accelerated(model, {"memory": {"slice_tokens": 512}}):
        got, sliced = measured()
    with dit_accel.accelerated(model, {"memory": {"slice_tokens": 4096}}):  # longer than the sequence: unsliced
        _, unsliced = measured()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert sliced <= 0.7 * dense, (sliced, dense)  # measured 0.58x (5.49 MB vs 9.45 MB)
    assert unsliced >= 0.98 * dense


def test_frames_slices_are_whole_frames():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_LONG).eval()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, 16, 5, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 16, 32, generator=g), return_dict=False)  # 5 frames x 16
    with torch.no_grad():
        expected = model(**kwargs)[0]
    seen, handles = count_ffn_rows(model)
    with dit_accel.accelerated(model, {"memory": {"slice_tokens": 40, "slice_by": "frames"}}), torch.no_grad():
        got = model(**kwargs)[0]
    for h in handles:
        h.remove()
    assert seen[:3] == [32, 32, 16], "40 tokens hold two whole frames of 16 tokens: slices of 2, 2, 1 frames"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_composes_with_a_cache_section():
    pipe = tiny_pipeline("wan")
    cache = {"cache": {"method": "fora", "interval": 2}}
    with dit_accel.accelerated(pipe, cache):
        expected = tiny_generate(pipe, "wan")
        reference = dit_accel.stats(pipe)
    with dit_accel.accelerated(pipe, {**cache, "memory": {"slice_tokens": SLICE}}):
        got = tiny_generate(pipe, "wan")
        stats = dit_accel.stats(pipe)
    assert stats.reused == reference.reused and stats.blocks_reused > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_regional_compile_traces_the_slices_fullgraph_and_compiles_once():
    from torch._dynamo.utils import counters

    graphs_with_slices: list[bool] = []

    def recording_backend(gm, example_inputs):
        graphs_with_slices.append(any("narrow" in str(node.target) for node in gm.graph.nodes))
        return gm.forward

    pipe = tiny_pipeline("wan")
    expected = tiny_generate(pipe, "wan")
    torch._dynamo.reset()
    counters.clear()
    for block in pipe.transformer.blocks:  # regional compilation, as compile_repeated_blocks does
        block.compile(backend=recording_backend, fullgraph=True)  # a graph break inside a block would raise
    dit_accel.accelerate(pipe, {"memory": {"slice_tokens": SLICE}})
    try:
        got = tiny_generate(pipe, "wan")
        graphs = counters["stats"]["unique_graphs"]
        again = tiny_generate(pipe, "wan")
    finally:
        dit_accel.remove(pipe)
        for block in pipe.transformer.blocks:
            block.__dict__.pop("_compiled_call_impl", None)
        torch._dynamo.reset()
    assert graphs_with_slices and all(graphs_with_slices), "the slices are traced inside the blocks' graphs"
    assert counters["stats"]["unique_graphs"] == graphs, "the second generation compiled nothing"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_one_compiled_graph_serves_every_block_of_a_deep_stack():
    # a per-module forward (a diffusers ModelHook's partial) would be a guard per block: 12 graphs, and dynamo's
    # recompile limit (8) fails the 9th block under fullgraph=True
    from diffusers import WanTransformer3DModel
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**WAN_LONG, "num_layers": 12, "ffn_dim": 64, "attention_head_dim": 16,
                                     "text_dim": 16, "freq_dim": 16}).eval()
    kwargs = dict(hidden_states=torch.randn(1, 16, 2, 8, 8), encoder_hidden_states=torch.randn(1, 8, 16),
                  return_dict=False)
    graphs = []
    for policy in ({}, {"memory": {"slice_tokens": 10}}):
        torch._dynamo.reset()
        counters.clear()
        dit_accel.accelerate(model, {**policy, "compile": {"backend": "eager"}})
        try:
            with torch.no_grad():
                for step in range(3):
                    model(timestep=torch.tensor([900.0 - 100 * step]), **kwargs)
        finally:
            dit_accel.remove(model)
            torch._dynamo.reset()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] <= 2, graphs  # the first block carries the runtime's context hook: its own graph


def test_refusals():
    sana = tiny_transformer("sana")
    with pytest.raises(dit_accel.PolicyError, match="GLUMBConv"):
        dit_accel.accelerate(sana, {"memory": {}})
    assert not dit_accel.is_accelerated(sana)
    assert not any(hasattr(b.ff, "_diffusers_hook") for b in sana.transformer_blocks)
    for bad, words in (({"slice_tokens": 0}, "memory.slice_tokens"), ({"slice_tokens": 1.5}, "integer"),
                       ({"slice_by": "rows"}, "memory.slice_by"), ({"chunks": 4}, "unknown key")):
        with pytest.raises(dit_accel.PolicyError, match=words):
            dit_accel.load_policy({"memory": bad})
    policy = dit_accel.load_policy({"memory": {"slice_tokens": 4096, "slice_by": "frames"}})
    assert dit_accel.load_policy(policy.to_dict()) == policy
    unknown = torch.nn.Sequential(tiny_transformer("wan").blocks)  # a class no adapter knows: blocks named by hand
    with pytest.raises(dit_accel.PolicyError, match="declares no FFN"):
        dit_accel.accelerate(unknown, {"memory": {}}, blocks=["0"], block_returns=("hidden",))
