"""CacheQuant: the dynamic-programming schedule against brute force, the per-channel fits, the decoupled corrections
on synthetic records, calibration with and without quantization (two passes), exactness, the quant-section check."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.api import runtimes_of
from dit_accel.caching.cachequant import (CacheQuant, CacheQuantConfig, channel_fit, dps, group_bounds,
                                          schedule_cost)
from dit_accel.caching.records import Records
from dit_accel.quant import torchao_available
from dit_accel.testing import tiny_call_kwargs, tiny_generate, tiny_pipeline

LABELS = [{"class_labels": [1]}, {"class_labels": [2]}]


def call_kwargs(steps: int = 6) -> dict:
    kwargs = tiny_call_kwargs("dit", num_inference_steps=steps)
    kwargs.pop("class_labels", None)
    return kwargs


def brute_force(error: np.ndarray, groups: int, shortest: int, longest: int) -> float:
    """The least schedule cost over every split of the steps into ``groups`` groups of allowed lengths."""
    steps, best = error.shape[0], math.inf
    for lengths in itertools.product(range(shortest, longest + 1), repeat=groups):
        if sum(lengths) == steps:
            starts = list(np.cumsum((0, *lengths[:-1])))
            best = min(best, schedule_cost(error, starts))
    return best


@pytest.mark.parametrize("steps, interval, seed", [(6, 2, 0), (7, 2, 1), (8, 3, 2), (9, 2, 3), (10, 4, 4),
                                                   (5, 1, 5), (4, 3, 6)])
def test_dps_is_optimal_against_brute_force(steps, interval, seed):
    rng = np.random.default_rng(seed)
    error = np.tril(rng.random((steps, steps)) * rng.random((steps, 1)) * 3)  # E[t, a] for a <= t
    groups, shortest, longest = group_bounds(steps, interval)
    computed = dps(error, groups, shortest, longest)
    assert computed[0] == 0 and len(computed) == groups == math.ceil(steps / interval)
    lengths = np.diff([*computed, steps])
    assert all(shortest <= n <= longest for n in lengths)
    assert schedule_cost(error, computed) == pytest.approx(brute_force(error, groups, shortest, longest))


def test_dps_counts_the_quantization_error_of_computed_steps():
    # caching alone (zero diagonal) is cheapest with groups starting at 0 and 2 ...
    steps = 4
    error = np.zeros((steps, steps))
    error[1, 0], error[3, 2] = 0.1, 0.1
    error[2, 1], error[3, 1] = 1.0, 1.0
    error[2, 0], error[3, 0] = 1.0, 1.0
    assert dps(error, 2, 1, 4) == [0, 2]
    # ... but when step 2 computed on the quantized model is far off the full-precision one, another split wins:
    # [0, 3] costs 0.1 + 1 = 1.1, [0, 1] costs 1 + 1 = 2, [0, 2] now 0.1 + 5 + 0.1 = 5.2
    error[2, 2] = 5.0
    assert dps(error, 2, 1, 4) == [0, 3]
    with pytest.raises(dit_accel.PolicyError, match="interval"):
        dps(error, 3, 2, 4)


def test_channel_fit_recovers_an_affine_map_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    scale, shift = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0]), torch.tensor([0.1, 0.0, -2.0, 5.0, 0.3])
    s, b = channel_fit(x, x * scale + shift)
    assert torch.allclose(s.float(), scale, atol=1e-6) and torch.allclose(b.float(), shift, atol=1e-6)
    constant = torch.ones(8, 2)
    s, b = channel_fit(constant, constant * 3)
    assert s.tolist() == [1.0, 1.0] and b.tolist() == [2.0, 2.0], "no variance: keep the scale, shift the mean"


def synthetic(steps: int, channels: int = 3) -> tuple[Records, Records]:
    """Full-precision residual rows F_t = (t + 1)·base, quantized rows Q_t = 0.5·F_t + 0.1 (per channel, exact)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, channels, generator=g) + torch.linspace(1, 2, channels)
    full = Records({"branch": "default", "step": t, "stack_rows": (t + 1) * base} for t in range(steps))
    quant = Records({"branch": "default", "step": t, "stack_rows": 0.5 * (t + 1) * base + 0.1} for t in range(steps))
    quant.quantized, quant.reference = "int8_weight_only", full
    return full, quant


