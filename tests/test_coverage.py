"""Model coverage: docs/models.md is the generated report of the installed diffusers; two-transformer
pipelines are handled (Wan 2.2 experts), multi-stream / multi-stage ones refused with a clear error (LTX-2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dit_accel
from dit_accel.adapters import ADAPTERS, get_adapter
from dit_accel.testing import coverage, family_names, get_family, tiny_call_kwargs, tiny_transformer

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.fixture(scope="module")
def report():
    return coverage.rows()


def test_models_md_is_current(report):
    import diffusers

    if f"diffusers {diffusers.__version__}:" not in DOC.read_text():  # the report is of one diffusers release
        pytest.skip(f"docs/models.md was generated with another diffusers release than {diffusers.__version__}")
    assert DOC.read_text() == coverage.render(report), (
        "docs/models.md is out of date: python -m dit_accel.testing.coverage --write docs/models.md")


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
    assert len(supported) >= 24


def test_unsupported_class_is_refused_with_the_supported_list():
    """LTX-2 (audio-video two-stream blocks, two-stage pipeline): the unsupported-model error, naming every
    supported class and the generic route. Only the class matters to get_adapter: an uninitialised instance."""
    from diffusers import LTX2VideoTransformer3DModel

    model = LTX2VideoTransformer3DModel.__new__(LTX2VideoTransformer3DModel)
    with pytest.raises(dit_accel.PolicyError) as info:
        get_adapter(model)
    message = str(info.value)
    assert "LTX2VideoTransformer3DModel is not a supported transformer" in message
    assert all(name in message for name in ADAPTERS) and "blocks=" in message


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
