"""Bottleneck Sampling (Tian et al. 2025) as a sampler-level driver on the tiny pipelines: a one-stage plan is the
plain call, stages run at the planned grids and schedules (FLUX packing, Wan video grids, UniPC), the planned
token share is what the transformer really sees, caching composes, bad plans are refused with the scheduler
left in place."""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel import PolicyError
from dit_accel.sampling import BottleneckConfig, BottleneckSampler, Stage, bottleneck_sample, default_stages
from dit_accel.sampling.layout import LatentLayout, resize_noise
from dit_accel.sampling.schedules import stage_scheduler, stage_sigmas, time_shift
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

THREE = [Stage(steps=2, end=0.7), Stage(scale=0.5, steps=2, start=0.7, end=0.4), Stage(steps=2, start=0.5)]
SIZE = {"flux": {"height": 32, "width": 32}, "sd3": {"height": 32, "width": 32},
        "wan": {"height": 64, "width": 64, "num_frames": 5}}


def kwargs(family: str, **extra) -> dict:
    out = tiny_call_kwargs(family, **SIZE[family])
    out.pop("num_inference_steps")
    return {**out, **extra}


class Tokens:
    """The hidden-state shape of every transformer call."""

    def __init__(self, pipe):
        self.shapes: list[tuple] = []
        self.handle = pipe.transformer.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kw):
        hidden = kw.get("hidden_states", args[0] if args else None)
        self.shapes.append(tuple(hidden.shape))

    def close(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def flux():
    return tiny_pipeline("flux")


def test_default_schedule_is_the_schedulers_own():
    """Unshifted time from 1 to the scheduler's sigma_min, then its shift: FlowMatchEuler's own schedule."""
    plain = tiny_pipeline("sd3").scheduler
    plain.set_timesteps(4)
    shift = plain.config.shift
    staged = stage_scheduler(plain, stage_sigmas(4, 1.0, float(time_shift(plain.sigma_min, shift)), shift=shift))
    staged.set_timesteps(4, sigmas=[0.3], mu=1.0)  # whatever the pipeline asks for, the stage's sigmas are set
    torch.testing.assert_close(staged.sigmas, plain.sigmas, rtol=0, atol=1e-6)
    assert staged.config.shift == 1.0 and plain.config.shift == 3.0


def test_sd3_one_stage_equals_pipeline():
    pipe = tiny_pipeline("sd3")
    shift = pipe.scheduler.config.shift
    base = pipe(**kwargs("sd3", num_inference_steps=3, generator=torch.Generator().manual_seed(0))).images
    out = bottleneck_sample(pipe, stages=[Stage(steps=3, shift=shift)],
                            **kwargs("sd3", generator=torch.Generator().manual_seed(0))).images
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # put back


def test_flux_stages_run_packed_grids_and_share_matches(flux):
    sampler = BottleneckSampler(flux, stages=THREE)
    plan = sampler.plan(**kwargs("flux"))
    tokens = Tokens(flux)
    try:
        out = sampler(**kwargs("flux", generator=torch.Generator().manual_seed(0))).images
    finally:
        tokens.close()
    layout = LatentLayout.of(flux)
    assert layout.packed and layout.patch == 2
    grids = [p.grid for p in plan.stages]
    assert grids[0][-2:] == (16, 16) and grids[1][-2:] == (8, 8) and grids[2][-2:] == (16, 16)
    # FLUX sees packed tokens: (H/2)(W/2) per call, 2 calls per stage
    assert [s[1] for s in tokens.shapes] == [64, 64, 16, 16, 64, 64]
    measured = sum(s[1] for s in tokens.shapes) / (plan.reference_steps * 64)
    assert measured == pytest.approx(plan.token_share) and plan.token_share == pytest.approx(0.75)
    base = flux(**kwargs("flux", num_inference_steps=6, generator=torch.Generator().manual_seed(0))).images
    assert out.shape == base.shape and torch.isfinite(out).all()


def test_pack_round_trip(flux):
    layout = LatentLayout.of(flux)
    grid = torch.randn(2, 4, 8, 6)
    packed = layout.to_pipeline(flux, grid)
    assert packed.shape == (2, 12, 16)
    torch.testing.assert_close(layout.from_pipeline(flux, packed, grid.shape), grid)


def test_wan_video_with_unipc_keeps_frames():
    from diffusers import UniPCMultistepScheduler

    pipe = tiny_pipeline("wan")
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    tokens = Tokens(pipe)
    try:
        sampler = BottleneckSampler(pipe, stages=THREE)
        plan = sampler.plan(**kwargs("wan"))
        out = sampler(**kwargs("wan", generator=torch.Generator().manual_seed(0))).frames
    finally:
        tokens.close()
    assert [p.grid[2:] for p in plan.stages] == [(2, 8, 8), (2, 4, 4), (2, 8, 8)]
    assert [s[2:] for s in tokens.shapes[::2]] == [(2, 8, 8)] * 2 + [(2, 4, 4)] * 2 + [(2, 8, 8)] * 2
    assert len(tokens.shapes) == 12  # separate CFG: cond + uncond per step
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and type(pipe.scheduler) is UniPCMultistepScheduler
    assert out.shape[:2] == (1, 16) and torch.isfinite(out).all()


def test_composes_with_caching(flux):
    dit_accel.accelerate(flux, "fora")
    try:
        out = bottleneck_sample(flux, stages=THREE, **kwargs("flux", generator=torch.Generator().manual_seed(0)))
        stats = dit_accel.stats(flux)
        assert dit_accel.inspect(flux).held_bytes == 0
    finally:
        dit_accel.remove(flux)
    assert torch.isfinite(out.images).all()
    assert stats.blocks_reused > 0  # FORA reuses inside the stages


def test_noise_initial_reuses_the_initial_noise():
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small = resize_noise(noise, (16, 16))
    assert small.shape == (4, 3, 16, 16)
    assert 0.85 < float(small.std()) < 1.15  # unit variance kept
    torch.testing.assert_close(small, torch.nn.functional.avg_pool2d(noise, 2) * 2)


def test_default_stages_and_validation(flux):
    stages = default_stages(20)
    assert [s.steps for s in stages] == [4, 10, 6] and [s.scale for s in stages] == [1.0, 0.5, 1.0]
    BottleneckConfig.from_dict({"stages": [{"steps": 2, "end": 0.5}, {"steps": 2, "start": 0.6}]})
    bad = [
        ([{"steps": 2, "start": 0.9, "end": 0.5}, {"steps": 2, "start": 0.6}], "pure noise"),
        ([{"steps": 2, "end": 0.5}, {"scale": 0.5, "steps": 2, "start": 0.6}], "full resolution"),
        ([{"steps": 2}, {"steps": 2, "start": 0.6}], "needs the σ where it ends"),
        ([{"steps": 2, "end": 0.5}, {"steps": 2, "start": 0.4}], "only add noise"),
        ([{"steps": 2, "end": 0.5, "stpes": 3}], "did you mean 'steps'"),
    ]
    for stages, message in bad:
        with pytest.raises(PolicyError, match=message):
            BottleneckConfig.from_dict({"stages": stages})
    with pytest.raises(PolicyError, match="at least 3 steps"):
        default_stages(2)


def test_unsupported_scheduler_is_refused_before_any_call():
    pipe = tiny_pipeline("pixart")  # DPMSolverMultistepScheduler, not flow matching
    original = pipe.scheduler
    calls = Tokens(pipe)
    try:
        with pytest.raises(PolicyError, match="flow-matching scheduler"):
            bottleneck_sample(pipe, stages=THREE, prompt="a cat", height=32, width=32, output_type="latent")
    finally:
        calls.close()
    assert pipe.scheduler is original and calls.shapes == []