def test_decoupled_corrections_on_synthetic_records():
    steps = 6
    full, quant = synthetic(steps)
    out = CacheQuant.calibrated(CacheQuantConfig(interval=2), quant, "dit")
    assert out.quant_mode == "int8_weight_only"
    computed = out.compute_steps["default"]
    assert len(computed) == 3 and computed[0] == 0
    for a in computed:  # F_a = 2·Q_a − 0.2: the quantization correction at each computed step
        assert np.allclose(out.quant_scale["default"][a], 2.0) and np.allclose(out.quant_shift["default"][a], -0.2)
    errors = out.step_error["default"]
    last = 0
    for t in range(steps):
        if t in computed:
            last = t
            assert errors[t] > 0.1, "a computed step carries the quantization error"
            assert out.cache_scale["default"][t] == [1.0] * 3
        else:  # F_t = (t + 1)/(a + 1)·F_a: the caching correction, and nothing left to correct
            assert np.allclose(out.cache_scale["default"][t], (t + 1) / (last + 1))
            assert np.allclose(out.cache_shift["default"][t], 0.0, atol=1e-5)
            assert errors[t] < 1e-5
    plain = CacheQuant.calibrated(CacheQuantConfig(interval=2, correct_cache=False, correct_quant=False), quant, "dit")
    assert all(plain.step_error["default"][t] > 0.1 for t in range(steps))
    fp_only = CacheQuant.calibrated(CacheQuantConfig(interval=2), full, "dit")
    assert fp_only.quant_mode is None and fp_only.quant_scale is None and fp_only.quant_shift is None
    assert all(e < 1e-5 for e in fp_only.step_error["default"])


def test_without_quant_interval_one_is_bit_exact_and_interval_two_reuses_by_the_schedule():
    steps = 6
    pipe = tiny_pipeline("dit")
    base = tiny_generate(pipe, "dit", num_inference_steps=steps)
    policy = dit_accel.calibrate(pipe, LABELS, {"cache": {"method": "cachequant", "interval": 2}},
                                 **call_kwargs(steps))
    cache = policy.cache
    assert cache.quant_mode is None and cache.quant_scale is None and policy.quant is None
    computed = cache.compute_steps["default"]
    assert len(computed) == 3 and computed[0] == 0
    channels = pipe.transformer.transformer_blocks[0].norm1.linear.in_features
    assert all(len(row) == channels for row in cache.cache_scale["default"])
    with dit_accel.accelerated(pipe, policy):
        cached = tiny_generate(pipe, "dit", num_inference_steps=steps)
        stats = dit_accel.stats(pipe)
    assert stats.computed == [3] * len(stats.computed) and stats.reused == [3] * len(stats.reused)
    assert not torch.equal(cached, base)
    exact = dit_accel.calibrate(pipe, LABELS[:1], {"cache": {"method": "cachequant", "interval": 1}},
                                **call_kwargs(steps))
    assert exact.cache.compute_steps["default"] == list(range(steps))
    with dit_accel.accelerated(pipe, exact):
        assert torch.equal(tiny_generate(pipe, "dit", num_inference_steps=steps), base)
        assert dit_accel.stats(pipe).reused == [0] * len(stats.reused)


def test_identity_corrections_change_nothing_and_others_do():
    steps = 6
    pipe = tiny_pipeline("dit")
    policy = dit_accel.calibrate(pipe, LABELS[:1], {"cache": {"method": "cachequant"}}, **call_kwargs(steps))
    cache = policy.cache
    ones = {b: [[1.0] * len(r) for r in rows] for b, rows in cache.cache_scale.items()}
    zeros = {b: [[0.0] * len(r) for r in rows] for b, rows in cache.cache_scale.items()}

    def run(**changes):
        with dit_accel.accelerated(pipe, policy.replace(**changes)):
            return tiny_generate(pipe, "dit", num_inference_steps=steps)

    plain = run(correct_cache=False)
    assert torch.equal(run(cache_scale=ones, cache_shift=zeros), plain), "s = 1, b = 0 is plain reuse, bit for bit"
    doubled = {b: [[2.0] * len(r) for r in rows] for b, rows in cache.cache_scale.items()}
    assert not torch.equal(run(cache_scale=doubled, cache_shift=zeros), plain)
    assert not torch.equal(run(), plain), "the calibrated correction acts on the reused steps"


