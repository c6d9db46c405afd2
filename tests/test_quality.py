"""Quality regression on the trained reference models (dit_accel.zoo), offline on CPU.

Floors were measured with exactly these settings (seed 0, float32, one CPU thread, torch 2.13 CPU):

``cifar10_dit`` (2026-11-23; labels [0, 3, 5, 8], defaults: 50 Euler steps, guidance 2.0):

    policy                  PSNR vs baseline   blocks saved
    fbcache                 27.31 dB           63.0%
    fora                    31.45 dB           66.0%
    cifar10_dit-teacache    33.23 dB           54.0%
    cifar10_dit-magcache    39.57 dB           52.0%
    broken gate (always)    14.48 dB           88.2%

``cifar10_mmdit`` (2026-12-01; 4 prompts below, defaults: 28 steps, guidance 2.0, batched CFG):

    fbcache                 37.26 dB           32.7%
    fora                    25.72 dB           64.3%
    broken gate (always)    15.36 dB           80.4%

``digits_wan`` (2026-12-01, weights after training phase 4; one prompt, 4 frames, 12 steps, guidance 3.0,
separate "cond"/"uncond" calls; FBCache's default threshold 0.08 never reuses here, so the loosened 0.25 is
guarded):

    fbcache, threshold 0.25 26.06 dB           36.5%
    fora                    23.13 dB           66.7%
    broken gate (always)    14.74 dB           80.2%

Each policy must stay within 1 dB of its PSNR and 3 points of its saved share (a gate that
stops reusing would pass a PSNR floor trivially). A gate that always reuses must fall below
the FBCache floor.
"""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel import zoo
from dit_accel.demo import psnr

MEASURED = {
    "cifar10_dit": {
        "fbcache": (27.31, 0.630),
        "fora": (31.45, 0.660),
        "cifar10_dit-teacache": (33.23, 0.540),
        "cifar10_dit-magcache": (39.57, 0.520),
    },
    "cifar10_mmdit": {"fbcache": (37.26, 0.327), "fora": (25.72, 0.643)},
    "digits_wan": {"fbcache-0.25": (26.06, 0.365), "fora": (23.13, 0.667)},
}
PSNR_MARGIN_DB = 1.0
SAVED_MARGIN = 0.03
BROKEN_GATE = {"name": "always-reuse", "cache": {"method": "fbcache", "threshold": 10.0}}
PROMPTS = ["a photo of an airplane", "a photo of a cat", "a blurry photo of a dog", "a photo of a ship"]
CALLS = {
    "cifar10_dit": lambda pipe, g: pipe(class_labels=[0, 3, 5, 8], generator=g, output_type="pt").images,
    "cifar10_mmdit": lambda pipe, g: pipe(PROMPTS, generator=g, output_type="pt").images,
    "digits_wan": lambda pipe, g: pipe(["the digits 4 and 7 bouncing"], num_frames=4, num_inference_steps=12,
                                       generator=g, output_type="pt").frames,
}
CASES = [(model, policy) for model, table in MEASURED.items() for policy in table]
POLICIES = {"fbcache-0.25": {"name": "fbcache-0.25", "cache": {"method": "fbcache", "threshold": 0.25}}}


@pytest.fixture(scope="module")
def pipes():
    """model -> (pipeline, baseline output), loaded on first use."""
    cache = {}

    def get(model):
        if model not in zoo.available():
            pytest.skip(f"reference weights of {model} not installed")
        if model not in cache:
            pipe = zoo.load(model)
            pipe.set_progress_bar_config(disable=True)
            cache[model] = (pipe, generate(model, pipe))
        return cache[model]

    return get


def generate(model: str, pipe) -> torch.Tensor:
    return CALLS[model](pipe, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model,policy", CASES)
def test_policy_keeps_measured_quality_and_savings(pipes, model, policy):
    pipe, baseline = pipes(model)
    with dit_accel.accelerated(pipe, POLICIES.get(policy, policy)):
        out = generate(model, pipe)
        saved = dit_accel.stats(pipe).saved_share
    floor_db, measured_saved = MEASURED[model][policy]
    assert psnr(out, baseline) >= floor_db - PSNR_MARGIN_DB
    assert abs(saved - measured_saved) <= SAVED_MARGIN


@pytest.mark.parametrize("model", list(MEASURED))
def test_broken_gate_falls_below_the_floor(pipes, model):
    pipe, baseline = pipes(model)
    with dit_accel.accelerated(pipe, BROKEN_GATE):
        out = generate(model, pipe)
    fbcache_floor = next(db for name, (db, _) in MEASURED[model].items() if name.startswith("fbcache"))
    assert psnr(out, baseline) < fbcache_floor - PSNR_MARGIN_DB
