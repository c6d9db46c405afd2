"""Quality regression on the trained reference model (dit_accel.zoo ``cifar10_dit``), offline on CPU.

Floors were measured on 2026-11-23 with this exact setting (labels [0, 3, 5, 8], seed 0, the
model's defaults: 50 Euler steps, guidance 2.0, float32, one CPU thread, torch 2.13 CPU):

    policy                  PSNR vs baseline   blocks saved
    fbcache                 27.31 dB           63.0%
    fora                    31.45 dB           66.0%
    cifar10_dit-teacache    33.23 dB           54.0%
    cifar10_dit-magcache    39.57 dB           52.0%
    broken gate (always)    14.48 dB           88.2%

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
    "fbcache": (27.31, 0.630),
    "fora": (31.45, 0.660),
    "cifar10_dit-teacache": (33.23, 0.540),
    "cifar10_dit-magcache": (39.57, 0.520),
}
PSNR_MARGIN_DB = 1.0
SAVED_MARGIN = 0.03
BROKEN_GATE = {"name": "always-reuse", "cache": {"method": "fbcache", "threshold": 10.0}}

pytestmark = pytest.mark.skipif("cifar10_dit" not in zoo.available(), reason="reference weights not installed")


@pytest.fixture(scope="module")
def pipe_and_baseline():
    pipe = zoo.load("cifar10_dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe, generate(pipe)


def generate(pipe) -> torch.Tensor:
    return pipe(class_labels=[0, 3, 5, 8], generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("policy", list(MEASURED))
def test_policy_keeps_measured_quality_and_savings(pipe_and_baseline, policy):
    pipe, baseline = pipe_and_baseline
    with dit_accel.accelerated(pipe, policy):
        out = generate(pipe)
        saved = dit_accel.stats(pipe).saved_share
    floor_db, measured_saved = MEASURED[policy]
    assert psnr(out, baseline) >= floor_db - PSNR_MARGIN_DB
    assert abs(saved - measured_saved) <= SAVED_MARGIN


def test_broken_gate_falls_below_the_floor(pipe_and_baseline):
    pipe, baseline = pipe_and_baseline
    with dit_accel.accelerated(pipe, BROKEN_GATE):
        out = generate(pipe)
    assert psnr(out, baseline) < MEASURED["fbcache"][0] - PSNR_MARGIN_DB
