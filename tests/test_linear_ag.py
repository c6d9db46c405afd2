"""LinearAG (Castillo et al. 2023): the least-squares fit recovers known coefficients, calibration stores them in the
``guidance:`` section, replaced steps skip exactly the unconditional work (batched and separate CFG), the
prediction beats reusing the last unconditional estimate, ``remove`` is bit-exact, bad tables are refused."""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel import PolicyError, load_policy
from dit_accel.caching.linear_ag import LinearAGConfig, NormalEquations, combine, replaced_steps
from dit_accel.eval.metrics import psnr
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

STEPS = 6
POLICY = {"name": "lag", "guidance": {"method": "linear_ag"}}


def test_normal_equations_recover_known_coefficients():
    g = torch.Generator().manual_seed(0)
    eq = NormalEquations()
    truth = [0.7, 0.2, -0.1, 0.05]  # a_0·c_t + a_1·c_{t-1} + b_1·u_{t-1} + γ
    for _ in range(3):
        c, c1, u1 = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
        u = truth[0] * c + truth[1] * c1 + truth[2] * u1 + truth[3]
        eq.add(5, c, [(c1, u1)], u)
    coef = eq.solve()[5]
    assert coef == pytest.approx(truth, abs=1e-6)
    torch.testing.assert_close(combine(coef, c, [(c1, u1)]), u, rtol=1e-5, atol=1e-5)


def test_replaced_steps_and_validation():
    assert replaced_steps(LinearAGConfig(), 8) == [1, 3, 5, 7]
    assert replaced_steps(LinearAGConfig(every=3, start=2, stop=7), 10) == [2, 5]
    assert replaced_steps(LinearAGConfig(history=2), 6) == [3, 5]
    with pytest.raises(PolicyError, match="at least 4 finite numbers"):
        LinearAGConfig(coefficients={1: [1.0, 0.0, 1.0]})
    with pytest.raises(PolicyError, match="no past estimates"):
        LinearAGConfig(history=2, coefficients={1: [0.0] * 6})
    with pytest.raises(PolicyError, match="finite"):
        LinearAGConfig(coefficients={1: [float("nan"), 0.0, 1.0, 0.0]})
    pipe = tiny_pipeline("sd3")
    with pytest.raises(PolicyError, match="run dit_accel.calibrate"):
        dit_accel.accelerate(pipe, POLICY)
    with pytest.raises(PolicyError, match="not accelerated"):  # nothing stayed attached
        dit_accel.inspect(pipe)


class Batches:
    def __init__(self, pipe):
        self.sizes = []
        self.handle = pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: self.sizes.append(k.get("hidden_states", a[0] if a else None).shape[0]), with_kwargs=True)

    def close(self):
        self.handle.remove()


def _images(out):
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_calibrated_linear_ag_skips_unconditional_work(family):
    pipe = tiny_pipeline(family)
    kwargs = lambda: tiny_call_kwargs(family, num_inference_steps=STEPS)  # noqa: E731
    base = _images(pipe(**kwargs()))
    call = {k: v for k, v in kwargs().items() if k != "prompt"}
    policy = dit_accel.calibrate(pipe, ["a photo of a dog", "a red car"], POLICY, **call)
    assert sorted(policy.guidance.coefficients) == [1, 3, 5] and policy.guidance.calibrated_steps == STEPS
    again = load_policy(policy.to_dict())  # the guidance section round-trips
    assert again.guidance.coefficients == policy.guidance.coefficients
    dit_accel.accelerate(pipe, policy)
    batches = Batches(pipe)  # registered after the runtime's pre-hook: sees the batch that really runs
    try:
        out = _images(pipe(**kwargs()))
        skipped = dit_accel.stats(pipe).guidance_skipped_calls
    finally:
        batches.close()
        dit_accel.remove(pipe)
    # a naive predictor (û_t = u_{t-1}) for comparison
    naive = LinearAGConfig(coefficients={t: [0.0, 0.0, 1.0, 0.0] for t in (1, 3, 5)}, calibrated_steps=STEPS)
    with dit_accel.accelerated(pipe, {"name": "naive", "guidance": naive.to_dict()}):
        worse = _images(pipe(**kwargs()))
    if family == "sd3":  # batched [uncond, cond]: replaced steps run the conditional rows only
        assert batches.sizes[:STEPS] == [2, 1, 2, 1, 2, 1]
    else:  # separate calls: the uncond call of a replaced step passes through (still counted by the hook)
        assert len(batches.sizes[:2 * STEPS]) == 2 * STEPS
    assert skipped == 3
    assert psnr(out, base) > psnr(worse, base)
    torch.testing.assert_close(_images(pipe(**kwargs())), base, rtol=0, atol=0)  # removed: bit-exact


def test_wan_replaced_uncond_runs_no_block():
    pipe = tiny_pipeline("wan")
    coef = LinearAGConfig(coefficients={t: [1.0, 0.0, 0.0, 0.0] for t in (1, 3)}, calibrated_steps=4)
    runs = []
    handle = pipe.transformer.blocks[0].attn1.register_forward_pre_hook(lambda m, a: runs.append(1))  # really ran
    try:
        dit_accel.accelerate(pipe, {"name": "lag", "guidance": coef.to_dict()})
        pipe(**tiny_call_kwargs("wan", num_inference_steps=4))
        dit_accel.remove(pipe)
    finally:
        handle.remove()
    assert len(runs) == 8 - 2  # 4 cond + 4 uncond calls, 2 uncond replaced
