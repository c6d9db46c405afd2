"""Sparse attention inside the tiny pipelines of every tier-1 family: routing, dense warm-up and layers,
off/remove bit-exactness, per-branch and per-generation state, composition with a cache section."""

import pytest
import torch

import dit_accel
from dit_accel.adapters import get_adapter
from dit_accel.runtime import attention as processor_module
from dit_accel.runtime.attention_route import RoutedProcessor as SparseAttentionProcessor
from dit_accel.testing import FAMILIES, tiny_generate, tiny_pipeline

# Sizes with several 16-token blocks of visual tokens (DiT's transformer has a fixed 4x4 grid).
SIZES = {"flux": dict(height=64, width=64), "sd3": dict(height=64, width=64), "pixart": dict(height=64, width=64),
         "dit": dict(), "wan": dict(height=64, width=64, num_frames=9),
         "hunyuan_video": dict(height=64, width=64, num_frames=9),
         "cogvideox": dict(height=64, width=64, num_frames=17)}


def _attention_modules(pipe):
    adapter = get_adapter(pipe.transformer)
    return [getattr(b.module, adapter.attention_module) for b in adapter.blocks(pipe.transformer)]


def _policy(**kw):
    return {"name": "sparse", "attention": {"sparse": {"method": "topp", "density": 0.5}, "block_size": 16,
                                            "warmup_steps": 1, **kw}}


@pytest.fixture(scope="module")
def baselines():
    cache = {}

    def get(family):
        if family not in cache:
            pipe = tiny_pipeline(family)
            cache[family] = (pipe, tiny_generate(pipe, family, **SIZES[family]))
        return cache[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_runs_through_every_self_attention_and_remove_is_exact(family, baselines):
    pipe, base = baselines(family)
    originals = {}
    dit_accel.accelerate(pipe, _policy())
    try:
        for attn in _attention_modules(pipe):
            assert isinstance(attn.processor, SparseAttentionProcessor)
            originals[id(attn)] = attn.processor.original
        out = tiny_generate(pipe, family, **SIZES[family])
        stats = dit_accel.stats(pipe)
        modules = _attention_modules(pipe)
    finally:
        dit_accel.remove(pipe)
    att = stats.extra["attention"]
    calls = att["calls"]
    assert calls["dense_unhandled"] == 0 and calls["sparse"] > 0
    assert calls["dense_warmup"] * 3 == calls["sparse"]  # 4 steps, the first dense
    if family != "dit":  # DiT's 16 tokens are one block
        assert att["sparse_density"] < 0.9
        assert not torch.equal(out, base)
    assert torch.isfinite(out).all()
    assert "sparse self-attention calls" in stats.summary()
    for attn in modules:  # the original processor objects are back
        assert attn.processor is originals[id(attn)]
    assert torch.equal(tiny_generate(pipe, family, **SIZES[family]), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_dense_section_is_bit_exact(family, baselines):
    pipe, base = baselines(family)
    with dit_accel.accelerated(pipe, _policy(warmup_steps=100)):
        out = tiny_generate(pipe, family, **SIZES[family])
        calls = dit_accel.stats(pipe).extra["attention"]["calls"]
    assert torch.equal(out, base)
    assert calls["sparse"] == 0 and calls["dense_warmup"] > 0


def test_dense_layers_and_cross_attention_stay_untouched(baselines):
    pipe, _ = baselines("pixart")
    with dit_accel.accelerated(pipe, _policy(dense_layers=[0, 2])):
        tiny_generate(pipe, "pixart", **SIZES["pixart"])
        calls = dit_accel.stats(pipe).extra["attention"]["calls"]
        blocks = pipe.transformer.transformer_blocks
        assert all(not isinstance(b.attn2.processor, SparseAttentionProcessor) for b in blocks)
    # 4 layers x 4 steps: step 0 dense (4), layers 0 and 2 dense on steps 1-3 (6), the rest sparse (6)
    assert calls == {"sparse": 6, "quant_dense": 0, "dense_warmup": 4, "dense_layer": 6, "dense_unhandled": 0}


@pytest.mark.parametrize("family", ["wan", "sd3"])  # separate and batched CFG
def test_svg2_state_is_per_branch_and_reset_per_generation(family, baselines, monkeypatch):
    pipe, _ = baselines(family)
    firsts = []
    original = processor_module.joint_attention

    def spy(q, k, v, visual, request, *args, **kwargs):
        firsts.append(request.svg2_first)
        return original(q, k, v, visual, request, *args, **kwargs)

    monkeypatch.setattr(processor_module, "joint_attention", spy)
    policy = _policy(reorder="svg2", svg2={"q_clusters": 6, "k_clusters": 6})
    with dit_accel.accelerated(pipe, policy):
        first = tiny_generate(pipe, family, **SIZES[family])
        n_first = list(firsts)
        stats1 = dit_accel.stats(pipe).extra["attention"]
        firsts.clear()
        second = tiny_generate(pipe, family, **SIZES[family])
        stats2 = dit_accel.stats(pipe).extra["attention"]
    branches = 2 if family == "wan" else 1  # separate CFG: cond and uncond calls each keep their centroids
    blocks = 4
    assert sum(n_first) == branches * blocks          # k-means from scratch once per branch and layer
    assert n_first == firsts                          # the second generation starts from scratch again
    assert torch.equal(first, second)                 # nothing leaks from one generation to the next
    assert stats1 == stats2                           # statistics are per generation


def test_composes_with_a_cache_section(baselines):
    pipe, base = baselines("flux")
    policy = {**_policy(), "cache": {"method": "fora", "interval": 2}}
    with dit_accel.accelerated(pipe, policy):
        out = tiny_generate(pipe, "flux", **SIZES["flux"])
        stats = dit_accel.stats(pipe)
    assert stats.blocks_reused > 0 and stats.extra["attention"]["calls"]["sparse"] > 0
    assert torch.isfinite(out).all()
    assert torch.equal(tiny_generate(pipe, "flux", **SIZES["flux"]), base)


def test_calibrated_paro_and_static_masks_run(baselines, tmp_path):
    from dit_accel.testing import tiny_call_kwargs

    pipe, _ = baselines("wan")
    kwargs = tiny_call_kwargs("wan", **SIZES["wan"])
    kwargs.pop("prompt")
    policy = {"name": "paro-static", "attention": {"sparse": {"method": "static", "threshold": 0.5},
                                                    "reorder": "paro", "block_size": 16, "warmup_steps": 1}}
    calibrated = dit_accel.calibrate(pipe, ["a cat"], policy, **kwargs)
    att = calibrated.attention
    assert len(att.paro_orders) == 4 and all(len(h) == 2 for h in att.paro_orders)
    assert att.sparse.masks["grid"] == [3, 4, 4] and set(att.sparse.masks["layers"]) == {0, 1, 2, 3}
    calibrated.save(tmp_path / "p.yaml")
    with dit_accel.accelerated(pipe, str(tmp_path / "p.yaml")):
        tiny_generate(pipe, "wan", **SIZES["wan"])
        att_stats = dit_accel.stats(pipe).extra["attention"]
    assert att_stats["calls"]["sparse"] == 24 and att_stats["sparse_density"] < 1.0


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "dit"])
def test_quantized_dense_attention_section(family, baselines):
    """``attention: {sparse: null, quant: int8}``: every self-attention call after the warm-up runs the
    quantized kernel densely (joint text included); close to, not equal to, the baseline; remove is exact."""
    pipe, base = baselines(family)
    policy = {"name": "qattn", "attention": {"sparse": None, "quant": "int8", "warmup_steps": 1, "dense_layers": [0]}}
    with dit_accel.accelerated(pipe, policy):
        out = tiny_generate(pipe, family, **SIZES[family])
        stats = dit_accel.stats(pipe)
    calls = stats.extra["attention"]["calls"]
    assert calls["quant_dense"] > 0 and calls["sparse"] == 0 and calls["dense_unhandled"] == 0
    assert calls["dense_layer"] > 0 and calls["dense_warmup"] > 0
    assert "quantized dense" in stats.summary() and "dense+int8" in stats.summary()
    assert not torch.equal(out, base)
    rel = ((out - base).norm() / base.norm()).item()
    assert rel < 0.05, rel
    assert torch.equal(tiny_generate(pipe, family, **SIZES[family]), base)


