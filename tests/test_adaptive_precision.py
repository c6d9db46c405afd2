"""Adaptive attention precision (``attention: {sparse: null, quant: auto}``): the calibrated per-(layer, step) plan
of bf16 / int8 / fp8, its config validation, its run-time lookup and its round trip through a saved policy."""

import logging

import pytest
import torch

import dit_accel
from dit_accel.attention.adaptive_precision import normalise_plan, plan_from_errors, plan_precision, relative_l1
from dit_accel.attention.config import AttentionConfig
from dit_accel.config import PolicyError
from dit_accel.policy import load_policy
from dit_accel.testing import tiny_call_kwargs, tiny_generate, tiny_pipeline

SIZES = {"flux": dict(height=64, width=64), "wan": dict(height=64, width=64, num_frames=9)}


def _auto(**kw):
    return {"name": "auto", "attention": {"sparse": None, "quant": "auto", "warmup_steps": 0, **kw}}


@pytest.fixture(scope="module")
def wan():
    pipe = tiny_pipeline("wan")
    kwargs = tiny_call_kwargs("wan", **SIZES["wan"])
    kwargs.pop("prompt")
    return pipe, tiny_generate(pipe, "wan", **SIZES["wan"]), kwargs


# ---- config ------------------------------------------------------------------------------------------------


def test_plan_normalised_and_validated():
    assert normalise_plan([["bf16", "int8"], ["fp8", "fp8"]]) == ("bi", "ff")
    assert normalise_plan({"1": "ff", "0": "bi"}) == ("bi", "ff")
    cfg = AttentionConfig.from_dict({"sparse": None, "quant": "auto", "quant_plan": [["bf16", "int8"], "ff"]})
    assert cfg.quant_plan == ("bi", "ff") and cfg.needs_calibration == []
    assert cfg.to_dict()["quant_plan"] == ["bi", "ff"]
    assert AttentionConfig.from_dict(cfg.to_dict()) == cfg
    assert AttentionConfig.from_dict({"sparse": None, "quant": "auto"}).needs_calibration == ["quant_plan"]


@pytest.mark.parametrize("section,match", [
    ({"sparse": None, "quant": "auto", "quant_plan": ["bx"]}, r"quant_plan\[0\]: expected a non-empty string"),
    ({"sparse": None, "quant": "auto", "quant_plan": [["bf16", "int4"]]}, "unknown precision 'int4'"),
    ({"sparse": None, "quant": "auto", "quant_plan": ["bi", "b"]}, "one code per calibrated step"),
    ({"sparse": None, "quant": "auto", "quant_plan": "bib"}, "one entry per layer"),
    ({"sparse": None, "quant": "int8", "quant_plan": ["bi"]}, "used by quant: auto only"),
    ({"quant": "auto"}, "it needs sparse: null"),
    ({"sparse": None, "quant": "auto", "quant_tolerance": -0.1}, "quant_tolerance"),
    ({"sparse": None, "quant": "int4"}, "attention.quant"),
])
def test_bad_config(section, match):
    with pytest.raises(PolicyError, match=match):
        AttentionConfig.from_dict(section)


def test_plan_layers_must_match_the_model(wan):
    pipe, _, _ = wan
    with pytest.raises(PolicyError, match="calibrated for 3 layers, the model has 4"):
        dit_accel.accelerate(pipe, _auto(quant_plan=["bb"] * 3))
    with pytest.raises(PolicyError, match="quant_plan must be calibrated first"):
        dit_accel.accelerate(pipe, _auto())


# ---- plan from errors --------------------------------------------------------------------------------------


def test_plan_takes_the_cheapest_precision_below_tolerance():
    errors = {"fp8": {(0, 0): 0.05, (0, 1): 0.01, (1, 0): 0.3},
              "int8": {(0, 0): 0.01, (0, 1): 0.005, (1, 0): 0.03}}
    assert plan_from_errors(errors, 2, 2, 0.02) == ("if", "bb")      # (1, 1) was never measured: bf16
    assert plan_from_errors(errors, 2, 2, 0.04) == ("if", "ib")
    assert plan_from_errors(errors, 2, 2, 1.0) == ("ff", "fb")
    assert plan_from_errors(errors, 2, 2, 0.0) == ("bb", "bb")
    assert plan_from_errors(errors, 2, 2, 1.0, modes=("int8",)) == ("ii", "ib")  # a GPU without FP8
    assert plan_precision(("bif",), 0, 1) == "int8" and plan_precision(("bif",), 0, 7) == "fp8"
    a = torch.ones(4)
    assert relative_l1(a * 1.1, a) == pytest.approx(0.1)


