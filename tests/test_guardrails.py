"""Runtime guardrails (dit_accel.guardrail_config, dit_accel.runtime.guardrails): a calibration mismatch, an
out-of-range statistic and a non-finite output each fall back to computing and are counted in the stats;
calls in range are unchanged."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

import dit_accel
from dit_accel.caching.base import CacheMethod, CachePlan, register_cache_method
from dit_accel.caching.fora import FORAConfig
from dit_accel.calibration import record_guardrails
from dit_accel.config import PolicyError
from dit_accel.guardrail_config import GuardrailConfig
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

STEPS = 8
FORA = dit_accel.Policy(name="fora2", cache={"method": "fora", "interval": 2})


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("dit")


def _run(pipe, policy=None, steps=STEPS, seed=0):
    kwargs = tiny_call_kwargs("dit", seed=seed, num_inference_steps=steps)
    if policy is None:
        return pipe(**kwargs).images, None
    with dit_accel.accelerated(pipe, policy):
        out = pipe(**kwargs).images
        return out, dit_accel.stats(pipe)


@pytest.fixture(scope="module")
def guarded(pipe):
    prompts = [{**{k: v for k, v in tiny_call_kwargs("dit", seed=s).items() if k != "num_inference_steps"}}
               for s in (0, 1)]
    return record_guardrails(pipe, prompts, FORA, num_inference_steps=STEPS)


def test_record_fills_the_section(guarded):
    g = guarded.guardrails
    assert g.model == "DiTTransformer2DModel" and g.calls == STEPS and g.blocks >= 1
    assert g.scheduler is not None and g.sample_shape is not None
    (branch, table), = g.input_change.items()
    assert len(table["lo"]) == STEPS and math.isnan(table["lo"][0])  # step 0 has no previous call
    assert all(lo <= hi for lo, hi in zip(table["lo"][1:], table["hi"][1:]))


def test_in_range_outputs_unchanged(pipe, guarded):
    plain, plain_stats = _run(pipe, FORA, seed=0)
    out, stats = _run(pipe, guarded, seed=0)
    assert torch.equal(out, plain)
    assert stats.extra["guardrails"]["fallbacks"] == 0
    assert stats.blocks_reused == plain_stats.blocks_reused > 0


def test_step_mismatch_falls_back_and_counts(pipe, guarded):
    baseline, _ = _run(pipe, None, steps=6)
    out, stats = _run(pipe, guarded, steps=6)
    g = stats.extra["guardrails"]
    assert g["mismatch"] == g["fallbacks"] > 0 and stats.blocks_reused == 0
    assert any("6 calls per branch" in r for r in g["reasons"])
    assert torch.equal(out, baseline)  # every step computed: the unaccelerated output


def test_scheduler_mismatch_falls_back(pipe, guarded):
    g = dataclasses.replace(guarded.guardrails, scheduler="OtherScheduler")
    policy = dataclasses.replace(guarded, guardrails=g)
    _, stats = _run(pipe, policy)
    assert stats.extra["guardrails"]["mismatch"] > 0 and stats.blocks_reused == 0


def test_out_of_range_statistic_falls_back_and_counts(pipe, guarded):
    g = guarded.guardrails
    narrow = {b: {"lo": [v * 1e-6 for v in t["lo"]], "hi": [v * 1e-6 for v in t["hi"]]}
              for b, t in g.input_change.items()}
    policy = dataclasses.replace(guarded, guardrails=dataclasses.replace(g, input_change=narrow, margin=0.0))
    baseline, _ = _run(pipe, None)
    out, stats = _run(pipe, policy)
    counts = stats.extra["guardrails"]
    assert counts["out_of_range"] == counts["fallbacks"] > 0 and counts["mismatch"] == 0
    assert stats.blocks_reused == 0 and torch.equal(out, baseline)


@dataclass(frozen=True)
class _NanConfig(FORAConfig):
    """FORA whose reused steps return NaN (a broken cache, for the non-finite guardrail)."""


@register_cache_method("_nan_reuse", _NanConfig)
class _NanReuse(CacheMethod):
    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=((0, num_blocks),))

    def should_reuse(self, range_id, state) -> bool:
        return state.step % 2 == 1 and range_id in state.residuals

    def reused_output(self, range_id, hidden, encoder, state):
        return hidden * float("nan"), encoder


def test_nonfinite_output_is_recomputed(pipe):
    broken = dit_accel.Policy(name="nan", cache=_NanConfig(interval=2))
    out, _ = _run(pipe, broken)
    assert not torch.isfinite(out).all()  # without guardrails the NaN reaches the image
    baseline, _ = _run(pipe, None)
    out, stats = _run(pipe, dataclasses.replace(broken, guardrails=GuardrailConfig()))
    counts = stats.extra["guardrails"]
    assert counts["nonfinite"] == counts["fallbacks"] == STEPS // 2
    assert stats.blocks_reused == 0 and torch.equal(out, baseline)


def test_disabled_guardrails_do_nothing(pipe, guarded):
    g = dataclasses.replace(guarded.guardrails, enabled=False, calls=3)
    _, stats = _run(pipe, dataclasses.replace(guarded, guardrails=g))
    assert "guardrails" not in stats.extra and stats.blocks_reused > 0


def test_section_round_trips_and_validates(guarded):
    data = guarded.to_dict()
    assert dit_accel.Policy.from_dict(data).guardrails == guarded.guardrails
    with pytest.raises(PolicyError, match="guardrails.input_change"):
        GuardrailConfig(input_change={"default": {"lo": [0.2], "hi": [0.1]}})
    with pytest.raises(PolicyError, match="guardrails.input_change"):
        GuardrailConfig(input_change={"default": {"lo": [0.1, 0.2], "hi": [0.3]}})
    with pytest.raises(PolicyError, match="guardrails.sample_shape"):
        GuardrailConfig(sample_shape=[4, -1])
    with pytest.raises(PolicyError, match="unknown key"):
        dit_accel.Policy.from_dict({"name": "x", "guardrails": {"margn": 1.0}})
