"""TeaCache and MagCache gates, and ``dit_accel.calibrate`` fitting what they need."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml

import dit_accel
from dit_accel.adapters import get_adapter
from dit_accel.calibration import fit_polynomial, record
from dit_accel.caching.teacache import PUBLISHED, TeaCache, polyval
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline, tiny_transformer

PROMPTS = ["a photo of a cat", "a red car on a road", "a dog on the beach", "a blue bird in a tree"]


def call_kwargs(family: str, steps: int = 10) -> dict:
    kwargs = tiny_call_kwargs(family, num_inference_steps=steps)
    kwargs.pop("prompt")
    return kwargs


def generate(pipe, family, prompt="a photo of a cat", steps=10):
    out = pipe(prompt=prompt, **call_kwargs(family, steps))
    return out.frames if hasattr(out, "frames") else out.images


def test_polyval_matches_numpy():
    coeffs = (3.0, -2.0, 0.5, 1.0)
    x = torch.linspace(0, 1, 7, dtype=torch.float64)
    assert torch.allclose(polyval(coeffs, x), torch.from_numpy(np.polyval(coeffs, x.numpy())))


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_calibrated_teacache_predicts_held_out_output_change_better_than_identity(family):
    pipe = tiny_pipeline(family)
    policy = dit_accel.calibrate(pipe, PROMPTS[:3], "teacache", **call_kwargs(family))
    coeffs = policy.cache.coefficients
    assert len(coeffs) == 5 and policy.cache.input == "modulated"
    # held-out prompt: record (input change, residual change) pairs with a fresh calibration run
    held_out = dit_accel.calibrate(pipe, PROMPTS[3:], "teacache", **call_kwargs(family))
    records, _ = record(pipe, [PROMPTS[3]], **call_kwargs(family))
    rows = [r for r in records if np.isfinite(r["modulated_change"])]
    x = np.array([r["modulated_change"] for r in rows])
    y = np.array([r["residual_change"] for r in rows])
    fitted_error = np.mean((np.polyval(coeffs, x) - y) ** 2)
    identity_error = np.mean((x - y) ** 2)
    assert fitted_error < identity_error
    assert held_out.cache.coefficients != coeffs  # fitted on other data: a real fit, not a constant


def _teacache(family: str) -> TeaCache:
    transformer = tiny_transformer(family)
    adapter = get_adapter(transformer)
    return TeaCache(dit_accel.load_policy("teacache").cache, adapter.blocks(transformer), adapter)


def test_published_coefficients_and_identity_fallback(caplog):
    method = _teacache("flux")
    assert method.coefficients == PUBLISHED["flux"][0] and method.input_kind == "modulated"
    assert _teacache("wan").input_kind == "timestep_embedding"
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        assert _teacache("pixart").coefficients == (1.0, 0.0)
    assert "calibrate" in caplog.text


def test_teacache_first_and_last_steps_always_computed():
    pipe = tiny_pipeline("pixart")
    steps = 8
    with dit_accel.accelerated(pipe, {"cache": {"method": "teacache", "threshold": 100.0,
                                                "coefficients": [1.0, 0.0]}}):
        generate(pipe, "pixart", steps=steps)
        stats = dit_accel.stats(pipe)
    blocks = len(stats.block_names)
    assert stats.blocks_computed == 2 * blocks  # step 0 (warm-up) and the last step
    assert stats.blocks_reused == (steps - 2) * blocks


def test_teacache_reuses_when_input_constant_and_computes_when_it_jumps():
    tr = tiny_pipeline("flux").transformer
    policy = {"cache": {"method": "teacache", "threshold": 0.05, "coefficients": [1.0, 0.0], "warmup_steps": 1,
                        "compute_last_step": False}}
    with dit_accel.accelerated(tr, policy):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, 16, 16, generator=g)
        args = dict(encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
                    pooled_projections=torch.randn(1, 16, generator=g),
                    img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(16, 3), guidance=torch.tensor([3.5]))
        dit_accel.reset(tr)
        with torch.no_grad():
            for _ in range(3):  # the same input three times: reuse after the warm-up step
                tr(hidden_states=hidden, timestep=torch.tensor([0.5]), **args)
            constant = dit_accel.stats(tr).blocks_reused
            blocks = len(dit_accel.stats(tr).block_names)
            tr(hidden_states=torch.randn(1, 16, 16, generator=g) * 3, timestep=torch.tensor([0.5]), **args)
            after_jump = dit_accel.stats(tr).blocks_reused
    assert constant == 2 * blocks  # calls 2 and 3 reuse every block
    assert after_jump == constant, "a jump in the modulated input must force computation"


def test_magcache_needs_calibration_and_follows_its_table():
    pipe = tiny_pipeline("pixart")
    with pytest.raises(dit_accel.PolicyError, match="calibrate"):
        dit_accel.accelerate(pipe, {"cache": {"method": "magcache"}})
    assert not dit_accel.is_accelerated(pipe)
    steps = 10
    flat = {"default": [1.0] * steps}
    jumpy = {"default": [1.0] * 5 + [3.0] * 5}
    counts = {}
    for name, table in (("flat", flat), ("jumpy", jumpy)):
        policy = {"cache": {"method": "magcache", "threshold": 0.5, "max_skips": 3, "retention_ratio": 0.2,
                            "mag_ratios": table}}
        with dit_accel.accelerated(pipe, policy):
            generate(pipe, "pixart", steps=steps)
            counts[name] = dit_accel.stats(pipe).blocks_reused // len(dit_accel.stats(pipe).block_names)
    # flat: steps 0,1 retained; then skip 3, compute 1, skip 3, compute 1 -> 6 skipped steps
    assert counts["flat"] == 6
    # jumpy: steps 2..4 skipped (ratio 1); from step 5 on |1 - 3^k| > 0.5: always computed
    assert counts["jumpy"] == 3


def test_calibrated_magcache_round_trips_and_accelerates(tmp_path):
    pipe = tiny_pipeline("wan")
    kwargs = call_kwargs("wan", steps=8)
    policy = dit_accel.calibrate(pipe, PROMPTS[:2], {"name": "wan-mag", "cache": {"method": "magcache"}}, **kwargs)
    assert set(policy.cache.mag_ratios) == {"cond", "uncond"}
    assert all(len(curve) == 8 for curve in policy.cache.mag_ratios.values())
    policy.save(tmp_path / "wan-mag.yaml")
    loaded = dit_accel.load_policy(tmp_path / "wan-mag.yaml")
    assert loaded == policy
    assert yaml.safe_load((tmp_path / "wan-mag.yaml").read_text())["cache"]["method"] == "magcache"
    with dit_accel.accelerated(pipe, loaded.replace(threshold=10.0)):
        pipe(prompt="a cat", **kwargs)
        assert dit_accel.stats(pipe).blocks_reused > 0


def test_calibrate_errors():
    pipe = tiny_pipeline("pixart")
    with pytest.raises(dit_accel.PolicyError, match="needs no calibration"):
        dit_accel.calibrate(pipe, PROMPTS, "fora")
    with pytest.raises(dit_accel.PolicyError, match="at least one prompt"):
        dit_accel.calibrate(pipe, [], "teacache")
    with pytest.raises(dit_accel.PolicyError, match="usable steps"):
        dit_accel.calibrate(pipe, PROMPTS[:1], "teacache", **call_kwargs("pixart", steps=3))
    assert not dit_accel.is_accelerated(pipe)
    assert fit_polynomial([0, 1, 2, 3, 4, 5], [1, 3, 5, 7, 9, 11], degree=1) == pytest.approx((2.0, 1.0))
