"""Step Rehash: the threshold rule against the last computed step, profiling through calibration, a threshold
that reuses nothing is bit-exact, the served schedule is the profiled one (per CFG branch), validation and YAML."""

from __future__ import annotations

import logging

import pytest
import torch

import dit_accel
from dit_accel.api import runtimes_of
from dit_accel.caching.step_rehash import StepRehash, StepRehashConfig, rehash_schedule
from dit_accel.testing import tiny_call_kwargs, tiny_generate, tiny_pipeline

PROMPTS = ["a photo of a cat", "a red car on a road"]


def call_kwargs(family: str, steps: int = 6) -> dict:
    kwargs = tiny_call_kwargs(family, num_inference_steps=steps)
    kwargs.pop("prompt")
    return kwargs


def table(sim: dict[tuple[int, int], float], steps: int, default: float = 0.5) -> list[list[float]]:
    """Calibrated rows (sim(t, a) for a < t, t = 1..steps-1) with the given entries, ``default`` elsewhere."""
    return [[sim.get((t, a), default) for a in range(t)] for t in range(1, steps)]


def test_rule_compares_with_the_last_computed_step_not_the_previous_step():
    # adjacent steps are all similar (0.99), but step 3 drifted from step 1 (0.8): computed again
    sim = {(1, 0): 0.5, (2, 1): 0.99, (3, 2): 0.99, (3, 1): 0.8, (4, 3): 0.99, (5, 3): 0.97, (5, 4): 0.99}
    rows = table(sim, 6)
    assert rehash_schedule(rows, 0.9) == [0, 1, 3]  # 2 reuses 1; 3 vs 1 = 0.8 → compute; 4, 5 reuse 3
    assert rehash_schedule(rows, 0.98) == [0, 1, 3, 5]  # 5 vs 3 = 0.97 ≤ 0.98
    assert rehash_schedule(rows, 0.9, max_reuse=1) == [0, 1, 3, 5]  # 4 reuses, then 5 must compute
    assert rehash_schedule(rows, 0.9, warmup_steps=3) == [0, 1, 2, 4]  # 3 reuses 2; 4 vs 2 (0.5): compute
    assert rehash_schedule(rows, 1.0) == list(range(6)), "cosine never exceeds 1: nothing reused"
    assert rehash_schedule(rows, -1.0) == [0], "every similarity exceeds -1 here"
    assert rehash_schedule(table({}, 6, 0.97), 0.97) == list(range(6)), "strictly above the threshold"


def test_calibrated_threshold_one_is_bit_exact_and_low_threshold_reuses_every_later_step():
    family, steps = "pixart", 6
    pipe = tiny_pipeline(family)
    base = tiny_generate(pipe, family, num_inference_steps=steps)
    policy = dit_accel.calibrate(pipe, PROMPTS, "step_rehash", **call_kwargs(family, steps))
    rows = policy.cache.similarity["default"]
    assert [len(r) for r in rows] == list(range(1, steps))
    assert all(-1.0 <= v <= 1.0 for r in rows for v in r)
    assert policy.calibrated_for.calls == steps
    with dit_accel.accelerated(pipe, policy.replace(threshold=1.0)):
        exact = tiny_generate(pipe, family, num_inference_steps=steps)
        stats = dit_accel.stats(pipe)
    assert torch.equal(exact, base)
    assert stats.reused == [0] * len(stats.reused)
    with dit_accel.accelerated(pipe, policy.replace(threshold=-1.0)):
        reused = tiny_generate(pipe, family, num_inference_steps=steps)
        stats = dit_accel.stats(pipe)
    assert stats.reused == [steps - 1] * len(stats.reused) and stats.computed == [1] * len(stats.computed)
    assert not torch.equal(reused, base)


def test_served_schedule_is_the_profiled_one_and_changes_with_the_threshold():
    family, steps = "pixart", 8
    pipe = tiny_pipeline(family)
    policy = dit_accel.calibrate(pipe, PROMPTS[:1], "step_rehash", **call_kwargs(family, steps))
    rows = policy.cache.similarity["default"]
    adjacent = sorted(r[-1] for r in rows)
    seen = set()
    for threshold in (adjacent[0] - 1e-3, adjacent[len(adjacent) // 2], adjacent[-1] + 1e-6):
        expected = rehash_schedule(rows, threshold)
        seen.add(len(expected))
        with dit_accel.accelerated(pipe, policy.replace(threshold=threshold)):
            pipe(prompt=PROMPTS[1], **call_kwargs(family, steps))
            stats = dit_accel.stats(pipe)
            method = next(iter(runtimes_of(pipe).values())).feature("cache").method
        assert isinstance(method, StepRehash) and method.compute_steps("default") == expected
        assert stats.computed == [len(expected)] * len(stats.computed), (threshold, expected)
    assert len(seen) >= 2, "the thresholds picked from the profile should give different schedules"


def test_separate_cfg_branches_get_their_own_profile():
    family, steps = "wan", 5
    pipe = tiny_pipeline(family)
    policy = dit_accel.calibrate(pipe, PROMPTS[:1], "step_rehash", **call_kwargs(family, steps))
    assert set(policy.cache.similarity) == {"cond", "uncond"}
    policy = policy.replace(threshold=-1.0)
    with dit_accel.accelerated(pipe, policy):
        pipe(prompt=PROMPTS[1], **call_kwargs(family, steps))
        stats = dit_accel.stats(pipe)
    assert stats.calls_per_branch == {"cond": steps, "uncond": steps}
    assert stats.computed == [2] * len(stats.computed)  # step 0 of each branch


def test_uncalibrated_and_malformed_tables_are_refused():
    pipe = tiny_pipeline("pixart")
    with pytest.raises(dit_accel.PolicyError, match="calibrate"):
        dit_accel.accelerate(pipe, "step_rehash")
    assert not dit_accel.is_accelerated(pipe)
    with pytest.raises(dit_accel.PolicyError, match="row 1"):
        StepRehashConfig(similarity={"default": [[0.9], [0.9]]})
    with pytest.raises(dit_accel.PolicyError, match="finite"):
        StepRehashConfig(similarity={"default": [[float("nan")]]})
    with pytest.raises(dit_accel.PolicyError, match="threshold"):
        StepRehashConfig(threshold=1.5)
    with pytest.raises(dit_accel.PolicyError, match="fn_compute"):
        dit_accel.accelerate(pipe, {"cache": {"method": "step_rehash", "similarity": {"default": [[0.9]]},
                                              "fn_compute": 2, "bn_compute": 2}})


def test_yaml_round_trip_and_another_step_count_warns(tmp_path, caplog):
    family, steps = "pixart", 8  # 28 similarities: saved in the sidecar
    pipe = tiny_pipeline(family)
    policy = dit_accel.calibrate(pipe, PROMPTS[:1], "step_rehash", **call_kwargs(family, steps))
    policy.save(tmp_path / "p.yaml")
    assert (tmp_path / "p.yaml.safetensors").exists()
    loaded = dit_accel.load_policy(tmp_path / "p.yaml")
    assert loaded == policy
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        with dit_accel.accelerated(pipe, loaded):
            pipe(prompt=PROMPTS[1], **call_kwargs(family, 5))
            pipe(prompt=PROMPTS[1], **call_kwargs(family, 5))
    assert sum("Step Rehash profiled for 8 steps, used for 5" in r.message for r in caplog.records) == 1