@pytest.mark.parametrize("reorder", ["none", "svg2"])
def test_selection_reused_between_refreshes(reorder, baselines):
    """``sparse.refresh_interval: 2``: each layer (per CFG branch) scores and selects blocks on every other
    sparse step and reuses that permutation + mask in between; interval 1 selects on every call."""
    pipe, _ = baselines("wan")
    svg2 = {"svg2": {"q_clusters": 4, "k_clusters": 4}} if reorder == "svg2" else {}
    policy = lambda interval: {"name": "reuse", "attention": {  # noqa: E731
        "sparse": {"method": "xattention", "threshold": 0.5, "refresh_interval": interval}, "reorder": reorder,
        "block_size": 16, "warmup_steps": 1, **svg2}}
    with dit_accel.accelerated(pipe, policy(1)):
        every = tiny_generate(pipe, "wan", **SIZES["wan"])
        att1 = dit_accel.stats(pipe).extra["attention"]
    with dit_accel.accelerated(pipe, policy(2)):
        reused = tiny_generate(pipe, "wan", **SIZES["wan"])
        att2 = dit_accel.stats(pipe).extra["attention"]
        again = tiny_generate(pipe, "wan", **SIZES["wan"])  # a new generation starts without old selections
    sparse = att1["calls"]["sparse"]
    assert att1["selections"] == sparse and att2["calls"]["sparse"] == sparse
    # 4 steps, the first dense: sparse steps 1, 2, 3 -> selections at steps 1 and 3 of each layer and branch
    assert att2["selections"] * 3 == sparse * 2
    assert torch.isfinite(reused).all() and not torch.equal(reused, every)
    assert torch.equal(again, reused)


def test_sparse_and_quantized_attention_compose(baselines):
    """``sparse`` + ``quant: int8``: the kept blocks run the quantized kernel; close to the bf16 sparse output."""
    pipe, _ = baselines("flux")
    outs = {}
    for quant in ("none", "int8"):
        with dit_accel.accelerated(pipe, _policy(quant=quant)):
            outs[quant] = tiny_generate(pipe, "flux", **SIZES["flux"])
            calls = dit_accel.stats(pipe).extra["attention"]["calls"]
        assert calls["sparse"] > 0 and calls["quant_dense"] == 0
    assert not torch.equal(outs["none"], outs["int8"])
    assert ((outs["int8"] - outs["none"]).norm() / outs["none"].norm()).item() < 0.05