# ---- on a tiny pipeline -------------------------------------------------------------------------------------


def test_zero_tolerance_keeps_every_call_bf16_and_exact(wan):
    pipe, base, kwargs = wan
    calibrated = dit_accel.calibrate(pipe, ["a cat"], _auto(quant_tolerance=0.0), **kwargs)
    plan = calibrated.attention.quant_plan
    assert plan == ("bbbb",) * 4  # 4 blocks x 4 steps
    with dit_accel.accelerated(pipe, calibrated):
        out = tiny_generate(pipe, "wan", **SIZES["wan"])
        att = dit_accel.stats(pipe).extra["attention"]
    assert torch.equal(out, base)
    assert att["calls"]["quant_dense"] == 0 and att["calls"]["dense_plan"] == 32
    assert att["precisions"] == {"int8": 0, "fp8": 0}


def test_large_tolerance_quantizes_and_round_trips(wan, tmp_path):
    pipe, base, kwargs = wan
    calibrated = dit_accel.calibrate(pipe, ["a cat"], _auto(quant_tolerance=1.0), **kwargs)
    plan = calibrated.attention.quant_plan
    assert len(plan) == 4 and all(len(row) == 4 for row in plan)
    assert set("".join(plan)) == {"f"}  # FP8 is the cheapest, and the CPU reference emulates it
    calibrated.save(tmp_path / "auto.yaml")
    loaded = load_policy(str(tmp_path / "auto.yaml"))
    assert loaded.attention.quant_plan == plan and loaded.attention.quant == "auto"
    with dit_accel.accelerated(pipe, str(tmp_path / "auto.yaml")):
        out = tiny_generate(pipe, "wan", **SIZES["wan"])
        att = dit_accel.stats(pipe).extra["attention"]
    assert att["calls"]["quant_dense"] == 32 and att["precisions"] == {"int8": 0, "fp8": 32}
    assert att["method"] == "dense+auto"
    assert not torch.equal(out, base) and ((out - base).norm() / base.norm()).item() < 0.1


def test_mixed_plan_is_followed_per_layer_and_step(wan):
    """A hand-written plan: the counts follow it call by call (2 CFG branches x 4 steps x 4 layers)."""
    pipe, base, _ = wan
    plan = ["bbbb", "iiii", "bibf", "ffff"]
    with dit_accel.accelerated(pipe, _auto(quant_plan=plan)):
        out = tiny_generate(pipe, "wan", **SIZES["wan"])
        stats = dit_accel.stats(pipe)
    att = stats.extra["attention"]
    assert att["calls"]["dense_plan"] == 2 * 6 and att["precisions"] == {"int8": 2 * 5, "fp8": 2 * 5}
    assert "dense plan 12" in stats.summary()
    assert torch.isfinite(out).all()


def test_other_step_count_maps_to_the_relative_position(wan, caplog):
    """Calibrated for 4 steps, served at 7: steps map to the calibrated step at the same relative position
    (StepMapping), with one warning. Plan row "bbii": steps 0..6 -> 0,1,1,2,2,3,3 -> b,b,b,i,i,i,i."""
    pipe, _, _ = wan
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        with dit_accel.accelerated(pipe, _auto(quant_plan=["bbii"] * 4)):
            tiny_generate(pipe, "wan", num_inference_steps=7, **SIZES["wan"])
            att = dit_accel.stats(pipe).extra["attention"]
    assert att["calls"]["dense_plan"] == 2 * 4 * 3 and att["precisions"]["int8"] == 2 * 4 * 4
    assert sum("calibrated for 4 steps, this call has 7" in r.getMessage() for r in caplog.records) == 1


def test_auto_with_paro_calibrates_orders_then_plan():
    pipe = tiny_pipeline("flux")
    kwargs = tiny_call_kwargs("flux", **SIZES["flux"])
    kwargs.pop("prompt")
    calibrated = dit_accel.calibrate(pipe, ["a cat"], _auto(reorder="paro", quant_tolerance=0.05), **kwargs)
    att = calibrated.attention
    assert att.paro_orders is not None and len(att.quant_plan) == len(att.paro_orders)
    assert set("".join(att.quant_plan)) <= {"b", "i", "f"}
    with dit_accel.accelerated(pipe, calibrated):
        out = tiny_generate(pipe, "flux", **SIZES["flux"])
        calls = dit_accel.stats(pipe).extra["attention"]["calls"]
    assert calls["dense_unhandled"] == 0 and calls["quant_dense"] + calls["dense_plan"] > 0
    assert torch.isfinite(out).all()
