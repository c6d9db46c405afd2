"""dit_accel.tune on a tiny pipeline: the search loop, the fewer-steps refusal, the store, the folder."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import dit_accel
from dit_accel.caching.base import CacheMethod, CachePlan, register_cache_method
from dit_accel.caching.fora import FORAConfig
from dit_accel.config import PolicyError
from dit_accel.eval import tune as tune_module
from dit_accel.eval.metrics import psnr
from dit_accel.eval.tune import HOLDOUT_SEED, tune
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

# tiny SD3 (flow matching, batched CFG), scored on its latents: its outputs follow the schedule closely enough
# that fewer steps and broken caches show (the tiny DiT's decoded images hardly depend on the model)
STEPS = 8
PROMPTS = ["a cat", "a dog"]
CALL = {k: v for k, v in tiny_call_kwargs("sd3").items() if k not in ("prompt", "generator", "num_inference_steps")}
FAST = dict(num_inference_steps=STEPS, seeds=1, holdout_seeds=1, timing_repeats=1, timing_warmup=0, progress=False,
            **CALL)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd3")


@pytest.fixture(scope="module")
def tuned(pipe, tmp_path_factory):
    store = tmp_path_factory.mktemp("tune-store")
    return tune(pipe, PROMPTS, target_speedup=2.0, methods=["fora", "fbcache"], speed="compute", store=store,
                **FAST), store


def _generate(pipe, policy, steps, prompt, seed):
    kwargs = dict(CALL, prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    if policy is None:
        return pipe(**kwargs).images
    with dit_accel.accelerated(pipe, policy):
        return pipe(**kwargs).images


def test_search_returns_a_validated_policy_that_beats_fewer_steps(pipe, tuned):
    result, _ = tuned
    assert result.policy is not None and result.chosen is not None, result.explanation
    chosen = result.chosen
    assert chosen.share <= 0.5 * 1.05 and chosen.speed >= 2.0 * 0.95 and chosen.speed_basis == "compute share"
    assert chosen.competitor_steps == round(STEPS * chosen.share)
    # the claim checked independently on the held-out pair: the policy beats fewer steps at its compute share
    base = _generate(pipe, None, STEPS, PROMPTS[0], HOLDOUT_SEED)
    mine = psnr(_generate(pipe, result.policy, STEPS, PROMPTS[0], HOLDOUT_SEED), base)
    rival = psnr(_generate(pipe, None, chosen.competitor_steps, PROMPTS[0], HOLDOUT_SEED), base)
    assert mine > rival
    # tuned policies carry guardrails, recorded at the tuned step count
    assert result.policy.guardrails is not None and result.policy.guardrails.calls == STEPS
    # successive halving: rung 0 ran every candidate on one pair, only survivors ran on both
    assert {len(t.scores) for t in result.trials} == {1, 2}
    assert all(len(t.scores) == 1 for t in result.trials if t.share > 0.5 * 1.05)
    assert "held-out" in result.table() and chosen.trial.candidate.label in result.table()


def test_rerun_regenerates_nothing(pipe, tuned):
    result, store = tuned
    outputs = sorted(p.name for p in store.rglob("*.pt"))
    again = tune(pipe, PROMPTS, target_speedup=2.0, methods=["fora", "fbcache"], speed="compute", store=store, **FAST)
    assert sorted(p.name for p in store.rglob("*.pt")) == outputs
    assert [t.scores for t in again.trials] == [t.scores for t in result.trials]


def test_saved_folder_carries_the_measurements(tuned, tmp_path):
    result, _ = tuned
    folder = result.save_pretrained(tmp_path / "tuned")
    assert dit_accel.Policy.from_pretrained(folder).to_dict().keys() == result.policy.to_dict().keys()
    card = (folder / "README.md").read_text()
    assert "held-out PSNR (dB)" in card and f"{result.chosen.score:.2f}" in card


@dataclass(frozen=True)
class _BrokenConfig(FORAConfig):
    """FORA whose reused steps return a model output shifted far off (a broken cache: it must lose to fewer
    steps)."""


@register_cache_method("_shifted", _BrokenConfig)
class _Shifted(CacheMethod):
    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=((0, num_blocks),))

    def should_reuse(self, range_id, state) -> bool:
        return state.step % 2 == 1 and range_id in state.residuals

    def adjust_output(self, output, state):
        if not state.reuse.get(0):
            return None
        return (output[0] + 10.0, *output[1:]) if isinstance(output, tuple) else type(output)(output.sample + 10.0)


def test_refuses_a_policy_that_loses_to_fewer_steps(pipe, monkeypatch):
    monkeypatch.setitem(tune_module.GRIDS, "skip", lambda t: [{"method": "fora", "interval": 2}])
    monkeypatch.setattr(tune_module, "_candidates", lambda engine, methods, *a: [
        tune_module.Candidate("skip", "skip", dit_accel.Policy(name="skip", cache=_BrokenConfig()), STEPS)])
    result = tune(pipe, PROMPTS, target_speedup=2.0, methods=["skip"], guardrails=False, **FAST)
    assert result.policy is None and "fewer-steps competitor" in result.explanation
    (v,) = result.validations
    assert v.margin <= 0 and v.competitor_steps == STEPS // 2


def test_unreachable_target_returns_the_front(pipe):
    result = tune(pipe, PROMPTS[:1], target_speedup=50.0, methods=["fora"], **FAST)
    assert result.policy is None and not result.validations and "no candidate reached" in result.explanation
    assert result.pareto and all(t.share < 1.0 for t in result.pareto)


def test_bad_arguments(pipe):
    with pytest.raises(PolicyError, match="target_speedup"):
        tune(pipe, PROMPTS, target_speedup=1.0, **FAST)
    with pytest.raises(PolicyError, match="unknown method"):
        tune(pipe, PROMPTS, methods=["fastest"], **FAST)
    with pytest.raises(PolicyError, match="generator"):
        tune(pipe, PROMPTS, generator=torch.Generator(), **FAST)
    with pytest.raises(PolicyError, match="fidelity metric"):
        tune(pipe, PROMPTS, metric="fid", **FAST)
    with pytest.raises(PolicyError, match="budget_minutes"):
        tune(pipe, PROMPTS, budget_minutes=0, **FAST)
    with dit_accel.accelerated(pipe, "fora"), pytest.raises(PolicyError, match="remove"):
        tune(pipe, PROMPTS, **FAST)


def test_command_line(tmp_path):
    from dit_accel.cli import main

    rc = main(["tune", "--model", "tiny-sd3", "--prompts", "builtin:2", "--target", "2", "--speed", "compute",
               "--methods", "fora", "--seeds", "1", "--holdout-seeds", "1", "--repeats", "1", "--no-progress",
               "--out", str(tmp_path / "tuned")])
    assert rc == 0 and dit_accel.Policy.from_pretrained(tmp_path / "tuned").cache.method == "fora"
    assert main(["tune", "--model", "tiny-sd3", "--target", "60", "--methods", "fora", "--seeds", "1",
                 "--holdout-seeds", "1", "--no-progress"]) == 1  # unreachable: no policy, exit status 1


def test_wall_clock_times_every_held_out_pair(pipe, monkeypatch):
    """One timed sample generates every held-out pair, as the share and the score average over all of them."""
    from types import SimpleNamespace

    seen: list[tuple[str, int, int]] = []
    real = tune_module._Engine.call_args

    def spy(self, prompt, seed, steps):
        seen.append((prompt, seed, steps))
        return real(self, prompt, seed, steps)

    monkeypatch.setattr(tune_module._Engine, "call_args", spy)
    winner = SimpleNamespace(policy=dit_accel.Policy(name="fora", cache={"method": "fora", "interval": 2}),
                             competitor_steps=STEPS // 2)
    pairs = [(0, HOLDOUT_SEED), (1, HOLDOUT_SEED), (0, HOLDOUT_SEED + 1)]
    engine = tune_module._Engine(pipe, PROMPTS, CALL, STEPS, "psnr", None, False)
    base_ms, _ = tune_module._time(engine, [winner], pairs, 0, 2, "wall", [])
    expected = {(PROMPTS[i], s, n) for i, s in pairs for n in (STEPS, STEPS // 2)}
    assert set(seen) == expected and len(seen) == 2 * len(pairs) * 3  # 2 rounds x 3 pairs x (base, cand, rival)
    assert base_ms > 0 and winner.wall_speedup > 0 and winner.wall_range[0] <= winner.wall_speedup


def _fake_timings(ms: dict[str, float]):
    """Stand-in for the interleaved timing: fixed times per variant (the lever logic, not the clock, is tested)."""
    from dit_accel.eval.timing import Timing

    def fake(variants, timer, warmup, repeats, progress=None):
        out = {}
        for label, (setup, call, teardown) in variants.items():
            setup()
            try:
                call(0)
            finally:
                teardown()
            t = ms.get(label, 100.0)
            out[label] = Timing(e2e_ms=[t, t * 1.01, t * 0.99], transformer_ms=[t, t, t])
        return out
    return fake


SLICES = {"name": "slices", "memory": {"slice_tokens": 8}}  # exact up to rounding: a quality-neutral lever


def test_a_measured_lever_joins_every_candidate_and_the_competitor(pipe, monkeypatch):
    from dit_accel.eval import tune_levers

    monkeypatch.setattr(tune_levers, "interleaved", _fake_timings({"baseline": 100.0, "slices": 50.0}))
    result = tune(pipe, PROMPTS, target_speedup=4.0, methods=["fora"], speed="compute", levers=[SLICES], **FAST)
    (lever,) = result.levers
    assert lever.kept and lever.speedup == pytest.approx(2.0) and lever.score > 40.0
    assert result.competitor["levers"] == ["slices"]
    assert all(t.candidate.label.endswith("+ slices") and t.candidate.policy.memory is not None for t in result.trials)
    # the cache only has to reach 4 / 2 = 2x: its compute share target is 1/2, and the speed counts the lever
    assert result.policy is not None, result.explanation
    chosen = result.chosen
    assert result.policy.memory.slice_tokens == 8 and chosen.share <= 0.5 * 1.05
    assert chosen.speed == pytest.approx(2.0 / chosen.share) and "levers" in chosen.speed_basis
    assert "Levers alone" in result.table()


def test_a_lever_that_does_not_speed_up_is_dropped(pipe, monkeypatch):
    from dit_accel.eval import tune_levers

    monkeypatch.setattr(tune_levers, "interleaved", _fake_timings({"baseline": 100.0, "slices": 104.0}))
    result = tune(pipe, PROMPTS, target_speedup=2.0, methods=["fora"], speed="compute", levers=[SLICES], **FAST)
    (lever,) = result.levers
    assert not lever.kept and "not a measured gain" in lever.reason
    assert result.policy is not None and result.policy.memory is None and result.competitor["levers"] == []
    assert not any("+ slices" in t.candidate.label for t in result.trials)


def test_bad_levers(pipe):
    with pytest.raises(PolicyError, match="unknown lever"):
        tune(pipe, PROMPTS, levers=["warp"], **FAST)
    with pytest.raises(PolicyError, match="must be a list"):
        tune(pipe, PROMPTS, levers="compile", **FAST)
    with pytest.raises(PolicyError, match="policy sections"):
        tune(pipe, PROMPTS, levers=[{"name": "x", "cache": {"method": "fora"}}], **FAST)
    with pytest.raises(PolicyError, match="slice_tokens"):
        tune(pipe, PROMPTS, levers=[{"memory": {"slice_tokens": 0}}], **FAST)
