"""A torch.compile'd transformer (whole or per block) with caching attached compiles once per
code path, not once per step: per-step decisions stay outside the compiled regions."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import dit_accel
from dit_accel.testing import tiny_transformer

POLICIES = {"none": "none", "fora": "fora", "fbcache": {"cache": {"method": "fbcache", "threshold": 10.0}},
            "teacache": {"cache": {"method": "teacache", "threshold": 10.0}}}


def flux_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 16, generator=g), dict(
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g), pooled_projections=torch.randn(1, 16, generator=g),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(16, 3), guidance=torch.tensor([3.5]))


@pytest.mark.parametrize("mode", ["whole", "regional"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_no_recompile_per_step(mode, policy):
    torch._dynamo.reset()
    tr = tiny_transformer("flux")
    counter = CompileCounter()
    dit_accel.accelerate(tr, POLICIES[policy])
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    if mode == "whole":
        model = torch.compile(tr, backend=counter)
    else:
        for block in blocks:
            block.compile(backend=counter)
        model = tr
    hidden, kwargs = flux_inputs()
    frames = []
    with torch.no_grad():
        for step in range(8):
            model(hidden_states=hidden, timestep=torch.tensor([1 - step / 8]), **kwargs)
            frames.append(counter.frame_count)
    stats = dit_accel.stats(tr)
    dit_accel.remove(tr)
    torch._dynamo.reset()
    assert frames[-1] == frames[2], f"recompiled after step 2: {frames}"
    if policy != "none":
        assert stats.blocks_reused > 0