def test_uncalibrated_malformed_and_mismatched_quant_are_refused():
    pipe = tiny_pipeline("dit")
    with pytest.raises(dit_accel.PolicyError, match="calibrate"):
        dit_accel.accelerate(pipe, {"cache": {"method": "cachequant"}})
    assert not dit_accel.is_accelerated(pipe)
    with pytest.raises(dit_accel.PolicyError, match="per-channel"):
        CacheQuantConfig(cache_scale={"default": [[1.0, 1.0], [1.0]]})
    with pytest.raises(dit_accel.PolicyError, match="together"):
        CacheQuantConfig(quant_scale={"default": [[1.0]]})
    with pytest.raises(dit_accel.PolicyError, match="out of range"):
        CacheQuantConfig(compute_steps={"default": [0, 3]}, cache_scale={"default": [[1.0]] * 3},
                         cache_shift={"default": [[0.0]] * 3})
    calibrated = CacheQuantConfig(compute_steps={"default": [0]}, cache_scale={"default": [[1.0]] * 2},
                                  cache_shift={"default": [[0.0]] * 2}, quant_mode="int8_weight_only",
                                  quant_scale={"default": [[1.0]] * 2}, quant_shift={"default": [[0.0]] * 2})
    with pytest.raises(dit_accel.PolicyError, match="calibrated with quant.linear=int8_weight_only.*no quant section"):
        dit_accel.Policy(cache=calibrated)
    with pytest.raises(dit_accel.PolicyError, match="quant.linear=int8_dynamic"):
        dit_accel.Policy(cache=calibrated, quant={"linear": "int8_dynamic"})
    dit_accel.Policy(cache=calibrated, quant={"linear": "int8_weight_only"})  # the calibrated combination loads


@pytest.mark.skipif(not torchao_available(), reason="torchao not installed (extra 'quant')")
def test_calibration_with_quant_records_both_models_and_serves_quantized(tmp_path):
    steps = 6
    pipe = tiny_pipeline("dit")
    base = tiny_generate(pipe, "dit", num_inference_steps=steps)
    policy = dit_accel.calibrate(pipe, LABELS, "cachequant", **call_kwargs(steps))  # the preset: int8_weight_only
    cache = policy.cache
    assert policy.quant.linear == cache.quant_mode == "int8_weight_only"
    assert cache.quant_scale is not None and set(cache.quant_scale) == {"default"}
    computed = cache.compute_steps["default"]
    errors = cache.step_error["default"]
    assert all(errors[a] > 0 for a in computed), "computed steps carry the int8 error against full precision"
    assert all(type(m.weight.data) is torch.Tensor for m in pipe.transformer.modules()
               if isinstance(m, torch.nn.Linear)), "calibration leaves the weights as they were"
    assert torch.equal(tiny_generate(pipe, "dit", num_inference_steps=steps), base)
    no_quant = dit_accel.calibrate(pipe, LABELS, {"cache": {"method": "cachequant"}}, **call_kwargs(steps))
    assert all(no_quant.cache.step_error["default"][a] == 0.0 for a in no_quant.cache.compute_steps["default"])
    policy.save(tmp_path / "cq.yaml")
    loaded = dit_accel.load_policy(tmp_path / "cq.yaml")
    assert loaded == policy
    with dit_accel.accelerated(pipe, loaded):
        out = tiny_generate(pipe, "dit", num_inference_steps=steps)
        stats = dit_accel.stats(pipe)
        method = next(iter(runtimes_of(pipe).values())).feature("cache").method
    assert isinstance(method, CacheQuant) and method.compute_steps("default") == computed
    assert stats.computed == [len(computed)] * len(stats.computed)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
