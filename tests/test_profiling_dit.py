"""ProfilingDiT: attention profiling (foreground lift on latent masks, per-block entropy), fg/bg
classification, the measured full steps and the per-class schedule, YAML round trip and quality on the
trained reference model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

import dit_accel
from dit_accel import zoo
from dit_accel.caching.records import Records
from dit_accel.calibration import attention_statistics, record
from dit_accel.caching.profiling_dit import ProfilingDiT, ProfilingDiTConfig, classify, computed, full_steps
from dit_accel.calibration.recorder import foreground_lift
from dit_accel.calibration import foreground_tokens
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

PROMPTS = ["a photo of a cat", "a red car on a road"]


def call_kwargs(family: str, steps: int = 6) -> dict:
    kwargs = tiny_call_kwargs(family, num_inference_steps=steps)
    kwargs.pop("prompt")
    return kwargs


def test_classify_by_rank_and_by_threshold():
    entropy = [0.9, 0.2, 0.5, 0.95, 0.1]
    assert classify(entropy, 0.4) == ["bg", "fg", "fg", "bg", "fg"]
    assert classify(entropy, 0.0) == ["fg"] * 5
    assert classify(entropy, 1.0) == ["bg"] * 5
    assert classify(entropy, 0.01) == ["fg", "fg", "fg", "bg", "fg"], "any positive share classes one block bg"
    assert classify(entropy, 0.99) == ["bg", "bg", "bg", "bg", "fg"], "any share < 1 keeps one block fg"
    assert classify(entropy, 0.4, threshold=0.45) == ["bg", "fg", "bg", "bg", "fg"]
    with pytest.raises(dit_accel.PolicyError, match="attention profile"):
        classify([0.5, math.nan], 0.5)


def test_attention_statistics_of_sharp_and_flat_attention():
    torch.manual_seed(0)
    attn = tiny_pipeline("pixart").transformer.transformer_blocks[0].attn1
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    with torch.no_grad():
        attn.to_q.weight.zero_()
        attn.to_q.bias.zero_()
    entropy, top = attention_statistics(attn, hidden, queries=16, topk=0.25)
    assert entropy == pytest.approx(1.0, abs=1e-5) and top == pytest.approx(0.25, abs=1e-5), "q = 0: uniform"
    with torch.no_grad():
        attn.to_q.weight.copy_(attn.to_k.weight * 50)
        attn.to_q.bias.copy_(attn.to_k.bias * 50)
    entropy, top = attention_statistics(attn, hidden, queries=16, topk=0.25)
    assert entropy < 0.2 and top > 0.9, (entropy, top)


def sharpen_and_flatten(pipe, sharp: set[int]) -> None:
    """Force the self-attention of the ``sharp`` blocks to be peaked (q/k weights ×20) and of the
    other blocks uniform (q = 0)."""
    with torch.no_grad():
        for i, block in enumerate(pipe.transformer.transformer_blocks):
            attn = block.attn1
            if i in sharp:
                for proj in (attn.to_q, attn.to_k):
                    proj.weight.mul_(20)
            else:
                attn.to_q.weight.zero_()
                if attn.to_q.bias is not None:
                    attn.to_q.bias.zero_()


@pytest.mark.parametrize("sharp", [{1, 2}, {0, 3}, {2}])
def test_toy_model_classes_sharp_blocks_foreground(sharp):
    pipe = tiny_pipeline("pixart")
    blocks = len(pipe.transformer.transformer_blocks)
    sharpen_and_flatten(pipe, sharp)
    share = 1 - len(sharp) / blocks
    policy = dit_accel.calibrate(pipe, PROMPTS[:1], {"cache": {"method": "profiling_dit", "profile": "entropy",
                                                               "background_share": share}},
                                 **call_kwargs("pixart", 3))
    expected = ["fg" if i in sharp else "bg" for i in range(blocks)]
    assert policy.cache.block_classes == expected, policy.cache.block_entropy
    entropy = policy.cache.block_entropy
    assert all(entropy[i] == pytest.approx(1.0, abs=1e-4) for i in range(blocks) if i not in sharp)
    assert all(entropy[i] < 0.6 for i in sharp), entropy
    # by threshold, with a share that would rank differently
    by_threshold = dit_accel.calibrate(pipe, PROMPTS[:1], {"cache": {"method": "profiling_dit", "profile": "entropy",
                                                                     "background_share": 0.0,
                                                                     "entropy_threshold": 0.9}},
                                       **call_kwargs("pixart", 3))
    assert by_threshold.cache.block_classes == expected
    for block in pipe.transformer.transformer_blocks:  # the profiling hooks are gone after calibration
        assert not block.attn1._forward_pre_hooks


def test_uncalibrated_profiling_dit_is_refused():
    pipe = tiny_pipeline("pixart")
    with pytest.raises(dit_accel.PolicyError, match="calibrate"):
        dit_accel.accelerate(pipe, "profiling_dit")
    assert not dit_accel.is_accelerated(pipe)
    with pytest.raises(dit_accel.PolicyError, match="blocks"):
        dit_accel.accelerate(pipe, {"cache": {"method": "profiling_dit", "block_classes": ["fg", "bg"]}})
    with pytest.raises(dit_accel.PolicyError, match="block_classes"):
        dit_accel.accelerate(pipe, {"cache": {"method": "profiling_dit", "block_classes": ["fg", "x", "bg", "bg"]}})
    with pytest.raises(dit_accel.PolicyError, match="attention statistics"):
        dit_accel.caching.base.get_method("profiling_dit").calibrated(
            dit_accel.load_policy({"cache": {"method": "profiling_dit"}}).cache, Records([{"step": 0}]), "pixart")


@pytest.mark.parametrize("fg, bg, warmup", [(1, 3, 1), (2, 4, 0), (2, 5, 2)])
def test_schedule_follows_the_classes(fg, bg, warmup):
    pipe = tiny_pipeline("pixart")
    steps = 11
    classes = ["bg", "fg", "bg", "fg"]
    policy = {"cache": {"method": "profiling_dit", "block_classes": classes, "foreground_interval": fg,
                        "background_interval": bg, "warmup_steps": warmup}}
    with dit_accel.accelerated(pipe, policy):
        pipe(prompt="a cat", **call_kwargs("pixart", steps))
        stats = dit_accel.stats(pipe)

    def computed(interval):
        return sum(1 for s in range(steps) if s < warmup or (s - warmup) % interval == 0)

    expected = [computed(bg if c == "bg" else fg) for c in classes]
    assert stats.calls_per_branch == {"default": steps}
    assert stats.computed == expected
    assert stats.reused == [steps - n for n in expected]


def test_calibrated_policy_round_trips_and_runs(tmp_path):
    pipe = tiny_pipeline("flux")  # joint attention with q/k RMSNorm, double and single blocks, packed latents
    policy = dit_accel.calibrate(pipe, PROMPTS, {"name": "flux-prof", "cache": {"method": "profiling_dit"}},
                                 **call_kwargs("flux", 5))
    classes = policy.cache.block_classes
    blocks = len(classes)
    assert classes.count("bg") == round(0.5 * blocks) and set(classes) == {"fg", "bg"}
    lift = policy.cache.block_foreground
    assert len(lift) == blocks and all(math.isfinite(v) and v > 0 for v in lift)
    assert sorted(lift)[blocks - round(0.5 * blocks) - 1] <= min(v for v, c in zip(lift, classes) if c == "fg")
    assert max(v for v, c in zip(lift, classes) if c == "bg") <= min(v for v, c in zip(lift, classes) if c == "fg")
    similarity = policy.cache.step_similarity
    assert len(similarity) == 4 and all(-1 <= v <= 1 for v in similarity)
    policy.save(tmp_path / "p.yaml")
    loaded = dit_accel.load_policy(tmp_path / "p.yaml")
    assert loaded == policy
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["cache"]["block_classes"] == classes
    for warmup in (None, 1):  # measured full steps (read at relative positions: 5 calibrated, 7 served), fixed
        served = loaded.replace(warmup_steps=warmup, similarity_threshold=float(np.median(similarity)))
        with dit_accel.accelerated(pipe, served):
            pipe(prompt="a dog", **call_kwargs("flux", 7))
            stats = dit_accel.stats(pipe)
        full = full_steps(tuple(similarity), served.cache.similarity_threshold, 7) if warmup is None else {0}
        expected = [sum(computed(s, 3 if c == "bg" else 1, frozenset(full)) for s in range(7)) for c in classes]
        assert stats.computed == expected, (full, similarity)
        assert max(stats.reused) > 0, full


def test_full_steps_follow_the_similarity_and_stable_runs_restart_the_interval():
    curve = (0.9, 0.999, 0.999, 0.999, 0.999, 0.999, 0.5)  # steps 1..7 of 8: unstable at 1 and 7
    assert full_steps(curve, 0.995, None) == {0, 1, 7}
    assert full_steps(curve, 0.995, 8) == {0, 1, 7}
    assert full_steps(curve, 0.95, 8) == {0, 1, 7} and full_steps(curve, 0.8, 8) == {0, 7}
    assert full_steps(curve, 0.995, 15) == {0, 1, 2, 14}  # relative positions: step 2 of 15 reads step 1 of 8
    full = frozenset({0, 1, 7})
    assert [computed(s, 3, full) for s in range(8)] == [True, True, True, False, False, True, False, True]
    assert [computed(s, 1, full) for s in range(8)] == [True] * 8
    assert [computed(s, 2, frozenset()) for s in range(4)] == [True, False, True, False]  # warm-up 0


def test_foreground_mask_and_lift_on_a_synthetic_latent():
    latent = torch.full((2, 3, 16, 16), -1.0)
    latent[0, :, 4:8, 8:12] = 1.0  # a bright square on a flat background (sample 0)
    latent[1, :, 0:4, 0:8] = 0.5
    mask = foreground_tokens(latent, 64)  # 2×2 patches -> 8×8 tokens
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[0, 2:4, 4:6] = True
    expected[1, 0:2, 0:4] = True
    assert torch.equal(mask, expected.flatten(1))
    video = latent[:, :, None].expand(2, 3, 4, 16, 16)  # (B, C, F, H, W), 1×2×2 patches
    assert torch.equal(foreground_tokens(video, 4 * 64), expected.flatten(1).repeat(1, 4))
    packed = latent.flatten(2).transpose(1, 2)  # (B, S, C): one token per position
    assert torch.equal(foreground_tokens(packed, 256), (packed[..., 0] > 0))
    assert foreground_tokens(latent, 10) is None  # no patching maps 16×16 onto 10 tokens or fewer
    assert torch.equal(foreground_tokens(latent, 64 + 7), mask)  # 7 text tokens joined: the 2×2 patching
    area = mask.float().mean(-1)
    uniform = torch.full((2, 64), 1 / 64)
    assert foreground_lift(uniform, mask) == pytest.approx(1.0)
    on_fg = mask.float() / mask.float().sum(-1, keepdim=True)
    assert foreground_lift(on_fg, mask) == pytest.approx(float((1 / area).mean()))
    with_text = torch.cat([torch.full((2, 5), 1.0), on_fg], dim=1)  # text keys first: ignored
    assert foreground_lift(with_text, mask) == pytest.approx(float((1 / area).mean()))
    assert math.isnan(foreground_lift(uniform, torch.zeros(2, 64, dtype=torch.bool)))


def test_foreground_profile_without_a_mask_names_the_fix():
    rows = Records([{"step": s, "branch": "default", "attn_entropy": [0.5, 0.6], "fg_attention": [math.nan, 1.2],
                     "output_similarity": 0.99} for s in range(3)])
    with pytest.raises(dit_accel.PolicyError, match=r"blocks \[0\].*profile: entropy"):
        ProfilingDiT.calibrated(ProfilingDiTConfig(), rows, "pixart")
    entropy = ProfilingDiT.calibrated(ProfilingDiTConfig(profile="entropy"), rows, "pixart")
    assert entropy.block_classes == ["fg", "bg"] and entropy.step_similarity == [0.99, 0.99]


def test_attention_recording_changes_neither_outputs_nor_other_statistics():
    pipe = tiny_pipeline("sd3")
    rows, outputs = {}, {}
    for attention in (False, True):
        seen = outputs[attention] = []
        handle = pipe.transformer.register_forward_hook(lambda module, args, out: seen.append(out[0].clone()))
        try:
            rows[attention], _ = record(pipe, ["a cat"], {"attention_stats": attention}, **call_kwargs("sd3", 4))
        finally:
            handle.remove()
    assert len(outputs[True]) == 4 and all(torch.equal(a, b) for a, b in zip(outputs[False], outputs[True]))
    for plain, rich in zip(rows[False], rows[True], strict=True):
        for key, value in plain.items():
            assert value == rich[key] or (math.isnan(value) and math.isnan(rich[key]))
        assert "attn_entropy" not in plain
        assert len(rich["attn_entropy"]) == len(rich["attn_topk"]) == len(pipe.transformer.transformer_blocks)


@pytest.mark.skipif("cifar10_dit" not in zoo.available(), reason="reference weights not installed")
def test_profiling_dit_on_the_trained_model():
    """cifar10_dit (10 blocks), 20 Euler steps, labels [0, 3], seed 0; classes calibrated on other
    labels and seed ([1, 7], seed 1): entropies per block 0.90 0.69 0.37 0.26 0.75 0.73 0.58 0.80
    0.78 0.91 → bg = blocks 0, 4, 7, 8, 9 (background_share 0.5). Measured 2026-11-23 (CPU,
    float32, torch 2.13), PSNR vs the unaccelerated run:

        FORA interval 3 (2)                               23.72 dB   65% saved  (29.05 dB  50%)
        ProfilingDiT fg 2 / bg 5, warmup 0                25.04 dB   65% saved
          same intervals, classes inverted (fg ↔ bg)      22.05 dB   65% saved
        ProfilingDiT fg 2 / bg 6, warmup 0                23.86 dB   65% saved  (inverted 21.10;
          12 random 5-bg-block classings: 20.37 … 23.58 dB)
        ProfilingDiT fg 2 / bg 4, warmup 1                28.39 dB   57.5% saved (inverted 26.57)
        ProfilingDiT fg 1 / bg 3, warmup 1 (the preset)   32.40 dB   30% saved  (inverted 30.37)
        (BAC budget 0.35, for reference: 27.08 dB at 65% saved)

    Asserted: equal saved share with FORA interval 3; ProfilingDiT ≥ FORA + 0.5 dB, ≥ the inverted
    classes + 1.5 dB, and within 1 dB of its measured PSNR.
    """
    from helpers import zoo_versus_fora

    config = {"method": "profiling_dit", "profile": "entropy", "foreground_interval": 2, "background_interval": 5,
              "warmup_steps": 0, "background_share": 0.5}

    seen = {}

    def inverted(calibrated):
        seen["cache"] = calibrated.cache
        classes = calibrated.cache.block_classes
        return {"inverted": {"cache": {**config, "block_classes": ["fg" if c == "bg" else "bg" for c in classes]}}}

    results = zoo_versus_fora({"cache": config}, extra=inverted)
    assert seen["cache"].block_classes == ["bg", "fg", "fg", "fg", "bg", "fg", "fg", "bg", "bg", "bg"], \
        seen["cache"].block_entropy
    assert results["policy"][1] == pytest.approx(results["fora"][1]) == pytest.approx(0.65)
    assert results["inverted"][1] == pytest.approx(0.65)
    assert results["policy"][0] >= results["fora"][0] + 0.5, results
    assert results["policy"][0] >= results["inverted"][0] + 1.5, results
    assert results["policy"][0] >= 25.04 - 1.0, results
