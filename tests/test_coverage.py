"""Model coverage: docs/models.md is the generated report of the installed diffusers; two-transformer
pipelines are handled (Wan 2.2 experts), multi-stream / multi-stage ones refused with a clear error (LTX-2, a
latent-upsampler stage, a pipeline with a denoiser outside ``transformer`` / ``transformer_2``), all or nothing;
cached ranges across the text/image stream join (FLUX.2, Chroma, AuraFlow)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import dit_accel
from dit_accel.adapters import ADAPTERS, get_adapter
from dit_accel.testing import coverage, family_names, get_family, tiny_call_kwargs, tiny_transformer

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
README = DOC.parents[1] / "README.md"


@pytest.fixture(scope="module")
def report():
    return coverage.rows()


def test_models_md_is_current(report):
    import diffusers

    if f"diffusers {diffusers.__version__}:" not in DOC.read_text():  # the report is of one diffusers release
        pytest.skip(f"docs/models.md was generated with another diffusers release than {diffusers.__version__}")
    assert DOC.read_text() == coverage.render(report), (
        "docs/models.md is out of date: python -m dit_accel.testing.coverage --write docs/models.md")


def test_readme_model_paragraph_is_current(report):
    import diffusers

    if f"diffusers {diffusers.__version__}:" not in DOC.read_text():  # generated together with docs/models.md
        pytest.skip(f"the README's model paragraph was generated with diffusers other than {diffusers.__version__}")
    readme = README.read_text()
    assert coverage.replace_readme_section(readme, report) == readme, (
        "README.md's model paragraph is out of date: python -m dit_accel.testing.coverage --readme README.md")
    assert f"{sum(r.status == 'supported' for r in report)} diffusion-transformer families" in readme


def test_report_lists_every_transformer_class_once(report):
    names = [row.name for row in report]
    assert names == sorted(coverage.transformer_classes()) and len(set(names)) == len(names)
    assert {"FluxTransformer2DModel", "QwenImageTransformer2DModel", "LTX2VideoTransformer3DModel"} <= set(names)
    assert all(row.status in ("supported", "generic", "not supported") for row in report)
    assert all(row.why for row in report if row.status != "supported")


def test_supported_means_adapter_and_tiny_pipeline(report):
    """Every registered family is a supported row and every supported row is a registered family with an adapter
    (the conformance suite runs every registered family)."""
    supported = {row.name: row for row in report if row.status == "supported"}
    records = {get_family(name).transformer_class: name for name in family_names(tier=None)}
    assert set(supported) == set(records)
    for name, row in supported.items():
        assert name in ADAPTERS and row.family == ADAPTERS[name].family == records[name]
    assert len(supported) >= 25


def test_unsupported_class_is_refused_with_the_supported_list():
    """A class with no adapter: the unsupported-model error, naming every supported class and the generic route.
    Only the class matters to get_adapter: an uninitialised instance."""
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel.__new__(LatteTransformer3DModel)
    with pytest.raises(dit_accel.PolicyError) as info:
        get_adapter(model)
    message = str(info.value)
    assert "LatteTransformer3DModel is not a supported transformer" in message
    assert all(name in message for name in ADAPTERS) and "blocks=" in message


def _tiny_ltx2():
    from diffusers import LTX2VideoTransformer3DModel

    return LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8,
                                       audio_num_attention_heads=2, audio_attention_head_dim=8,
                                       audio_cross_attention_dim=16, num_layers=1, caption_channels=16)


def _no_footprint(module: torch.nn.Module) -> bool:
    return all(not hasattr(m, "_diffusers_hook") and not m._forward_pre_hooks and not m._forward_hooks
               for m in module.modules())


def test_ltx2_is_refused_also_by_hand_with_nothing_attached():
    """LTX-2's blocks update a video and an audio stream: refused with its reason, also through the generic route
    (``blocks=``, where a cached video residual would leave the audio stream stale), before any hook."""
    from types import SimpleNamespace

    model = _tiny_ltx2()
    for blocks in (None, ["transformer_blocks"]):
        with pytest.raises(dit_accel.PolicyError, match="audio-video blocks") as info:
            dit_accel.accelerate(SimpleNamespace(transformer=model), "fora", blocks=blocks, block_returns=("hidden",))
        assert "also not through blocks=" in str(info.value)
    assert _no_footprint(model)
    assert "LTX2VideoTransformer3DModel" in coverage.REFUSED


def test_stage_without_a_transformer_is_refused():
    """A latent-upsampler stage (LTX-Video's second stage, before its refining denoising pass) has no denoiser."""
    from diffusers import LTXLatentUpsamplePipeline

    with pytest.raises(dit_accel.PolicyError, match="latent upsampler"):
        dit_accel.accelerate(LTXLatentUpsamplePipeline(vae=None, latent_upsampler=None), "fora")


def test_pipeline_with_a_denoiser_elsewhere_is_refused():
    """A diffusers transformer outside transformer / transformer_2 (Ideogram4Pipeline's unconditional_transformer)
    would run untouched beside the accelerated one: refused, nothing attached; its transformer alone is accepted."""
    from diffusers import WanPipeline

    from dit_accel.testing import tiny_pipeline

    base = tiny_pipeline("wan")
    pipe = WanPipeline(**base.components)
    pipe.register_modules(unconditional_transformer=tiny_transformer("wan", seed=3))
    with pytest.raises(dit_accel.PolicyError, match="unconditional_transformer"):
        dit_accel.accelerate(pipe, "fora")
    assert _no_footprint(pipe.transformer) and not dit_accel.is_accelerated(pipe)
    with dit_accel.accelerated(pipe.transformer, "fora"):
        assert dit_accel.is_accelerated(pipe.transformer)
    assert _no_footprint(pipe.transformer)


def test_two_expert_pipeline_is_all_or_nothing():
    """Wan 2.2 layout with a second expert that cannot be accelerated (the same module twice, or an unsupported
    one): refused before the first expert gets a hook."""
    from diffusers import WanPipeline

    from dit_accel.testing import tiny_pipeline

    base = tiny_pipeline("wan")
    same = WanPipeline(**{**base.components, "transformer_2": base.transformer}, boundary_ratio=0.5)
    with pytest.raises(dit_accel.PolicyError, match="same module"):
        dit_accel.accelerate(same, "fora")
    other = WanPipeline(**{**base.components, "transformer_2": torch.nn.Linear(2, 2)}, boundary_ratio=0.5)
    with pytest.raises(dit_accel.PolicyError, match="not a supported transformer"):
        dit_accel.accelerate(other, "fora")
    assert _no_footprint(base.transformer) and not dit_accel.is_accelerated(other)


@pytest.mark.parametrize("family", ["flux2", "chroma", "auraflow"])
def test_cached_range_spans_the_stream_join(family):
    """FLUX.2 / Chroma / AuraFlow join [text, image] after their double-stream blocks: one cached range covers
    both groups, its residual kept in the joined layout. Two identical calls under FORA interval 2: the second
    reuses every block, double-stream ones included, and gives the first's output back (input + residual)."""
    from dit_accel.testing import tiny_pipeline

    pipe = tiny_pipeline(family)
    tr = pipe.transformer
    seen: dict = {}
    handle = tr.register_forward_pre_hook(lambda m, a, k: seen.setdefault("call", (a, dict(k))), with_kwargs=True)
    try:
        pipe(**tiny_call_kwargs(family, num_inference_steps=1))
    finally:
        handle.remove()
    args, kwargs = seen["call"]
    adapter = get_adapter(tr)
    blocks = adapter.blocks(tr)
    assert 0 < adapter.join_index(blocks) < len(blocks)
    with torch.no_grad():
        base = tr(*args, **kwargs)[0]
        with dit_accel.accelerated(tr, {"cache": {"method": "fora", "interval": 2}}):
            dit_accel.reset(tr, num_inference_steps=2)
            # one branch (Chroma's would otherwise be told by the call order; AuraFlow has no cache_context)
            with tr.cache_context("cond") if hasattr(tr, "cache_context") else contextlib.nullcontext():
                first, second = tr(*args, **kwargs)[0], tr(*args, **kwargs)[0]
            stats = dit_accel.stats(tr)
    assert torch.equal(first, base)
    assert stats.reused == [1] * len(blocks), stats.reused
    assert torch.allclose(second, base, rtol=0, atol=1e-5)


def test_probe_across_the_stream_join_is_refused():
    """DBCache's probe compares block 0's input with block fn_compute-1's output: past the join (FLUX.2's tiny
    model has one double-stream block) they have different token layouts, refused at accelerate."""
    from dit_accel.testing import tiny_pipeline

    pipe = tiny_pipeline("flux2")
    with pytest.raises(dit_accel.PolicyError, match="joins its text and image streams"):
        dit_accel.accelerate(pipe, {"cache": {"method": "dbcache", "fn_compute": 2}})
    assert _no_footprint(pipe.transformer)
    with dit_accel.accelerated(pipe, {"cache": {"method": "dbcache", "fn_compute": 1}}):
        pass


def test_separate_cfg_outside_cache_context_gets_its_branches():
    """Lumina2Pipeline (and ChromaPipeline) run cond, then uncond, at each timestep with no cache_context: the
    runtime tells them apart by their order (cond first), so each branch follows its own FORA schedule."""
    from dit_accel.testing import tiny_pipeline

    pipe = tiny_pipeline("lumina2")
    with dit_accel.accelerated(pipe, {"cache": {"method": "fora", "interval": 2}}):
        pipe(**tiny_call_kwargs("lumina2", num_inference_steps=4))
        stats = dit_accel.stats(pipe)
        pipe(**tiny_call_kwargs("lumina2", num_inference_steps=4, cfg_trunc_ratio=0.5))  # uncond on 2 steps only
        truncated = dit_accel.stats(pipe)
    assert stats.calls_per_branch == {"cond": 4, "uncond": 4}, stats.calls_per_branch
    assert stats.reused == [4] * len(stats.reused)  # steps 1 and 3 of each branch
    assert truncated.calls_per_branch == {"cond": 4, "uncond": 2}, truncated.calls_per_branch


def _wan22_pipeline():
    """WanPipeline with two experts (Wan 2.2 A14B layout): transformer for high noise, transformer_2 after the
    boundary; tiny weights of the Wan record (the second expert from another seed)."""
    from diffusers import WanPipeline

    from dit_accel.testing import tiny_pipeline

    pipe = tiny_pipeline("wan")
    two = WanPipeline(**{**pipe.components, "transformer_2": tiny_transformer("wan", seed=7)}, boundary_ratio=0.5)
    two.set_progress_bar_config(disable=True)
    return two


def test_two_expert_pipeline_gets_a_runtime_per_transformer():
    pipe = _wan22_pipeline()

    def run():
        return pipe(**tiny_call_kwargs("wan", num_inference_steps=10)).frames  # shift 5: 8 high-noise steps, 2 low

    base = run()
    calls = {"transformer": 0, "transformer_2": 0}
    handles = [getattr(pipe, name).register_forward_pre_hook(
        lambda *a, name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls]
    try:
        with dit_accel.accelerated(pipe, "none"):
            assert torch.equal(run(), base)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0  # both experts ran
    with dit_accel.accelerated(pipe, {"cache": {"method": "fora", "interval": 2}}):
        out = run()
        stats = {name: dit_accel.stats(getattr(pipe, name)) for name in calls}
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    # each expert caches under its own runtime, with its own steps; together they make the schedule
    assert all(s.blocks_reused > 0 for s in stats.values()), {n: s.reused for n, s in stats.items()}
    assert stats["transformer"].calls_per_branch["cond"] + stats["transformer_2"].calls_per_branch["cond"] == 10
    assert not dit_accel.is_accelerated(pipe)
    assert torch.equal(run(), base)


def test_refining_pass_in_a_second_pipeline_is_a_new_generation():
    """LTX-Video's multi-stage flow: a first pass, then (after a latent upsampler, refused above) a refining pass
    at another resolution and step count through another pipeline around the same transformer. The refining call
    starts a new generation of the transformer's runtime: it equals that call made alone."""
    from diffusers import LTXPipeline

    from dit_accel.testing import tiny_pipeline

    pipe = tiny_pipeline("ltx_video")
    refine = LTXPipeline(**pipe.components)
    refine.set_progress_bar_config(disable=True)
    second = tiny_call_kwargs("ltx_video", num_inference_steps=3, height=192, width=192)
    with dit_accel.accelerated(pipe, {"cache": {"method": "fora", "interval": 2}}):
        alone = refine(**second).frames
        pipe(**tiny_call_kwargs("ltx_video"))
        after = refine(**tiny_call_kwargs("ltx_video", num_inference_steps=3, height=192, width=192)).frames
        stats = dit_accel.stats(refine)
    assert torch.equal(after, alone)
    assert stats.num_inference_steps == 3 and stats.transformer_calls == 3 and stats.blocks_reused > 0
