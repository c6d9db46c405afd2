"""TaylorSeer and CG-Taylor: the finite-difference Taylor math, forecasts on toy models whose block
residuals are known polynomials of the step, the confidence gate, memory accounting, and both
methods on tiny pipelines (reuse happens, ``remove`` is bit-exact again)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dit_accel
from dit_accel import Policy, PolicyError, load_policy
from dit_accel.caching import _taylor
from dit_accel.caching.taylorseer import TaylorSeerConfig, is_full_step
from dit_accel.testing import tiny_generate

from helpers import tiny_baseline

T0 = 100.0  # timestep of step 0; step s runs at timestep T0 - s (a decreasing timestep, as samplers do)


# ---------------------------------------------------------------------------------------------------
# Toy models: each block adds poly(timestep) * direction, so every block residual (and every block
# output, for a fixed input) is a polynomial of the step known in closed form.
# ---------------------------------------------------------------------------------------------------


class PolyBlock(nn.Module):
    def __init__(self, coeffs, dim: int, dtype: torch.dtype, jump_at: float | None = None, jump: float = 0.0,
                 jump_rows: slice = slice(None)) -> None:
        super().__init__()
        self.coeffs = tuple(coeffs)
        self.register_buffer("direction", torch.randn(dim, dtype=torch.float64).to(dtype))
        self.jump_at, self.jump, self.jump_rows = jump_at, jump, jump_rows
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, t: float) -> torch.Tensor:
        self.calls += 1
        value = sum(c * t ** k for k, c in enumerate(self.coeffs))
        out = hidden_states + value * self.direction
        if self.jump_at is not None and t <= self.jump_at:  # the feature jumps once the timestep passes jump_at
            out = out.clone()
            out[self.jump_rows] += self.jump * self.direction
        return out


class PolyToy(nn.Module):
    def __init__(self, degree: int, blocks: int = 4, dim: int = 6, dtype: torch.dtype = torch.float64, seed: int = 0,
                 **block0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(
            PolyBlock(torch.randn(degree + 1, generator=gen, dtype=torch.float64).tolist(), dim, dtype,
                      **(block0 if i == 0 else {}))
            for i in range(blocks))

    def forward(self, hidden_states: torch.Tensor, timestep: float) -> torch.Tensor:
        h = hidden_states
        for block in self.blocks:
            h = block(h, timestep)
        return h


def attach(model: nn.Module, cache: dict) -> nn.Module:
    return dit_accel.accelerate(model, {"name": "test", "cache": cache}, blocks=["blocks"], block_returns=("hidden",))


def run_steps(model: nn.Module, x: torch.Tensor | list[torch.Tensor], steps: int):
    """Outputs per step and, per step, whether block 1 ran (i.e. the step was computed in full)."""
    outs, computed = [], []
    with torch.no_grad():
        for s in range(steps):
            before = model.blocks[1].calls
            outs.append(model(x[s] if isinstance(x, list) else x, T0 - s))
            computed.append(model.blocks[1].calls > before)
    return outs, computed


def exact(model: nn.Module, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    return run_steps(model, x, steps)[0]


def input_for(model: PolyToy, batch: int = 1) -> torch.Tensor:
    dtype = model.blocks[0].direction.dtype
    return torch.randn(batch, 3, model.blocks[0].direction.numel(), generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------------
# The math, on synthetic features
# ---------------------------------------------------------------------------------------------------


def polynomial(degree: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    coeffs = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(degree + 1)]
    return lambda t: sum(c * float(t) ** k for k, c in enumerate(coeffs))


NODES = (0, 1, 2, 5, 8, 11)  # warm-up steps at distance 1, then every 3rd step: uneven spacing


def fit(f, order: int, expansion: str, nodes=NODES) -> _taylor.Series:
    series = None
    for t in nodes:
        series = _taylor.update(series, f(t), t, order, expansion)
    return series


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_newton_forecast_is_exact_for_polynomials_up_to_its_order(order):
    for degree in range(order + 2):
        f = polynomial(degree, seed=degree)
        series = fit(f, order, "newton")
        assert series.order == order and series.nodes == NODES[::-1][:order + 1]
        for t in (12, 13, 14):
            error = (_taylor.forecast(series, t, "newton") - f(t)).abs().max().item()
            if degree <= order:
                assert error < 1e-8 * (1 + f(t).abs().max().item()), (order, degree, t)
            else:  # an order-(k-1) forecast of a degree-k trajectory is not exact
                assert error > 1e-3, (order, degree, t)


def test_paper_taylor_expansion_is_exact_for_linear_and_biased_for_quadratic():
    for order in (1, 2):
        linear = polynomial(1)
        series = fit(linear, order, "taylor")
        for t in (12, 14):
            torch.testing.assert_close(_taylor.forecast(series, t, "taylor"), linear(t), rtol=1e-10, atol=1e-10)
    # order 2 on t^2 with nodes spaced N: backward differences estimate the slope N/2 too early,
    # so TaylorSeer's series is off by -N*x (x = steps since the last node); Newton's form is exact
    N = 3
    nodes = (2, 5, 8, 11)
    square = lambda t: torch.full((2, 2), float(t) ** 2, dtype=torch.float64)  # noqa: E731
    series = fit(square, 2, "taylor", nodes)
    newton = fit(square, 2, "newton", nodes)
    for x in (1, 2):
        t = nodes[-1] + x
        torch.testing.assert_close(_taylor.forecast(series, t, "taylor") - square(t),
                                   torch.full((2, 2), -N * x, dtype=torch.float64))
        torch.testing.assert_close(_taylor.forecast(newton, t, "newton"), square(t))


def test_order_grows_with_nodes_and_restarts_on_shape_change():
    f = polynomial(2)
    series = _taylor.update(None, f(0), 0, 2, "taylor")
    assert series.order == 0
    torch.testing.assert_close(_taylor.forecast(series, 3, "taylor"), f(0))  # order 0 = plain reuse
    assert _taylor.forecast(series, 3, "taylor") is not series[0]  # a forecast is always a new tensor
    series = _taylor.update(series, f(1), 1, 2, "taylor")
    assert series.order == 1
    series = _taylor.update(series, f(2), 2, 2, "taylor")
    series = _taylor.update(series, f(3), 3, 2, "taylor")
    assert series.order == 2 and len(series.nodes) == 3
    restarted = _taylor.update(series, torch.zeros(5), 4, 2, "taylor")
    assert restarted.order == 0 and restarted.nodes == (4,)
    again = _taylor.update(series, f(3), 3, 2, "taylor")  # the same step twice (a block run twice): restart
    assert again.order == 0 and again.nodes == (3,)


def test_factors_keep_the_feature_dtype():
    f = polynomial(2)
    series = None
    for t in range(3):
        series = _taylor.update(series, f(t).to(torch.bfloat16), t, 2, "newton")
    assert [s.dtype for s in series] == [torch.bfloat16] * 3
    assert _taylor.forecast(series, 5, "newton").dtype == torch.bfloat16


def test_schedule_matches_the_reference_cal_type():
    # TaylorSeer's cal_type: steps < first_enhance are full, then a full step whenever the counter
    # (reset at each full step) reaches interval - 1
    for warmup, interval in [(3, 6), (1, 3), (0, 4), (2, 1)]:
        expected, counter = [], 0
        for step in range(30):
            if step < max(warmup, 1) or counter == interval - 1:
                expected.append(True)
                counter = 0
            else:
                expected.append(False)
                counter += 1
        assert [is_full_step(s, warmup, interval) for s in range(30)] == expected, (warmup, interval)
    assert [s for s in range(20) if is_full_step(s, 3, 6)] == [0, 1, 2, 8, 14]


# ---------------------------------------------------------------------------------------------------
# TaylorSeer end to end on the polynomial toy
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylorseer_forecasts_polynomial_residuals_exactly(order):
    steps = 12
    model = PolyToy(degree=order)
    x = input_for(model)
    expected = exact(model, x, steps)
    for used_order, should_be_exact in ((order, True), (order - 1, False)):
        attach(model, {"method": "taylorseer", "order": used_order, "warmup_steps": order + 1, "interval": 3,
                       "expansion": "newton"})
        got, computed = run_steps(model, x, steps)
        stats = dit_accel.stats(model)
        dit_accel.remove(model)
        full = [is_full_step(s, order + 1, 3) for s in range(steps)]
        assert computed == full
        assert stats.reused == [full.count(False)] * 4
        for s in range(steps):
            if full[s]:
                assert torch.equal(got[s], expected[s]), s  # computed steps are the exact computation
            elif should_be_exact:
                torch.testing.assert_close(got[s], expected[s], rtol=1e-9, atol=1e-9)
        if not should_be_exact:
            assert max((got[s] - expected[s]).abs().max().item() for s in range(steps) if not full[s]) > 1e-3
    assert torch.equal(exact(model, x, steps)[-1], expected[-1])


def test_taylorseer_paper_expansion_is_exact_on_linear_residuals():
    steps = 10
    model = PolyToy(degree=1)
    x = input_for(model)
    expected = exact(model, x, steps)
    attach(model, {"method": "taylorseer"})  # the shipped defaults: order 1, interval 6, 3 warm-up steps
    got, computed = run_steps(model, x, steps)
    dit_accel.remove(model)
    assert computed == [True, True, True, False, False, False, False, False, True, False]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_taylorseer_order_zero_is_fora():
    model = PolyToy(degree=2)
    xs = [torch.randn(1, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(7)]
    attach(model, {"method": "fora", "interval": 3})
    fora, _ = run_steps(model, xs, 7)
    dit_accel.remove(model)
    attach(model, {"method": "taylorseer", "order": 0, "warmup_steps": 1, "interval": 3})
    taylor, _ = run_steps(model, xs, 7)
    dit_accel.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(fora, taylor))


@pytest.mark.parametrize("granularity,ranges", [("block", 4), ("stack", 1)])
def test_taylorseer_factors_in_model_dtype_count_in_cache_bytes(granularity, ranges):
    model = PolyToy(degree=2, dtype=torch.bfloat16)
    x = input_for(model)
    attach(model, {"method": "taylorseer", "order": 2, "warmup_steps": 3, "interval": 3, "granularity": granularity})
    run_steps(model, x, 5)
    held = dit_accel.inspect(model).held_bytes  # a custom loop: the generation is still open
    stats = dit_accel.stats(model)
    dit_accel.remove(model)
    # order + 1 = 3 factors per range, bf16 (2 bytes), the input's shape; nothing else (no plain residuals)
    assert stats.cache_bytes == held == ranges * 3 * x.numel() * 2


@pytest.mark.parametrize("cache", [{"method": "fora", "interval": 3},
                                   {"method": "taylorseer", "order": 2, "warmup_steps": 3, "interval": 3}])
def test_stack_granularity_equals_per_block(cache):
    """One residual / forecast for the whole range telescopes to the sum of the per-block ones."""
    model = PolyToy(degree=2)
    xs = [torch.randn(1, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(9)]
    outs = {}
    for granularity in ("block", "stack"):
        attach(model, {**cache, "granularity": granularity})
        outs[granularity], computed = run_steps(model, xs, 9)
        dit_accel.remove(model)
        assert not all(computed), "some steps must reuse"
    for a, b in zip(outs["block"], outs["stack"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# CG-Taylor: the confidence gate
# ---------------------------------------------------------------------------------------------------

CG = {"method": "cg_taylor", "warmup_steps": 2, "final_steps": 0, "expansion": "newton"}


def test_cg_taylor_forecasts_smooth_trajectories():
    steps = 10
    model = PolyToy(degree=1)
    x = input_for(model)
    expected = exact(model, x, steps)
    attach(model, {**CG, "threshold": 1e-6})  # strict: only an (almost) exact probe forecast passes
    got, computed = run_steps(model, x, steps)
    stats = dit_accel.stats(model)
    dit_accel.remove(model)
    assert computed == [True, True] + [False] * 8
    assert stats.reused == [0, 8, 8, 8] and stats.blocks_reused == 24
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    # first- and last-block factors only: (probe_order + 1) + (order + 1) float64 tensors of the input's size
    assert stats.cache_bytes == (2 + 2) * x.numel() * 8


def test_cg_taylor_falls_back_when_the_first_block_jumps():
    steps = 10
    model = PolyToy(degree=1, jump_at=T0 - 6, jump=50.0)  # block 0's output jumps at step 6
    x = input_for(model)
    expected = exact(model, x, steps)
    attach(model, {**CG, "threshold": 0.01})
    got, computed = run_steps(model, x, steps)
    stats = dit_accel.stats(model)
    dit_accel.remove(model)
    # 6: the probe's forecast misses the jump; 7: its slope still spans the jump; 8, 9: nodes 6 and 7 agree again
    assert computed == [True, True, False, False, False, False, True, True, False, False]
    assert stats.blocks_reused == 6 * 3
    for s in range(steps):
        if computed[s]:
            assert torch.equal(got[s], expected[s]), s
        else:
            torch.testing.assert_close(got[s], expected[s], rtol=1e-9, atol=1e-9)

    attach(model, {**CG, "threshold": 0.0})  # a gate that never trusts the forecast: exact output
    got, computed = run_steps(model, x, steps)
    assert dit_accel.stats(model).blocks_reused == 0
    dit_accel.remove(model)
    assert all(computed) and all(torch.equal(g, e) for g, e in zip(got, expected))


def test_cg_taylor_batch_decision():
    from dit_accel.caching.cg_taylor import relative_error

    steps = 8
    model = PolyToy(degree=1, jump_at=T0 - 4, jump=5.0, jump_rows=slice(1, 2))  # only sample 1 jumps, at step 4
    x = input_for(model, batch=2)
    with torch.no_grad():  # the probe's forecast at step 4 is the jump-free output (exact for a linear trajectory)
        jumped = model.blocks[0](x, T0 - 4)
        model.blocks[0].jump_at = None
        smooth = model.blocks[0](x, T0 - 4)
        model.blocks[0].jump_at = T0 - 4
    per_sample = relative_error(smooth, jumped, True, 1)
    pooled = relative_error(smooth, jumped, False, 1)
    assert per_sample[0] == 0 and 0 < pooled < per_sample[1]
    threshold = float(pooled + per_sample[1]) / 2  # sample 0 and the pooled error say forecast, sample 1 says compute

    attach(model, {**CG, "threshold": threshold})
    _, strict = run_steps(model, x, steps)
    stats = dit_accel.stats(model)
    dit_accel.remove(model)
    assert strict[4] and stats.mixed_batch_decisions >= 1
    attach(model, {**CG, "threshold": threshold, "batch_decision": "mean"})
    _, pooled_run = run_steps(model, x, steps)
    dit_accel.remove(model)
    assert not pooled_run[4], "the configured pooled decision forecasts for both samples"


def test_cg_taylor_caps_and_final_steps():
    steps = 10
    model = PolyToy(degree=1)
    x = input_for(model)
    attach(model, {**CG, "threshold": 1.0, "max_consecutive_forecast": 2, "final_steps": 1})
    dit_accel.reset(model, num_inference_steps=steps)  # final_steps needs the number of steps
    _, computed = run_steps(model, x, steps)
    dit_accel.remove(model)
    assert computed == [True, True, False, False, True, False, False, True, False, True]


# ---------------------------------------------------------------------------------------------------
# Tiny pipelines
# ---------------------------------------------------------------------------------------------------


pipeline = tiny_baseline
generate = tiny_generate


@pytest.mark.parametrize("family", ["flux", "pixart"])
@pytest.mark.parametrize("policy", ["taylorseer",
                                    {"name": "cg-loose", "cache": {"method": "cg_taylor", "threshold": 10.0,
                                                                   "warmup_steps": 1, "final_steps": 0}}],
                         ids=["taylorseer", "cg_taylor"])
def test_runs_on_tiny_pipelines_and_remove_is_exact(family, policy):
    pipe, baseline = pipeline(family)
    dit_accel.accelerate(pipe, policy)
    out = generate(pipe, family)
    stats = dit_accel.stats(pipe)
    dit_accel.remove(pipe)
    assert stats.blocks_reused > 0 and stats.cache_bytes > 0
    assert torch.isfinite(out).all()
    assert not torch.equal(out, baseline)
    assert torch.equal(generate(pipe, family), baseline)


# ---------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["taylorseer", "cg_taylor"])
def test_presets_round_trip(name, tmp_path):
    p = load_policy(name)
    assert p.name == name and p.cache.method == name
    assert p.cache == type(p.cache)()  # the preset is the documented defaults
    assert Policy.from_dict(p.to_dict()) == p
    p.save(tmp_path / "p.yaml")
    assert load_policy(tmp_path / "p.yaml") == p
    assert p.replace(order=2).cache.order == 2


def test_taylorseer_defaults():
    c = TaylorSeerConfig()
    assert (c.interval, c.order, c.warmup_steps, c.expansion) == (6, 1, 3, "taylor")


@pytest.mark.parametrize("cache, fragment", [
    ({"method": "taylorseer", "interval": 0}, "cache.interval"),
    ({"method": "taylorseer", "order": -1}, "cache.order"),
    ({"method": "taylorseer", "order": 1.5}, "cache.order"),
    ({"method": "taylorseer", "expansion": "spline"}, "cache.expansion"),
    ({"method": "taylorseer", "warmup": 3}, "cache: unknown key 'warmup'"),
    ({"method": "cg_taylor", "threshold": -0.1}, "cache.threshold"),
    ({"method": "cg_taylor", "probe_order": 9}, "cache.probe_order"),
    ({"method": "cg_taylor", "metric": "l3"}, "cache.metric"),
    ({"method": "cg_taylor", "max_consecutive_forecast": 0}, "cache.max_consecutive_forecast"),
    ({"method": "cg_taylor", "batch_decision": "any"}, "cache.batch_decision"),
])
def test_bad_parameters_name_the_field(cache, fragment):
    with pytest.raises(PolicyError, match=fragment.replace(".", r"\.")):
        load_policy({"cache": cache})


def test_plans_that_do_not_fit_leave_nothing_attached():
    model = PolyToy(degree=1, blocks=1)
    with pytest.raises(PolicyError, match="at least 2 blocks"):
        attach(model, {"method": "cg_taylor"})
    with pytest.raises(PolicyError, match=r"cache\.fn_compute"):
        attach(PolyToy(degree=1, blocks=2), {"method": "taylorseer", "fn_compute": 1, "bn_compute": 1})
    assert not dit_accel.api.is_accelerated(model)
    assert not any(getattr(m, "_diffusers_hook", None) for m in model.modules())
    assert math.isfinite(model(torch.zeros(1, 3, 6, dtype=torch.float64), 1.0).sum().item())
