"""Regression tests for results that used to be silently wrong (each failed before its fix).

ControlNet residuals added inside the block loop, generation boundaries whatever the pipeline does,
steps that are not transformer calls, calibrations applied to what they were not made for, and
guidance composed with forecasting caches on batched CFG.
"""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline, tiny_transformer

# ---------------------------------------------------------------------------------------------------
# 1. ControlNet residuals on reused steps
# ---------------------------------------------------------------------------------------------------

# A setting of each method whose cached range spans several blocks and that reuses on the second of
# two calls with identical inputs.
RANGE_METHODS = {
    "fora": {"method": "fora", "interval": 2},
    "taylorseer": {"method": "taylorseer", "interval": 2, "warmup_steps": 1},
    "fbcache": {"method": "fbcache", "threshold": 10.0},
    "dbcache": {"method": "dbcache", "fn_compute": 1, "bn_compute": 1, "threshold": 10.0},
    "teacache": {"method": "teacache", "threshold": 10.0, "coefficients": [1.0, 0.0], "compute_last_step": False},
    "magcache": {"method": "magcache", "threshold": 1.0, "retention_ratio": 0.0,
                 "mag_ratios": {"default": [1.0, 1.0, 1.0]}},
    "ertacache": {"method": "ertacache", "timestep_adjust": False, "compute_steps": {"default": [0]},
                  "scale": {"default": [1.0, 1.0]}, "shift": {"default": [0.0, 0.0]}},
    "delta_dit": {"method": "delta_dit", "boundary": 100, "cached_blocks": 3},
    "cg_taylor": {"method": "cg_taylor", "threshold": 10.0, "warmup_steps": 1, "final_steps": 0},
}


def _control_call(family: str):
    """A transformer of ``family`` and a call with ControlNet residuals for its block loop."""
    transformer = tiny_transformer(family)
    g = torch.Generator().manual_seed(0)
    if family == "flux":
        tokens, text = 16, 8
        img_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], 1)
        kwargs = dict(hidden_states=torch.randn(1, tokens, 16, generator=g),
                      encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                      pooled_projections=torch.randn(1, 16, generator=g), img_ids=img_ids,
                      txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5]),
                      controlnet_block_samples=[torch.randn(1, tokens, 32, generator=g) for _ in range(2)],
                      controlnet_single_block_samples=[torch.randn(1, tokens, 32, generator=g) for _ in range(2)])
        timestep = torch.tensor([0.5])
    else:  # sd3, batched CFG
        kwargs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                      encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                      pooled_projections=torch.randn(2, 32, generator=g),
                      block_controlnet_hidden_states=[torch.randn(2, 16, 16, generator=g) for _ in range(2)])
        timestep = torch.tensor([500.0, 500.0])

    def call():
        with torch.no_grad():
            return transformer(timestep=timestep, return_dict=False, **kwargs)[0]

    return transformer, call


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("method", sorted(RANGE_METHODS))
def test_reused_step_does_not_count_control_residuals_twice(family, method):
    transformer, call = _control_call(family)
    reference = call()
    dit_accel.accelerate(transformer, {"cache": RANGE_METHODS[method]})
    try:
        computed, reused = call(), call()
        stats = dit_accel.stats(transformer)
    finally:
        dit_accel.remove(transformer)
    assert stats.blocks_reused > 0, f"{method} must reuse on the second call"
    assert torch.equal(computed, reference)
    # identical inputs: reusing the step's own block work must give the computed output (it was 12-28% off)
    torch.testing.assert_close(reused, reference, rtol=1e-5, atol=1e-5)


