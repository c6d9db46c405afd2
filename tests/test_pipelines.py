"""End-to-end behaviour on the tiny offline pipelines of every tier-1 family.

Off means exact (empty policy, threshold 0, after ``remove``); reuse happens with a loose
threshold and with FORA; state is reset per call and kept apart per CFG branch; ``remove``
leaves nothing behind; offloading composes in either order.
"""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.testing import CFG_LAYOUT, FAMILIES, tiny_call_kwargs, tiny_generate, tiny_pipeline

LOOSE = {"name": "loose", "cache": {"method": "fbcache", "threshold": 10.0}}
NEVER = {"name": "never", "cache": {"method": "fbcache", "threshold": 0.0}}


def generate(pipe, family, **overrides) -> torch.Tensor:
    return tiny_generate(pipe, family, **overrides)


def hook_footprint(pipe) -> list:
    """Everything a hook could leave on the transformer and its submodules, and on the scheduler.

    (diffusers itself leaves an empty HookRegistry on the transformer after any pipeline call.)"""
    found = []
    for name, module in pipe.transformer.named_modules():
        if getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook.hooks:
            found.append((name, "registry", tuple(module._diffusers_hook.hooks)))
        if "forward" in module.__dict__:
            found.append((name, "forward"))
        if module._forward_pre_hooks or module._forward_hooks:
            found.append((name, "torch hooks"))
        if hasattr(module, "_dit_accel"):
            found.append((name, "handle"))
    if "set_timesteps" in pipe.scheduler.__dict__:
        found.append(("scheduler", "set_timesteps"))
    if hasattr(pipe, "_dit_accel"):
        found.append(("pipeline", "handle"))
    return found


@pytest.fixture(scope="module", params=FAMILIES)
def family_pipe(request):
    family = request.param
    pipe = tiny_pipeline(family)
    return family, pipe, generate(pipe, family)


def test_off_means_exact(family_pipe):
    family, pipe, baseline = family_pipe
    clean = hook_footprint(pipe)
    for policy in ("none", NEVER):
        with dit_accel.accelerated(pipe, policy):
            assert torch.equal(generate(pipe, family), baseline), policy
            stats = dit_accel.stats(pipe)
            assert stats.blocks_reused == 0
            assert stats.transformer_calls > 0
    assert hook_footprint(pipe) == clean == []
    assert torch.equal(generate(pipe, family), baseline)


def test_reuse_happens_with_loose_threshold_and_fora(family_pipe):
    family, pipe, baseline = family_pipe
    for policy in (LOOSE, "fora"):
        with dit_accel.accelerated(pipe, policy):
            out = generate(pipe, family)
            stats = dit_accel.stats(pipe)
        assert stats.blocks_reused > 0, (family, policy)
        assert 0 < stats.saved_share < 1
        assert torch.isfinite(out).all()
        assert not torch.equal(out, baseline), "reusing stale residuals must change the output"
    assert torch.equal(generate(pipe, family), baseline)


def test_steps_counted_per_branch(family_pipe):
    family, pipe, _ = family_pipe
    steps = tiny_call_kwargs(family)["num_inference_steps"]
    with dit_accel.accelerated(pipe, "fora"):
        generate(pipe, family)
        stats = dit_accel.stats(pipe)
    assert stats.num_inference_steps == steps
    branches = stats.calls_per_branch
    if CFG_LAYOUT[family] == "separate":
        assert branches == {"cond": steps, "uncond": steps}
    else:
        assert list(branches.values()) == [steps]


def test_second_call_is_independent(family_pipe):
    """Reset between calls: call B after call A equals call B on a fresh attachment."""
    family, pipe, _ = family_pipe
    with dit_accel.accelerated(pipe, LOOSE):
        fresh_b = generate(pipe, family, seed=1)
    with dit_accel.accelerated(pipe, LOOSE):
        generate(pipe, family, seed=0)
        after_a = generate(pipe, family, seed=1)
    assert torch.equal(after_a, fresh_b)


