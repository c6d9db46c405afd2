"""Calibration tensors beside the YAML (``dit_accel.sidecar``): exact round trips, what stays inline,
and clear errors when the ``.safetensors`` file is missing or does not match."""

from __future__ import annotations

import random

import pytest
import yaml
from safetensors.numpy import load_file

import dit_accel
from dit_accel.policy import Policy
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline


def awkward_floats(n: int, seed: int = 0) -> list[float]:
    """Floats whose shortest decimal form is long (exactness is the point), plus edge values."""
    rng = random.Random(seed)
    return [rng.uniform(0.5, 1.5) / 3.0 for _ in range(n - 3)] + [1e-300, 1.0 + 2 ** -52, 7.0]


def test_long_numeric_fields_move_to_the_sidecar_and_load_back_exactly(tmp_path):
    ratios = {"cond": awkward_floats(50, 1), "uncond": awkward_floats(50, 2)}
    policy = Policy(name="flux-mag", cache={"method": "magcache", "mag_ratios": ratios})
    side = policy.save(tmp_path / "flux-mag.yaml")
    assert side == tmp_path / "flux-mag.yaml.safetensors" and side.is_file()
    text = yaml.safe_load((tmp_path / "flux-mag.yaml").read_text())
    assert text["sidecar"] == "flux-mag.yaml.safetensors"
    assert text["cache"]["mag_ratios"] == {"cond": {"$sidecar": "cache.mag_ratios.cond"},
                                           "uncond": {"$sidecar": "cache.mag_ratios.uncond"}}
    assert text["cache"]["threshold"] == 0.12  # scalars stay in the YAML
    stored = load_file(str(side))
    assert stored["cache.mag_ratios.cond"].dtype.name == "float64"
    loaded = dit_accel.load_policy(tmp_path / "flux-mag.yaml")
    assert loaded == policy
    assert loaded.cache.mag_ratios["cond"] == ratios["cond"]  # bit-exact, not approximately


def test_ints_short_lists_and_ragged_schedules(tmp_path):
    steps = 28
    compute = [0, 1, 3, 5, 8, 11, 14, 17, 20, 23, 26, 27, 2, 4, 6, 9, 12]  # ≥ 16 ints
    erta = Policy(name="erta", cache={"method": "ertacache", "compute_steps": {"cond": compute},
                                      "scale": {"cond": awkward_floats(steps)}, "shift": {"cond": [0.0] * steps},
                                      "step_scale": {"cond": awkward_floats(steps, 3)}})
    erta.save(tmp_path / "erta.yaml")
    stored = load_file(str(tmp_path / "erta.yaml.safetensors"))
    assert stored["cache.compute_steps.cond"].dtype.name == "int64"
    loaded = dit_accel.load_policy(tmp_path / "erta.yaml")
    assert loaded == erta and all(type(s) is int for s in loaded.cache.compute_steps["cond"])

    tea = Policy(name="tea", cache={"method": "teacache", "coefficients": [1.5, -0.25, 0.125]})
    assert tea.save(tmp_path / "tea.yaml") is None  # five coefficients stay readable in the YAML
    assert not (tmp_path / "tea.yaml.safetensors").exists()
    assert yaml.safe_load((tmp_path / "tea.yaml").read_text())["cache"]["coefficients"] == [1.5, -0.25, 0.125]

    ragged = [[0, 3, 6, 9], [0, 2, 4, 6, 8], [0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]  # BAC: steps per block
    bac = Policy(name="bac", cache={"method": "bac", "schedule": {"default": ragged}, "calibrated_steps": 10})
    bac.save(tmp_path / "bac.yaml")
    marker = yaml.safe_load((tmp_path / "bac.yaml").read_text())["cache"]["schedule"]["default"]
    assert marker == {"$sidecar": "cache.schedule.default", "$ragged": True}
    assert dit_accel.load_policy(tmp_path / "bac.yaml").cache.schedule == {"default": ragged}
    square = [[0, 5, 9]] * 6  # equal rows: one 2-D tensor
    bac2 = Policy(name="bac2", cache={"method": "bac", "schedule": {"default": square}, "calibrated_steps": 10})
    bac2.save(tmp_path / "bac2.yaml")
    assert load_file(str(tmp_path / "bac2.yaml.safetensors"))["cache.schedule.default"].shape == (6, 3)
    assert dit_accel.load_policy(tmp_path / "bac2.yaml") == bac2


def test_inline_save_and_stale_sidecar(tmp_path):
    policy = Policy(name="m", cache={"method": "magcache", "mag_ratios": {"default": awkward_floats(20)}})
    policy.save(tmp_path / "m.yaml")
    assert (tmp_path / "m.yaml.safetensors").exists()
    assert policy.save(tmp_path / "m.yaml", inline=True) is None
    assert not (tmp_path / "m.yaml.safetensors").exists()  # no stale tensors left to mislead
    assert "sidecar" not in yaml.safe_load((tmp_path / "m.yaml").read_text())
    assert dit_accel.load_policy(tmp_path / "m.yaml") == policy


def test_missing_or_mismatched_sidecar_is_a_clear_error(tmp_path):
    policy = Policy(name="m", cache={"method": "magcache", "mag_ratios": {"default": awkward_floats(20)}})
    policy.save(tmp_path / "m.yaml")
    (tmp_path / "m.yaml.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(dit_accel.PolicyError, match=r"m\.yaml.*m\.yaml\.safetensors.*does not exist"):
        dit_accel.load_policy(tmp_path / "m.yaml")

    other = Policy(name="o", cache={"method": "magcache", "mag_ratios": {"cond": awkward_floats(20)}})
    other.save(tmp_path / "o.yaml")
    (tmp_path / "elsewhere.safetensors").replace(tmp_path / "o.yaml.safetensors")  # the wrong file beside o.yaml
    with pytest.raises(dit_accel.PolicyError, match="holds no tensor 'cache.mag_ratios.cond'"):
        dit_accel.load_policy(tmp_path / "o.yaml")

    (tmp_path / "o.yaml.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(dit_accel.PolicyError, match="not a readable safetensors"):
        dit_accel.load_policy(tmp_path / "o.yaml")

    text = yaml.safe_load((tmp_path / "m.yaml").read_text())
    del text["sidecar"]
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(text))
    with pytest.raises(dit_accel.PolicyError, match="names no 'sidecar' file"):
        dit_accel.load_policy(tmp_path / "n.yaml")


def test_a_calibrated_policy_round_trips_through_its_sidecar_and_runs(tmp_path):
    pipe = tiny_pipeline("pixart")
    kwargs = tiny_call_kwargs("pixart", num_inference_steps=20)
    kwargs.pop("prompt")
    policy = dit_accel.calibrate(pipe, ["a cat", "a dog"], "magcache", **kwargs)
    assert policy.save(tmp_path / "pixart-mag.yaml") is not None
    loaded = dit_accel.load_policy(str(tmp_path / "pixart-mag.yaml"))
    assert loaded == policy
    with dit_accel.accelerated(pipe, str(tmp_path / "pixart-mag.yaml")):
        pipe(prompt="a cat", **kwargs)