def _reinit_zero(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.normal_(0.0, std)  # ControlNets start with zero output projections


def _controlnet_pipeline(family: str):
    from diffusers import (FluxControlNetModel, FluxControlNetPipeline, SD3ControlNetModel,
                           StableDiffusion3ControlNetPipeline)

    base = tiny_pipeline(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        if family == "flux":
            net = FluxControlNetModel.from_transformer(base.transformer, num_layers=1, num_single_layers=1,
                                                       attention_head_dim=16, num_attention_heads=2)
            pipe_cls = FluxControlNetPipeline
        else:
            net = SD3ControlNetModel.from_transformer(base.transformer, num_layers=2,
                                                      num_extra_conditioning_channels=0)
            pipe_cls = StableDiffusion3ControlNetPipeline
        _reinit_zero(net, 0.05)
    pipe = pipe_cls(**base.components, controlnet=net.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_controlnet_pipelines_one_residual_for_the_stack_equals_per_block(family):
    """Per-block ranges are right by construction (the loop's additions are outside every range); one
    residual for the whole stack must give the same images (up to rounding) with ControlNet on."""
    pipe = _controlnet_pipeline(family)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def generate():
        torch.manual_seed(0)  # the SD3 ControlNet pipeline samples its control latents from the global RNG
        return pipe(**tiny_call_kwargs(family, control_image=image, controlnet_conditioning_scale=1.0)).images

    baseline = generate()
    outputs = {}
    for granularity in ("block", "stack"):
        with dit_accel.accelerated(pipe, {"cache": {"method": "fora", "interval": 2, "granularity": granularity}}):
            outputs[granularity] = generate()
            assert dit_accel.stats(pipe).saved_share > 0.4
    assert not torch.allclose(outputs["block"], baseline)
    torch.testing.assert_close(outputs["stack"], outputs["block"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# 2. A new generation is detected whatever the pipeline does; cached tensors freed at every call's end
# ---------------------------------------------------------------------------------------------------

FORA2 = {"cache": {"method": "fora", "interval": 2}}


def _generate(pipe, family, **overrides):
    out = pipe(**tiny_call_kwargs(family, **overrides))
    return (out.frames if hasattr(out, "frames") else out.images).float()


@pytest.mark.parametrize("family", ["dit", "sd3", "flux", "wan"])
def test_scheduler_swap_starts_a_new_generation(family):
    pipe = tiny_pipeline(family)
    with dit_accel.accelerated(pipe, FORA2):
        fresh = _generate(pipe, family)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        swapped = _generate(pipe, family)
        stats = dit_accel.stats(pipe)
    assert torch.equal(swapped, fresh), "the call after a scheduler swap reused the previous call's residuals"
    assert stats.num_inference_steps == 4 and stats.transformer_calls == 4 * len(stats.calls_per_branch)


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_two_pipelines_sharing_one_transformer_give_identical_outputs(family):
    pipe_a = tiny_pipeline(family)
    components = dict(pipe_a.components)
    components["scheduler"] = type(pipe_a.scheduler).from_config(pipe_a.scheduler.config)
    extra = {"id2label": {0: "tench", 1: "goldfish"}} if family == "dit" else {}
    pipe_b = type(pipe_a)(**components, **extra)
    pipe_b.set_progress_bar_config(disable=True)
    with dit_accel.accelerated(pipe_a, FORA2):
        a1 = _generate(pipe_a, family)
        b1 = _generate(pipe_b, family)
        b2 = _generate(pipe_b, family)
        a2 = _generate(pipe_a, family)
        assert dit_accel.stats(pipe_b).transformer_calls == 4  # pipe_b's call, through the shared transformer
    assert torch.equal(a1, b1) and torch.equal(b1, b2) and torch.equal(a1, a2)


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "dit", "wan", "hunyuan_video", "cogvideox"])
def test_cached_tensors_are_freed_at_the_end_of_every_call(family):
    pipe = tiny_pipeline(family)
    with dit_accel.accelerated(pipe, FORA2):
        _generate(pipe, family)
        assert dit_accel.stats(pipe).cache_bytes > 0  # what the call held before it ended
        assert dit_accel.inspect(pipe).held_bytes == 0


# ---------------------------------------------------------------------------------------------------
# 5. Steps are transformer calls: second-order samplers, img2img
# ---------------------------------------------------------------------------------------------------

TEACACHE_ALWAYS = {"cache": {"method": "teacache", "threshold": 100.0, "coefficients": [1.0, 0.0],
                             "warmup_steps": 1, "compute_last_step": True}}


def _computed_calls(pipe, run) -> tuple[list[int], int]:
    """Indices of the transformer calls on which the last block really computed, and the number of calls."""
    calls, computed = [0], []
    transformer = pipe.transformer
    last = list(transformer.transformer_blocks)[-1]
    inner = next(m for m in last.children())  # runs only when the block is not skipped
    h1 = transformer.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    h2 = inner.register_forward_pre_hook(lambda *a: computed.append(calls[0] - 1))
    try:
        run()
    finally:
        h1.remove()
        h2.remove()
    return sorted(set(computed)), calls[0]


def test_second_order_sampler_schedules_index_transformer_calls():
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = tiny_pipeline("sd3")
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with dit_accel.accelerated(pipe, TEACACHE_ALWAYS):
        computed, calls = _computed_calls(pipe, lambda: _generate(pipe, "sd3"))
        stats = dit_accel.stats(pipe)
    assert calls == 7 and stats.planned_calls == 7 and stats.num_inference_steps == 4
    assert computed == [0, 6], "only the first call and the last call are forced; the last fired halfway before"


def _img2img(family="sd3"):
    from diffusers import StableDiffusion3Img2ImgPipeline

    base = tiny_pipeline(family)
    pipe = StableDiffusion3Img2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = tiny_call_kwargs(family, num_inference_steps=8, strength=0.5, image=image)
    for key in ("height", "width"):
        kwargs.pop(key)
    return pipe, kwargs


def test_img2img_schedules_know_the_calls_that_run():
    pipe, kwargs = _img2img()
    with dit_accel.accelerated(pipe, TEACACHE_ALWAYS):
        computed, calls = _computed_calls(pipe, lambda: pipe(**kwargs))
        stats = dit_accel.stats(pipe)
    assert calls == 4 and stats.planned_calls == 4 and stats.num_inference_steps == 8
    assert computed == [0, 3], "the last call must be computed"


def test_img2img_reads_calibrated_curves_at_its_schedule_position():
    # a curve that allows reuse in the first half of the 8-step schedule and forbids it in the second
    curve = [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0]
    policy = {"cache": {"method": "magcache", "threshold": 0.5, "retention_ratio": 0.0,
                        "mag_ratios": {"default": curve}}}
    pipe, kwargs = _img2img()
    with dit_accel.accelerated(pipe, policy):
        pipe(**kwargs)  # calls 0..3 are positions 4..7 of the schedule
        assert dit_accel.stats(pipe).blocks_reused == 0
        pipe(**{**kwargs, "strength": 1.0})  # the full schedule reuses in its first half
        assert dit_accel.stats(pipe).blocks_reused > 0


def test_calibration_refuses_a_partial_schedule():
    pipe, kwargs = _img2img()
    prompt = kwargs.pop("prompt")
    with pytest.raises(dit_accel.PolicyError, match="strength"):
        dit_accel.calibrate(pipe, [prompt], "magcache", **kwargs)


def test_custom_loop_reset_gives_the_calls_of_a_generation():
    transformer, call = _control_call("sd3")
    dit_accel.accelerate(transformer, TEACACHE_ALWAYS)
    try:
        with pytest.raises(dit_accel.PolicyError, match="positive integer"):
            dit_accel.reset(transformer, num_inference_steps=0)
        dit_accel.reset(transformer, num_inference_steps=3)
        for _ in range(3):
            call()
        stats = dit_accel.stats(transformer)
    finally:
        dit_accel.remove(transformer)
    assert stats.planned_calls == 3
    assert stats.reused[-1] == 1  # call 0 warm-up, call 1 reused, call 2 the last: computed


# ---------------------------------------------------------------------------------------------------
# 7. Adaptive guidance composed with forecasting caches on batched CFG
# ---------------------------------------------------------------------------------------------------

FORECASTS = {"taylorseer": {"method": "taylorseer", "interval": 2, "warmup_steps": 1},
             "cg_taylor": {"method": "cg_taylor", "threshold": 10.0, "warmup_steps": 1, "final_steps": 0}}


@pytest.mark.parametrize("family", ["dit", "sd3"])
@pytest.mark.parametrize("method", sorted(FORECASTS))
def test_adaptive_guidance_switch_keeps_forecast_state(family, method):
    pipe = tiny_pipeline(family)
    guidance = {"method": "adaptive", "threshold": -1.0, "min_steps": 2}
    with dit_accel.accelerated(pipe, {"cache": FORECASTS[method], "guidance": guidance}):
        out = _generate(pipe, family, num_inference_steps=6)
        stats = dit_accel.stats(pipe)
    assert stats.guidance_skipped_calls == 4 and stats.blocks_reused > 0
    assert torch.isfinite(out).all()
    # never forecasting, the composition is exactly guidance alone
    never = {**FORECASTS[method], **({"interval": 1} if method == "taylorseer" else {"threshold": 0.0})}
    with dit_accel.accelerated(pipe, {"cache": never, "guidance": guidance}):
        composed = _generate(pipe, family, num_inference_steps=6)
    with dit_accel.accelerated(pipe, {"guidance": guidance}):
        alone = _generate(pipe, family, num_inference_steps=6)
    assert torch.equal(composed, alone)


# ---------------------------------------------------------------------------------------------------
# 8. A calibration knows what it was made for
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_magcache():
    pipe = tiny_pipeline("sd3")
    kwargs = tiny_call_kwargs("sd3")
    prompt = kwargs.pop("prompt")
    return dit_accel.calibrate(pipe, [prompt], "magcache", **kwargs)


def test_calibration_records_what_it_ran_on(sd3_magcache, tmp_path):
    made_for = sd3_magcache.calibrated_for
    assert (made_for.model, made_for.blocks, made_for.branches, made_for.calls, made_for.scheduler) == (
        "SD3Transformer2DModel", 4, ("default",), 4, "FlowMatchEulerDiscreteScheduler")
    sd3_magcache.save(tmp_path / "p.yaml")
    assert dit_accel.load_policy(tmp_path / "p.yaml").calibrated_for == made_for


def test_calibration_refused_on_another_depth(sd3_magcache):
    from diffusers import SD3Transformer2DModel

    deeper = SD3Transformer2DModel.from_config({**tiny_transformer("sd3").config, "num_layers": 6})
    with pytest.raises(dit_accel.PolicyError, match="calibrated on a SD3Transformer2DModel with 4 blocks"):
        dit_accel.accelerate(deeper, sd3_magcache)
    assert not dit_accel.is_accelerated(deeper)


def test_curve_of_batched_cfg_refused_on_separate_calls(sd3_magcache):
    # the same curve, without the provenance record, on Wan's separate cond/uncond calls
    import dataclasses

    bare = dataclasses.replace(sd3_magcache, calibrated_for=None)
    pipe = tiny_pipeline("wan")
    with dit_accel.accelerated(pipe, bare):
        with pytest.raises(dit_accel.PolicyError, match="branch"):
            _generate(pipe, "wan")


def test_other_step_count_warns(sd3_magcache, caplog):
    pipe = tiny_pipeline("sd3")
    with dit_accel.accelerated(pipe, sd3_magcache), caplog.at_level("WARNING", logger="dit_accel"):
        _generate(pipe, "sd3", num_inference_steps=6)
    assert "calibrated for 4 transformer calls per branch, this generation makes 6" in caplog.text


# ---------------------------------------------------------------------------------------------------
# Entry points: wrapped, compiled, meta-device and already-cached transformers; keyword overrides
# ---------------------------------------------------------------------------------------------------


def test_compiled_transformer_is_accelerated_through_the_module_it_wraps():
    plain = tiny_pipeline("dit")
    with dit_accel.accelerated(plain, FORA2):
        expected = _generate(plain, "dit")
    pipe = tiny_pipeline("dit")
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with dit_accel.accelerated(pipe, FORA2):
        got = _generate(pipe, "dit")
        assert dit_accel.stats(pipe).blocks_reused > 0
    torch.testing.assert_close(got, expected)
    assert not hasattr(pipe.transformer._orig_mod, "_dit_accel")


def test_meta_device_weights_with_quantization_are_refused_before_anything_attaches():
    from accelerate import init_empty_weights
    from diffusers import DiTTransformer2DModel

    config = tiny_transformer("dit").config
    with init_empty_weights():
        model = DiTTransformer2DModel.from_config(config)
    with pytest.raises(dit_accel.PolicyError, match="meta device"):
        dit_accel.accelerate(model, {"cache": {"method": "fora"}, "quant": {"linear": "int8_weight_only"}})
    assert not dit_accel.is_accelerated(model) and not hasattr(model.transformer_blocks[0], "_diffusers_hook")


def test_diffusers_own_cache_is_refused():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = tiny_pipeline("flux")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(dit_accel.PolicyError, match="disable_cache"):
        dit_accel.accelerate(pipe, "fora")
    pipe.transformer.disable_cache()
    dit_accel.accelerate(pipe, "fora")
    dit_accel.remove(pipe)


def test_keyword_overrides_change_the_cache_section():
    pipe = tiny_pipeline("dit")
    with dit_accel.accelerated(pipe, "fbcache", threshold=0.2):
        assert dit_accel.policy_of(pipe).cache.threshold == 0.2
    with pytest.raises(dit_accel.PolicyError, match="thresold"):
        dit_accel.accelerate(pipe, "fbcache", thresold=0.2)
    assert not dit_accel.is_accelerated(pipe)
    with pytest.raises(dit_accel.PolicyError, match="got None"):
        dit_accel.accelerate(None, "fora")
