"""Runtime rules on a bare toy transformer (generic adapter): per-sample gate decisions, blocks
that modify their input in place, generation boundaries in custom loops, gate schedule knobs."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import dit_accel
from dit_accel.caching.dbcache import relative_l1


class Block(nn.Module):
    def __init__(self, dim: int, inplace: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.inplace = inplace

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        update = torch.tanh(self.lin(hidden_states))
        if self.inplace:
            hidden_states += update
            return hidden_states
        return hidden_states + update


class Toy(nn.Module):
    def __init__(self, blocks: int = 4, dim: int = 8, inplace: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(dim, inplace) for _ in range(blocks))

    def forward(self, hidden_states: torch.Tensor, timestep: float | None = None) -> torch.Tensor:
        h = hidden_states.clone()
        for block in self.blocks:
            h = block(h)
        return h


def attach(model: nn.Module, policy) -> nn.Module:
    return dit_accel.accelerate(model, policy, blocks=["blocks"], block_returns=("hidden",))


def run(model: nn.Module, inputs: list[torch.Tensor], timesteps=None) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x, **({} if timesteps is None else {"timestep": t}))
                for x, t in zip(inputs, timesteps or [None] * len(inputs))]


def gate(threshold: float, **extra) -> dict:
    return {"name": "gate", "cache": {"method": "fbcache", "threshold": threshold, **extra}}


def test_per_sample_decisions_never_apply_reuse_to_a_disagreeing_sample():
    model = Toy()
    torch.manual_seed(1)
    x0 = torch.randn(2, 5, 8)
    x1 = x0.clone()
    x1[1] = torch.randn(5, 8)  # sample 0 stands still, sample 1 jumps
    with torch.no_grad():
        r0 = model.blocks[0](x0.clone()) - x0
        r1 = model.blocks[0](x1.clone()) - x1
    per_sample = relative_l1(r1, r0, per_sample=True)
    pooled = relative_l1(r1, r0, per_sample=False)
    assert per_sample[0] == 0 and pooled < per_sample[1]
    threshold = float(pooled + per_sample[1]) / 2  # sample 0 and the pooled mean say reuse, sample 1 says compute

    baseline = run(model, [x0, x1])
    attach(model, gate(threshold))
    strict = run(model, [x0, x1])
    stats = dit_accel.stats(model)
    dit_accel.remove(model)
    assert stats.blocks_reused == 0 and stats.mixed_batch_decisions == 1
    assert torch.equal(strict[1], baseline[1])

    attach(model, gate(threshold, batch_decision="mean"))
    pooled_out = run(model, [x0, x1])
    assert dit_accel.stats(model).blocks_reused > 0
    dit_accel.remove(model)
    assert not torch.equal(pooled_out[1], baseline[1]), "the configured pooled decision reuses for both samples"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inplace_blocks_do_not_zero_the_residual(mode, caplog):
    inplace, twin = Toy(inplace=True), Toy(inplace=False)
    twin.load_state_dict(inplace.state_dict())
    torch.manual_seed(2)
    inputs = [torch.randn(1, 5, 8) for _ in range(6)]
    policy = {"cache": {"method": "fora", "interval": 2}}
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def accelerated_run(model):
        attach(model, policy)
        with context():
            outs = [model(x) for x in inputs]
        runtime = dit_accel.inspect(model)["transformer"]
        dit_accel.remove(model)
        return outs, runtime

    expected, _ = accelerated_run(twin)
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        got, runtime = accelerated_run(inplace)
    with torch.no_grad():
        plain = [twin(x) for x in inputs]
    zero_residual = inputs[3] + 0  # what an in-place block would make of step 3 without the guard
    if mode == "no_grad":
        # version counters see the in-place write at step 0: that residual is dropped, step 1
        # computes, inputs are cloned from then on
        assert runtime.clone_inputs and "in place" in caplog.text
        assert torch.equal(got[1], plain[1])
        assert all(torch.allclose(g, e) for g, e in zip(got[2:], expected[2:]))
    else:
        # inference tensors have no version counter: the generic adapter clones from the start
        assert all(torch.allclose(g, e) for g, e in zip(got, expected))
    assert not torch.allclose(got[3], zero_residual)
    assert not torch.equal(got[3], plain[3]), "step 3 must have reused"


def test_custom_loop_new_generation_from_timestep_and_reset():
    model = Toy()
    torch.manual_seed(3)
    inputs = [torch.randn(1, 5, 8) for _ in range(3)]
    timesteps = [1.0, 0.6, 0.3]
    attach(model, {"cache": {"method": "fora", "interval": 2}})
    first = run(model, inputs, timesteps)
    second = run(model, inputs, timesteps)  # the timestep went up: a new generation
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert dit_accel.stats(model).transformer_calls == 3
    # without timesteps the loop must say where a generation starts
    run(model, inputs[:1])
    dit_accel.reset(model)
    third = run(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, third))
    dit_accel.remove(model)


def test_warmup_and_max_consecutive_reuse():
    model = Toy(blocks=4)
    x = torch.randn(1, 5, 8)
    attach(model, gate(10.0, warmup_steps=2, max_consecutive_reuse=2))
    run(model, [x] * 7)
    stats = dit_accel.stats(model)
    dit_accel.remove(model)
    # steps 0,1 warm-up; reuse 2,3; compute 4 (streak cap); reuse 5,6 -> 4 reused steps x 3 middle blocks
    assert stats.reused == [0, 4, 4, 4]
    assert stats.computed == [7, 3, 3, 3]


def test_gate_lag_computes_blocks_between_probe_and_range():
    model = Toy(blocks=4)
    x = torch.randn(1, 5, 8)
    attach(model, gate(10.0, gate_lag=1))
    run(model, [x] * 3)
    stats = dit_accel.stats(model)
    dit_accel.remove(model)
    assert stats.reused == [0, 0, 2, 2]
