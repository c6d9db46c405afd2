"""Δ-DiT: the stage-adaptive schedule (rear blocks cached before the boundary, front blocks after,
recomputed every N steps of each stage), exactness of computed and reused steps on a toy model, the
boundary given as a step or a fraction of the steps, and tiny pipelines."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import dit_accel
from dit_accel import Policy, PolicyError, load_policy
from dit_accel.adapters import get_adapter
from dit_accel.caching.delta_dit import DeltaDiT, DeltaDiTConfig
from dit_accel.testing import tiny_generate

from helpers import tiny_baseline


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return hidden_states + torch.tanh(self.lin(hidden_states))


class Toy(nn.Module):
    def __init__(self, blocks: int = 8, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))

    def forward(self, hidden_states: torch.Tensor, timestep: float | None = None) -> torch.Tensor:
        h = hidden_states
        for block in self.blocks:
            h = block(h)
        return h


def attach(model: nn.Module, cache: dict) -> nn.Module:
    return dit_accel.accelerate(model, {"name": "test", "cache": {"method": "delta_dit", **cache}},
                                blocks=["blocks"], block_returns=("hidden",))


def delta_dit(model: nn.Module, cache: dict) -> DeltaDiT:
    """The method a policy with ``cache`` builds for ``model`` (its schedule, read without the runtime)."""
    adapter = get_adapter(model, blocks=["blocks"], block_returns=("hidden",))
    return DeltaDiT(DeltaDiTConfig.from_dict({"method": "delta_dit", **cache}), adapter.blocks(model), adapter)


def inputs(steps: int, dim: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(2, 5, dim, generator=gen) for _ in range(steps)]


def run(model: Toy, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[set[int]]]:
    """Outputs per step and the set of blocks that ran at each step."""
    outs, ran = [], []
    with torch.no_grad():
        for s, x in enumerate(xs):
            before = [b.calls for b in model.blocks]
            outs.append(model(x, timestep=float(len(xs) - s)))
            ran.append({i for i, b in enumerate(model.blocks) if b.calls > before[i]})
    return outs, ran


def paper_rule(step: int, b: int, n: int, cached: int, blocks: int) -> set[int]:
    """Blocks computed at ``step``: Δ-Cache on the rear blocks before b, on the front blocks from b on,
    the cached range recomputed every n-th step of its stage."""
    outline = step < b
    start = 0 if outline else b
    if (step - start) % n == 0:
        return set(range(blocks))
    skipped = set(range(blocks - cached, blocks)) if outline else set(range(cached))
    return set(range(blocks)) - skipped


@pytest.mark.parametrize("b, n, cached", [(5, 3, 6), (5, 2, 3), (4, 2, 8), (0, 3, 4), (12, 2, 5), (7, 1, 6)],
                         ids=["overlapping", "disjoint", "all-blocks", "detail-only", "outline-only", "n1-no-reuse"])
def test_schedule_follows_the_paper_rule(b, n, cached):
    steps, blocks = 12, 8
    model = Toy(blocks)
    attach(model, {"boundary": b, "interval": n, "cached_blocks": cached})
    method = delta_dit(model, {"boundary": b, "interval": n, "cached_blocks": cached})
    _, ran = run(model, inputs(steps))
    stats = dit_accel.stats(model)
    dit_accel.remove(model)
    expected = [paper_rule(s, b, n, cached, blocks) for s in range(steps)]
    assert ran == expected
    assert stats.reused == [sum(i not in e for e in expected) for i in range(blocks)]
    assert [set(range(blocks)) - set(method.cached_blocks_at(s, b)) for s in range(steps)] == expected


def test_plan_segments():
    model = Toy(8)
    attach(model, {"boundary": 4, "cached_blocks": 6})
    method = delta_dit(model, {"boundary": 4, "cached_blocks": 6})
    dit_accel.remove(model)
    assert method.plan.ranges == ((0, 2), (2, 6), (6, 8))  # split at both stages' range edges
    assert method.rear == {1, 2} and method.front == {0, 1}
    attach(model, {"boundary": 4, "cached_blocks": 3})
    method = delta_dit(model, {"boundary": 4, "cached_blocks": 3})
    dit_accel.remove(model)
    assert method.plan.ranges == ((0, 3), (5, 8))  # the middle blocks are never cached: no hooks there
    assert (method.rear, method.front) == ({1}, {0})
    assert delta_dit(model, {"boundary": 4}).n_cached == 6  # cached_fraction 0.75 of 8 blocks


@pytest.mark.parametrize("cached", [6, 3])
def test_computed_steps_are_exact_and_reused_steps_add_the_cached_delta(cached):
    steps, blocks, b, n = 10, 8, 4, 3
    model = Toy(blocks)
    xs = inputs(steps)
    expected, _ = run(model, xs)
    with torch.no_grad():  # every block's input at every step of the unaccelerated model
        trace = []
        for x in xs:
            hs = [x]
            for block in model.blocks:
                hs.append(block(hs[-1]))
            trace.append(hs)
    attach(model, {"boundary": b, "interval": n, "cached_blocks": cached})
    method = delta_dit(model, {"boundary": b, "interval": n, "cached_blocks": cached})
    got, ran = run(model, xs)
    dit_accel.remove(model)
    last_compute = None
    for s in range(steps):
        if ran[s] == set(range(blocks)):
            assert torch.equal(got[s], expected[s]), s
            last_compute = s
            continue
        # replay the step: cached segments add their delta (output − input at the last computed step)
        cached_ranges = {method.plan.ranges[r] for r in (method.rear if s < b else method.front)}
        h, i = xs[s], 0
        with torch.no_grad():
            while i < blocks:
                seg = next(((a, e) for a, e in cached_ranges if a == i), None)
                if seg is not None:
                    h = h + (trace[last_compute][seg[1]] - trace[last_compute][seg[0]])
                    i = seg[1]
                else:
                    h = model.blocks[i](h)
                    i += 1
        assert torch.equal(got[s], h), s
        assert not torch.equal(got[s], expected[s]), s


def test_boundary_fraction_needs_the_number_of_steps():
    model = Toy(8)
    xs = inputs(10)
    attach(model, {"boundary_fraction": 0.6, "interval": 2, "cached_blocks": 6})
    with pytest.raises(PolicyError, match=r"cache\.boundary_fraction.*num_inference_steps"):
        run(model, xs)
    dit_accel.reset(model, num_inference_steps=10)  # boundary = round(0.6 * 10) = 6
    _, ran = run(model, xs)
    assert ran == [paper_rule(s, 6, 2, 6, 8) for s in range(10)]
    dit_accel.remove(model)
    attach(model, {"boundary": 6, "interval": 2, "cached_blocks": 6})  # an absolute boundary needs nothing
    _, ran_abs = run(model, xs)
    dit_accel.remove(model)
    assert ran_abs == ran


@pytest.mark.parametrize("cache, outline", [
    ({"boundary_fraction": 0.6}, 6),                                   # b = 6 of 10: the first 6 steps
    ({"boundary_fraction": 0.6, "boundary_reading": "timesteps"}, 4),  # t = 10 ... 1 > 6: the first 4 steps
    ({"boundary": 3, "boundary_reading": "timesteps"}, 7),
    ({"boundary": 12, "boundary_reading": "timesteps"}, 0),            # b beyond the schedule: detail stage only
])
def test_both_readings_of_the_boundary(cache, outline):
    model = Toy(8)
    xs = inputs(10)
    attach(model, {"interval": 2, "cached_blocks": 6, **cache})
    dit_accel.reset(model, num_inference_steps=10)
    _, ran = run(model, xs)
    dit_accel.remove(model)
    assert ran == [paper_rule(s, outline, 2, 6, 8) for s in range(10)]
    assert delta_dit(model, {"interval": 2, "cached_blocks": 6, **cache}).boundary_step(10) == outline


def test_timestep_reading_of_an_absolute_boundary_needs_the_number_of_steps():
    model = Toy(8)
    attach(model, {"boundary": 3, "boundary_reading": "timesteps"})
    with pytest.raises(PolicyError, match=r"boundary_reading 'timesteps'.*num_inference_steps"):
        run(model, inputs(4))
    dit_accel.remove(model)


# ---------------------------------------------------------------------------------------------------
# Tiny pipelines
# ---------------------------------------------------------------------------------------------------


pipeline = tiny_baseline
generate = tiny_generate


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_runs_on_tiny_pipelines_and_remove_is_exact(family):
    pipe, baseline = pipeline(family)
    dit_accel.accelerate(pipe, "delta_dit")
    out = generate(pipe, family)
    stats = dit_accel.stats(pipe)
    dit_accel.remove(pipe)
    # 4 steps, 4 blocks: b = round(0.6 * 4) = 2, 3 cached blocks, N = 2 -> step 1 skips blocks 1-3, step 3 blocks 0-2
    assert stats.num_inference_steps == 4
    assert stats.reused == [1, 2, 2, 1]
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert torch.equal(generate(pipe, family), baseline)


# ---------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------


def test_preset_round_trips(tmp_path):
    p = load_policy("delta_dit")
    assert p.name == "delta_dit" and p.cache == DeltaDiTConfig()
    c = p.cache
    assert (c.boundary, c.boundary_fraction, c.boundary_reading, c.interval, c.cached_blocks, c.cached_fraction) == \
        (None, 0.6, "steps", 2, None, 0.75)
    assert Policy.from_dict(p.to_dict()) == p
    p.save(tmp_path / "p.yaml")
    assert load_policy(tmp_path / "p.yaml") == p
    q = p.replace(boundary=12, cached_blocks=21)
    assert load_policy(q.to_dict()) == q and q.cache.boundary == 12


@pytest.mark.parametrize("cache, fragment", [
    ({"boundary": -1}, "cache.boundary"),
    ({"boundary": 2.5}, "cache.boundary"),
    ({"boundary_fraction": 1.5}, "cache.boundary_fraction"),
    ({"interval": 0}, "cache.interval"),
    ({"cached_blocks": 0}, "cache.cached_blocks"),
    ({"cached_fraction": 0.0}, "cache.cached_fraction"),
    ({"boundry": 3}, "did you mean 'boundary'"),
    ({"boundary_reading": "descending"}, "cache.boundary_reading"),
])
def test_bad_parameters_name_the_field(cache, fragment):
    with pytest.raises(PolicyError, match=fragment.replace(".", r"\.")):
        load_policy({"cache": {"method": "delta_dit", **cache}})


def test_more_cached_blocks_than_the_model_has_is_refused_before_attaching():
    model = Toy(8)
    with pytest.raises(PolicyError, match=r"cache\.cached_blocks \(9\).*8"):
        attach(model, {"cached_blocks": 9})
    assert not dit_accel.api.is_accelerated(model)
    assert not any(getattr(m, "_diffusers_hook", None) for m in model.modules())