@pytest.mark.parametrize("change", ["steps", "resolution", "batch"])
def test_second_call_with_other_shape_or_steps(change):
    family = "pixart"
    pipe = tiny_pipeline(family)
    overrides = {"steps": {"num_inference_steps": 6},
                 "resolution": {"height": 32, "width": 32},
                 "batch": {"prompt": ["a photo of a cat", "a photo of a dog"]}}[change]
    with dit_accel.accelerated(pipe, "fora"):
        expected = generate(pipe, family, **overrides)
        expected_stats = dit_accel.stats(pipe).to_dict()
    with dit_accel.accelerated(pipe, "fora"):
        generate(pipe, family)
        got = generate(pipe, family, **overrides)
        assert dit_accel.stats(pipe).to_dict() == expected_stats
    assert torch.equal(got, expected)


def test_cfg_branches_never_share_cache():
    """Separate cond/uncond calls (Wan) get separate states, each counting its own steps."""
    pipe = tiny_pipeline("wan")
    snapshots: list[dict] = []

    def spy(module, args, kwargs):  # inside every transformer call, before its first block
        snapshots.append(dict(dit_accel.inspect(pipe)["transformer"].branches))

    with dit_accel.accelerated(pipe, "fora"):
        handle = pipe.transformer.blocks[0].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            generate(pipe, "wan")
        finally:
            handle.remove()
    steps = tiny_call_kwargs("wan")["num_inference_steps"]
    assert len(snapshots) == 2 * steps
    final = snapshots[-1]
    assert sorted(key[0] for key in final) == ["cond", "uncond"]
    assert sorted(final.values()) == [steps - 1, steps]  # the last uncond call has not ended yet
    for i, snap in enumerate(snapshots):  # cond and uncond alternate; each advances only its own step
        steps_now = {key[0]: step for key, step in snap.items()}
        assert steps_now == ({"cond": (i + 1) // 2, "uncond": i // 2} if i else {"cond": 0}), (i, snap)


def test_remove_leaves_nothing_and_double_accelerate_raises():
    pipe = tiny_pipeline("flux")
    before = hook_footprint(pipe)
    dit_accel.accelerate(pipe, "fbcache")
    with pytest.raises(dit_accel.PolicyError, match="already accelerated"):
        dit_accel.accelerate(pipe, "fora")
    with pytest.raises(dit_accel.PolicyError, match="already accelerated"):
        dit_accel.accelerate(pipe.transformer, "fora")
    assert hook_footprint(pipe) != before
    dit_accel.remove(pipe)
    assert hook_footprint(pipe) == before == []
    with pytest.raises(dit_accel.PolicyError, match="not accelerated"):
        dit_accel.remove(pipe)


def test_scheduler_swap_still_resets():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_pipeline("flux")
    with dit_accel.accelerated(pipe, LOOSE):
        expected = generate(pipe, "flux", seed=1)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        generate(pipe, "flux", seed=0)
        assert torch.equal(generate(pipe, "flux", seed=1), expected)
    assert "set_timesteps" not in pipe.scheduler.__dict__


@pytest.mark.parametrize("order", ["offload_first", "accelerate_first"])
@pytest.mark.parametrize("offload", ["model_cpu_offload", "group_offload"])
def test_composes_with_offloading(order, offload):
    family = "flux"
    pipe = tiny_pipeline(family)
    baseline = generate(pipe, family)
    with dit_accel.accelerated(pipe, "fora"):
        expected = generate(pipe, family)

    def apply_offload():
        if offload == "model_cpu_offload":
            pipe.enable_model_cpu_offload(device="cpu")
        else:
            pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"),
                                                  offload_device=torch.device("cpu"),
                                                  offload_type="block_level", num_blocks_per_group=1)

    if order == "offload_first":
        apply_offload()
        dit_accel.accelerate(pipe, "fora")
    else:
        dit_accel.accelerate(pipe, "fora")
        apply_offload()
    for _ in range(2):  # model offload re-wraps the transformer at the end of every call
        assert torch.equal(generate(pipe, family), expected)
        assert dit_accel.stats(pipe).blocks_reused > 0
    dit_accel.remove(pipe)
    assert torch.equal(generate(pipe, family), baseline)
