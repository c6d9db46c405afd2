"""Adaptive Guidance (Castillo et al., 2023) on the tiny pipelines: plain CFG until its switch step, half the
unconditional work after it, for batched CFG ([uncond, cond]: PixArt; [cond, uncond]: DiTPipeline) and for
separate cond/uncond calls (Wan); composition with caching, ``remove``, policy validation, bare transformers.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import dit_accel
from dit_accel import Policy, PolicyError, load_policy
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline, tiny_transformer

STEPS = 6
BATCHED = ("pixart", "dit")
ORDER = {"pixart": "uncond_first", "dit": "cond_first"}


def ag(threshold: float, min_steps: int = 1, cache: dict | None = None, **extra) -> dict:
    return {"name": "ag", "cache": cache,
            "guidance": {"method": "adaptive", "threshold": threshold, "min_steps": min_steps, **extra}}


def generate(pipe, family, **overrides) -> torch.Tensor:
    out = pipe(**tiny_call_kwargs(family, num_inference_steps=STEPS, **overrides))
    return out.frames if hasattr(out, "frames") else out.images


def sample_of(output):
    return output.sample if hasattr(output, "sample") else output[0]


class Recorder:
    """Per transformer call: the batch it saw (after any pre hook) and its output (after any post hook);
    and how often each block's attention really ran."""

    def __init__(self, pipe):
        transformer = pipe.transformer
        self.batches, self.outputs, self.attn_calls = [], [], 0
        blocks = transformer.blocks if hasattr(transformer, "blocks") else transformer.transformer_blocks
        self.handles = [transformer.register_forward_pre_hook(self.pre, with_kwargs=True),
                        transformer.register_forward_hook(self.post)]
        self.handles += [b.attn1.register_forward_hook(self.attn) for b in blocks]

    def pre(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.batches.append(hidden.shape[0])

    def post(self, module, args, output):
        self.outputs.append(sample_of(output).clone())

    def attn(self, module, args, output):
        self.attn_calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def record(pipe, family, policy=None, **overrides):
    """Generate (accelerated by ``policy`` when given), recording every transformer call. The recorder's
    torch hooks are registered after dit_accel's, so they see what the model really gets and returns."""
    stats = None
    if policy is not None:
        dit_accel.accelerate(pipe, policy)
    rec = Recorder(pipe)
    try:
        out = generate(pipe, family, **overrides)
        if policy is not None:
            stats = dit_accel.stats(pipe)
    finally:
        rec.remove()
        if policy is not None:
            dit_accel.remove(pipe)
    return out, stats, rec


@pytest.fixture(scope="module", params=[*BATCHED, "wan"])
def family_pipe(request):
    family = request.param
    pipe = tiny_pipeline(family)
    return family, pipe, record(pipe, family)


def test_never_switching_is_bit_exact(family_pipe):
    family, pipe, (baseline, _, base_rec) = family_pipe
    out, stats, rec = record(pipe, family, ag(threshold=1.5))
    assert torch.equal(out, baseline)
    assert stats.guidance_switch_step == {} and stats.guidance_skipped_calls == 0
    assert rec.batches == base_rec.batches and rec.attn_calls == base_rec.attn_calls
    assert "adaptive_guidance" in stats.guidance and "never" in stats.summary()
    assert torch.equal(generate(pipe, family), baseline)


@pytest.mark.parametrize("min_steps", [1, 3])
def test_switch_after_min_steps(family_pipe, min_steps):
    """threshold -1: plain CFG for ``min_steps`` steps (bit-identical), then no unconditional work."""
    family, pipe, (baseline, _, base_rec) = family_pipe
    out, stats, rec = record(pipe, family, ag(threshold=-1.0, min_steps=min_steps))
    switch = min_steps
    assert not torch.equal(out, baseline) and torch.isfinite(out).all()
    blocks = base_rec.attn_calls // len(base_rec.batches)
    if family in BATCHED:
        assert stats.guidance_switch_step == {"default": switch}
        assert stats.guidance_skipped_calls == STEPS - switch
        full = base_rec.batches[0]
        assert base_rec.batches == [full] * STEPS
        assert rec.batches == [full] * switch + [full // 2] * (STEPS - switch)
        assert rec.attn_calls == base_rec.attn_calls  # every call still runs every block, on half the rows
        before = range(switch)
        for step in range(switch, STEPS):  # the completed output holds the conditional rows twice
            first, second = rec.outputs[step].chunk(2)
            assert torch.equal(first, second)
    else:
        assert stats.guidance_switch_step == {"uncond": switch}
        assert stats.guidance_skipped_calls == STEPS - switch
        assert stats.calls_per_branch == {"cond": STEPS, "uncond": switch}
        assert rec.batches == base_rec.batches  # the pipeline still makes the uncond call ...
        assert rec.attn_calls == base_rec.attn_calls - (STEPS - switch) * blocks  # ... but no block runs in it
        assert stats.blocks_computed == (STEPS + switch) * blocks
        before = range(2 * switch)
        for step in range(switch, STEPS):  # uncond output replaced by the same step's cond output
            assert torch.equal(rec.outputs[2 * step + 1], rec.outputs[2 * step])
    for i in before:  # plain CFG until the switch, bit for bit
        assert torch.equal(rec.outputs[i], base_rec.outputs[i]), i
    # a second call starts over (the switch is per generation)
    again, stats_again, _ = record(pipe, family, ag(threshold=-1.0, min_steps=min_steps))
    assert torch.equal(again, out) and stats_again.to_dict() == stats.to_dict()


def test_switched_output_is_conditional_only(family_pipe):
    """After the switch the result equals CFG whose unconditional prediction is replaced by the conditional
    one (computed here on the full batch by a hook, with the row order of the pipeline)."""
    family, pipe, _ = family_pipe
    switch = 2
    out, stats, _ = record(pipe, family, ag(threshold=-1.0, min_steps=switch))
    calls = []

    def conditional_only(module, args, output):
        calls.append(1)
        n = len(calls) - 1
        if family in BATCHED:
            if n < switch:
                return None
            first, second = output.sample.chunk(2) if hasattr(output, "sample") else output[0].chunk(2)
            cond = first if ORDER[family] == "cond_first" else second
            full = torch.cat([cond, cond])
        else:
            if n // 2 < switch or n % 2 == 0:
                if n % 2 == 0:
                    calls_cond.append(sample_of(output))
                return None
            full = calls_cond[-1]
        return type(output)(sample=full) if hasattr(output, "sample") else (full, *output[1:])

    calls_cond: list = []
    handle = pipe.transformer.register_forward_hook(conditional_only)
    try:
        reference = generate(pipe, family)
    finally:
        handle.remove()
    if family in BATCHED:  # half-batch numerics may differ in the last bits
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(out, reference)


def test_threshold_decides(family_pipe):
    """The switch happens at the first step whose cosine(cond, guided) passes the threshold."""
    family, pipe, _ = family_pipe
    rt_cos = []
    from dit_accel.caching.adaptive_guidance import AdaptiveGuidance

    original = AdaptiveGuidance.converged

    def spy(self, cond, uncond, scale):
        rt_cos.append(float(self.cosine(cond, uncond + scale * (cond - uncond)).min()))
        return original(self, cond, uncond, scale)

    AdaptiveGuidance.converged = spy
    try:
        _, stats, _ = record(pipe, family, ag(threshold=1.5))
    finally:
        AdaptiveGuidance.converged = original
    assert len(rt_cos) == STEPS and all(-1 <= c <= 1 + 1e-9 for c in rt_cos)
    threshold = sorted(rt_cos)[len(rt_cos) // 2]  # passed by about half the steps
    first = next(i for i, c in enumerate(rt_cos) if c >= threshold)
    _, stats, _ = record(pipe, family, ag(threshold=threshold))
    assert list(stats.guidance_switch_step.values()) == [first + 1]


def test_composes_with_cache_and_remove(family_pipe):
    family, pipe, (baseline, _, _) = family_pipe
    fora_out, fora_stats, fora_rec = record(pipe, family, {"cache": {"method": "fora", "interval": 3}})
    switch = 2  # FORA reuses at step 2 the residuals stored at step 0 (full batch): they are cut to the cond rows
    policy = ag(threshold=-1.0, min_steps=switch, cache={"method": "fora", "interval": 3})
    out, stats, rec = record(pipe, family, policy)
    assert stats.blocks_reused > 0 and stats.guidance_skipped_calls == STEPS - switch
    assert torch.isfinite(out).all()
    per_step = 1 if family in BATCHED else 2
    for i in range(switch * per_step):
        assert torch.equal(rec.outputs[i], fora_rec.outputs[i]), i
    step2 = rec.outputs[switch * per_step]
    ref2 = fora_rec.outputs[switch * per_step]
    if family in BATCHED:
        first, second = ref2.chunk(2)
        cond = first if ORDER[family] == "cond_first" else second
        torch.testing.assert_close(step2, torch.cat([cond, cond]), rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(step2, ref2)  # the cond call is unchanged by guidance
        assert stats.calls_per_branch == {"cond": STEPS, "uncond": switch}
    assert torch.equal(generate(pipe, family), baseline)  # removed: bit-exact again


def test_remove_leaves_nothing():
    from test_pipelines import hook_footprint

    pipe = tiny_pipeline("wan")
    dit_accel.accelerate(pipe, "adaptive_guidance")
    assert any("dit_accel.block" in str(f) for f in hook_footprint(pipe))
    # guidance hooks every block (a dropped uncond call passes through all of them)
    registries = [b._diffusers_hook.hooks for b in pipe.transformer.blocks]
    assert all("dit_accel.block" in r for r in registries)
    dit_accel.remove(pipe)
    assert hook_footprint(pipe) == []


def test_cfg_order_override_is_used():
    """A wrong cfg_order keeps the unconditional rows instead: the result changes (so the order matters)."""
    pipe = tiny_pipeline("dit")
    right, _, _ = record(pipe, "dit", ag(threshold=-1.0, min_steps=2))
    explicit, _, _ = record(pipe, "dit", ag(threshold=-1.0, min_steps=2, cfg_order="cond_first"))
    wrong, _, _ = record(pipe, "dit", ag(threshold=-1.0, min_steps=2, cfg_order="uncond_first"))
    assert torch.equal(right, explicit)
    assert not torch.allclose(right, wrong, atol=1e-3)


def test_no_cfg_call_is_left_alone():
    """guidance_scale <= 1: the batched pipeline runs one unguided batch, which AG must not cut."""
    pipe = tiny_pipeline("pixart")
    baseline = generate(pipe, "pixart", guidance_scale=1.0)
    with dit_accel.accelerated(pipe, ag(threshold=-1.0)):
        assert torch.equal(generate(pipe, "pixart", guidance_scale=1.0), baseline)
        assert dit_accel.stats(pipe).guidance_skipped_calls == 0


# ---- bare transformers (custom loops) -------------------------------------------------------------

def test_bare_transformer_batched():
    model = tiny_transformer("dit")
    with pytest.raises(PolicyError, match="guidance.cfg_order"):
        dit_accel.accelerate(model, ag(threshold=-1.0, guidance_scale=4.0))
    with pytest.raises(PolicyError, match="guidance.guidance_scale"):
        dit_accel.accelerate(model, ag(threshold=-1.0, cfg_order="uncond_first"))
    assert not dit_accel.is_accelerated(model)
    seen = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    labels = torch.tensor([1000, 3])  # [uncond (null class), cond]
    with dit_accel.accelerated(model, ag(threshold=-1.0, min_steps=2, cfg_order="uncond_first", guidance_scale=4.0)):
        handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[0]),
                                                 with_kwargs=True)  # after dit_accel's: sees the cut batch
        outs = [model(hidden_states=x, timestep=torch.tensor([t, t]), class_labels=labels, return_dict=False)[0]
                for t in (900, 600, 300, 100)]
        stats = dit_accel.stats(model)
    handle.remove()
    assert seen == [2, 2, 1, 1]
    assert stats.guidance_switch_step == {"default": 2} and stats.guidance_skipped_calls == 2
    for out in outs[2:]:
        assert out.shape[0] == 2 and torch.equal(out[0], out[1])
    ref = model(hidden_states=x, timestep=torch.tensor([100, 100]), class_labels=labels).sample
    torch.testing.assert_close(outs[3][1], ref[1], rtol=1e-4, atol=1e-5)


def test_bare_transformer_separate_calls_with_output_dataclass():
    model = tiny_transformer("wan")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    cond_text, uncond_text = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    policy = ag(threshold=-1.0, min_steps=1, guidance_scale=5.0)
    with dit_accel.accelerated(model, policy):
        pairs = []
        for t in (900.0, 500.0, 100.0):
            timestep = torch.tensor([t])
            with model.cache_context("cond"):
                c = model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond_text).sample
            with model.cache_context("uncond"):
                u = model(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond_text).sample
            pairs.append((c, u))
        stats = dit_accel.stats(model)
    assert stats.guidance_switch_step == {"uncond": 1} and stats.calls_per_branch == {"cond": 3, "uncond": 1}
    assert not torch.equal(*pairs[0])
    assert all(torch.equal(c, u) for c, u in pairs[1:])


# ---- policy -----------------------------------------------------------------------------------------

def test_policy_round_trips_and_preset(tmp_path):
    p = load_policy(ag(threshold=0.99, min_steps=3, cache={"method": "fora"}, cfg_order="cond_first",
                       guidance_scale=4))
    assert isinstance(p.guidance.guidance_scale, float) and not p.is_empty
    d = p.to_dict()
    assert d["guidance"]["threshold"] == 0.99 and d["cache"]["method"] == "fora"
    assert Policy.from_dict(d) == p and Policy.from_dict(yaml.safe_load(p.to_yaml())) == p
    p.save(tmp_path / "p.yaml")
    assert load_policy(tmp_path / "p.yaml") == p
    assert "guidance" not in load_policy("fora").to_dict()  # policies without guidance serialise as before
    preset = load_policy("adaptive_guidance")
    assert preset.cache is None and preset.guidance.threshold == 0.991
    assert p.replace(interval=5).guidance == p.guidance


@pytest.mark.parametrize("guidance, fragments", [
    ({"threshold": 0.9}, ["guidance.method", "adaptive"]),
    ({"method": "apg"}, ["guidance.method", "'apg'", "adaptive"]),
    ({"method": "adaptive", "threshold": "high"}, ["guidance.threshold", "number"]),
    ({"method": "adaptive", "threshold": -2}, ["guidance.threshold", ">= -1"]),
    ({"method": "adaptive", "min_steps": 0}, ["guidance.min_steps", ">= 1"]),
    ({"method": "adaptive", "min_steps": 1.5}, ["guidance.min_steps", "integer"]),
    ({"method": "adaptive", "cfg_order": "cond_last"}, ["guidance.cfg_order", "uncond_first", "cond_first"]),
    ({"method": "adaptive", "guidance_scale": 0}, ["guidance.guidance_scale", "> 0"]),
    ({"method": "adaptive", "treshold": 0.9}, ["guidance", "treshold", "did you mean 'threshold'"]),
    ("adaptive", ["guidance", "mapping"]),
])
def test_bad_guidance_config_names_the_field(guidance, fragments):
    with pytest.raises(PolicyError) as info:
        load_policy({"guidance": guidance})
    message = str(info.value)
    assert all(f in message for f in fragments), message


def test_guidance_on_a_model_without_cfg_layout_raises():
    """A generic adapter (unknown class, blocks named by hand) knows no CFG layout."""
    wrapper = torch.nn.Sequential(tiny_transformer("dit"))
    with pytest.raises(PolicyError, match="cfg_layout"):
        dit_accel.accelerate(wrapper, ag(threshold=0.9, guidance_scale=2.0, cfg_order="uncond_first"),
                             blocks=["0.transformer_blocks"])
    assert not dit_accel.is_accelerated(wrapper)


@pytest.mark.parametrize("family", ["sd3", "cogvideox", "hunyuan_video"])
def test_other_cfg_families(family):
    """SD3 / CogVideoX batch [uncond, cond] (CogVideoX under cache_context "cond_uncond"); HunyuanVideo runs
    true CFG (``true_cfg_scale``) as separate calls next to its embedded guidance."""
    pipe = tiny_pipeline(family)
    baseline = generate(pipe, family)
    with dit_accel.accelerated(pipe, ag(threshold=2.0)):
        assert torch.equal(generate(pipe, family), baseline)
    with dit_accel.accelerated(pipe, ag(threshold=-1.0, min_steps=2)):
        out = generate(pipe, family)
        stats = dit_accel.stats(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert list(stats.guidance_switch_step.values()) == [2] and stats.guidance_skipped_calls == STEPS - 2
    if family == "hunyuan_video":
        assert stats.calls_per_branch == {"cond": STEPS, "uncond": 2}
    assert torch.equal(generate(pipe, family), baseline)
