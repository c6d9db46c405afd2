"""Policy files are user data and untrusted input: saving never touches a file dit_accel did not write,
loading is confined to the YAML's folder and bounded, calibration tables are finite and consistent, and
``calibrate`` takes one prompt as one prompt."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import typing

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

import dit_accel
from dit_accel import sidecar
from dit_accel.config import PolicyError
from dit_accel.policy import Policy, load_policy

RATIOS = [1.0 + i / 100 for i in range(20)]  # 20 numbers: goes to the sidecar


def mag(name: str = "m", curve: list[float] | None = None) -> Policy:
    return Policy(name=name, cache={"method": "magcache", "mag_ratios": {"cond": curve or RATIOS}})


def foreign_weights(path) -> bytes:
    """A safetensors file some other tool wrote (model weights): no dit_accel format marker."""
    save_file({"weight": np.ones((4, 4), dtype=np.float32)}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------
# 1. save never deletes or overwrites a file the library did not write
# ---------------------------------------------------------------------------------------------------

def test_save_leaves_model_weights_beside_the_yaml_alone(tmp_path):
    weights = tmp_path / "model.safetensors"
    original = foreign_weights(weights)
    side = mag().save(tmp_path / "model.yaml")
    assert side is not None and side != weights and side.name == "model.yaml.safetensors"
    assert weights.read_bytes() == original
    assert mag().save(tmp_path / "model.yaml", inline=True) is None  # the old code deleted model.safetensors here
    assert weights.read_bytes() == original
    assert not side.exists()  # our own stale sidecar is removed
    assert load_policy(tmp_path / "model.yaml") == mag()


@pytest.mark.parametrize("content", ["weights", "garbage", "safetensors-without-metadata"])
def test_save_refuses_to_replace_a_foreign_file_at_the_sidecar_name(tmp_path, content):
    side = tmp_path / "p.yaml.safetensors"
    if content == "weights":
        original = foreign_weights(side)
    elif content == "garbage":
        side.write_bytes(b"\x00not a safetensors file")
        original = side.read_bytes()
    else:
        save_file({"x": np.zeros(3)}, str(side))
        original = side.read_bytes()
    with pytest.raises(PolicyError, match=r"p\.yaml\.safetensors.*not written by dit_accel.*another name"):
        mag().save(tmp_path / "p.yaml")
    assert side.read_bytes() == original
    assert not (tmp_path / "p.yaml").exists()  # nothing half-written
    # an inline save does not need that name: it leaves the file alone
    assert mag().save(tmp_path / "p.yaml", inline=True) is None
    assert side.read_bytes() == original


def test_save_replaces_its_own_sidecar_and_keeps_the_old_yaml_on_refusal(tmp_path):
    mag("first").save(tmp_path / "p.yaml")
    assert load_file(str(tmp_path / "p.yaml.safetensors"))  # ours: replaced without complaint
    second = mag("second", [2.0 + i / 10 for i in range(20)])
    second.save(tmp_path / "p.yaml")
    assert load_policy(tmp_path / "p.yaml") == second
    (tmp_path / "q.yaml").write_text("name: q\n")
    foreign_weights(tmp_path / "q.yaml.safetensors")
    with pytest.raises(PolicyError, match="q.yaml.safetensors"):
        second.save(tmp_path / "q.yaml")
    assert (tmp_path / "q.yaml").read_text() == "name: q\n"  # the YAML it would have replaced is kept


def test_yaml_and_yml_of_one_stem_keep_separate_sidecars(tmp_path):
    a, b = mag("a"), mag("b", [3.0 + i for i in range(20)])
    a.save(tmp_path / "p.yaml")
    b.save(tmp_path / "p.yml")
    assert load_policy(tmp_path / "p.yaml") == a  # the old code gave b's curve to p.yaml
    assert load_policy(tmp_path / "p.yml") == b
    b.save(tmp_path / "p.yml", inline=True)  # removes p.yml's sidecar only
    assert load_policy(tmp_path / "p.yaml") == a


def test_sidecars_of_the_old_naming_still_load(tmp_path):
    """Files saved before the naming change: ``p.yaml`` + ``p.safetensors`` (named in ``sidecar:``)."""
    data, tensors = sidecar.split(mag().to_dict())
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata={"format": sidecar.FORMAT, "policy": "m"})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"sidecar": "p.safetensors", **data}, sort_keys=False))
    assert load_policy(tmp_path / "p.yaml") == mag()


def test_sidecar_metadata_marks_it_as_ours(tmp_path):
    side = mag().save(tmp_path / "p.yaml")
    assert sidecar.is_sidecar(side)
    assert not sidecar.is_sidecar(tmp_path / "p.yaml")
    foreign_weights(tmp_path / "w.safetensors")
    assert not sidecar.is_sidecar(tmp_path / "w.safetensors")


def test_save_refuses_a_safetensors_policy_path(tmp_path):
    weights = tmp_path / "model.safetensors"
    original = foreign_weights(weights)
    with pytest.raises(PolicyError, match=r"\.yaml"):
        Policy(name="x", cache={"method": "fora"}).save(weights)  # no tensors: the old code overwrote it
    assert weights.read_bytes() == original


# ---------------------------------------------------------------------------------------------------
# 2. loading: confined to the YAML's folder, bounded, and a PolicyError for anything odd
# ---------------------------------------------------------------------------------------------------

def _reference_to(tmp_path, name: str):
    """A YAML in tmp_path/policies whose ``sidecar:`` is ``name``; a valid sidecar lies outside its folder."""
    outside = tmp_path / "outside.safetensors"
    data, tensors = sidecar.split(mag().to_dict())
    save_file(tensors, str(outside), metadata={"format": sidecar.FORMAT})
    folder = tmp_path / "policies"
    folder.mkdir()
    path = folder / "p.yaml"
    path.write_text(yaml.safe_dump({"sidecar": name, **data}, sort_keys=False))
    return path, outside


@pytest.mark.parametrize("kind", ["parent", "absolute", "subfolder", "not-safetensors", "dot"])
def test_sidecar_outside_the_yaml_folder_is_refused(tmp_path, kind):
    outside = tmp_path / "outside.safetensors"
    name = {"parent": "../outside.safetensors", "absolute": str(outside), "subfolder": "sub/x.safetensors",
            "not-safetensors": "p.yaml", "dot": ".."}[kind]
    path, _ = _reference_to(tmp_path, name)
    with pytest.raises(PolicyError, match="sidecar"):
        load_policy(path)


def test_sidecar_that_is_not_ours_is_not_read(tmp_path):
    foreign_weights(tmp_path / "model.safetensors")
    data, _ = sidecar.split(mag().to_dict())
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"sidecar": "model.safetensors", **data}))
    with pytest.raises(PolicyError, match="not a dit_accel policy sidecar"):
        load_policy(tmp_path / "p.yaml")


def _write_sidecar(tmp_path, tensors: dict, body: dict) -> typing.Any:
    save_file(tensors, str(tmp_path / "p.yaml.safetensors"), metadata={"format": sidecar.FORMAT})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"sidecar": "p.yaml.safetensors", **body}))
    return tmp_path / "p.yaml"


@pytest.mark.parametrize("tensor, marker, message", [
    (np.ones(20, dtype=np.float32), {"$sidecar": "t"}, "float32"),
    (np.ones(20, dtype=np.bool_), {"$sidecar": "t"}, "bool"),
    (np.ones((2, 2, 5)), {"$sidecar": "t"}, "3-D"),
    (np.array(1.5), {"$sidecar": "t"}, "0-D"),
    (np.ones(20), {"$sidecar": "t", "$ragged": True}, "offsets"),
    (np.ones(20), {"$sidecar": ["t"]}, "reference"),
    (np.ones(20), {"$sidecar": "t", "$ragged": "yes"}, "ragged"),
])
def test_sidecar_tensors_must_be_what_the_reference_claims(tmp_path, tensor, marker, message):
    path = _write_sidecar(tmp_path, {"t": tensor}, {"cache": {"method": "magcache", "mag_ratios": {"cond": marker}}})
    with pytest.raises(PolicyError, match=message):
        load_policy(path)


@pytest.mark.parametrize("offsets", [[0, 5, 3, 20], [1, 20], [0, 10, 25], [0.0, 20.0]])
def test_ragged_offsets_must_partition_the_values(tmp_path, offsets):
    tensors = {"t": np.arange(20, dtype=np.int64),
               "t.offsets": np.asarray(offsets, dtype=np.float64 if isinstance(offsets[0], float) else np.int64)}
    path = _write_sidecar(tmp_path, tensors, {"cache": {"method": "bac", "schedule": {
        "default": {"$sidecar": "t", "$ragged": True}}}})
    with pytest.raises(PolicyError, match="offsets"):
        load_policy(path)


BOMB = """\
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.perf_counter()
    with pytest.raises(PolicyError, match="alias"):
        load_policy(path)
    assert time.perf_counter() - start < 5


def test_self_referencing_yaml_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: &a [*a]\n")
    with pytest.raises(PolicyError, match="refers to itself"):
        load_policy(path)


def test_small_aliases_are_fine(tmp_path):
    """safe_dump writes anchors for repeated objects; a policy using a few still loads."""
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nattention: {dense_layers: &l [0, 1], paro_orders: null}\n"
                    "cache: {method: magcache, mag_ratios: {cond: &c [1.0, 1.1], uncond: *c}}\n")
    assert load_policy(path).cache.mag_ratios == {"cond": [1.0, 1.1], "uncond": [1.0, 1.1]}


def test_deeply_nested_yaml_is_a_policy_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PolicyError, match="deep.yaml"):
        load_policy(path)


def test_policy_file_size_is_capped(tmp_path, monkeypatch):
    assert sidecar.MAX_POLICY_BYTES == 16 * 2 ** 20
    monkeypatch.setattr(sidecar, "MAX_POLICY_BYTES", 1024)
    path = tmp_path / "big.yaml"
    path.write_text("name: big\n# " + "x" * 2000 + "\n")
    with pytest.raises(PolicyError, match="big.yaml.*limit"):
        load_policy(path)


@pytest.mark.parametrize("content, fragments", [
    (b"- fora\n- magcache\n", ["list", "mapping"]),
    (b"42\n", ["int", "mapping"]),
    (b"fora\n", ["str", "mapping", "preset", "load_policy('fora')"]),
    (b"fast\n", ["str", "mapping"]),
    (b"name: x\ncache:\n\tmethod: fora\n", ["not valid YAML"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["not valid YAML"]),
    (b"\xff\xfe\xfd garbage", ["not valid YAML"]),
    (b"", ["empty"]),
    (b"# only a comment\n", ["empty"]),
    (b"~\n", ["empty"]),
    (b"--- {name: a}\n--- {name: b}\n", ["not valid YAML"]),
    (b"!!python/object:os.system {}\n", ["not valid YAML"]),
])
def test_odd_policy_files_are_policy_errors_naming_the_file(tmp_path, content, fragments):
    path = tmp_path / "odd.yml"
    path.write_bytes(content)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    for fragment in ["odd.yml", *fragments]:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_a_folder_named_like_a_policy_is_a_policy_error(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(PolicyError, match="dir.yaml"):
        load_policy(tmp_path / "dir.yaml")


@pytest.mark.parametrize("spec", [
    {"attention": {"paro_orders": 5}},
    {"attention": {"sparse": {"method": "static", "masks": {"grid": 5, "block_size": 64, "layers": {}}}}},
    {"attention": {"sparse": {"method": "static", "masks": {"grid": [1, 4, 4], "block_size": "x", "layers": {}}}}},
    {"attention": {"sparse": {"method": "static", "masks": {"grid": [1, 32, 32], "block_size": 16,
                                                           "layers": {0: ["zz"]}}}}},
    {"attention": {"sparse": {"method": "static", "masks": {"grid": [1, 32, 32], "block_size": 16,
                                                           "layers": {0: ["ff"]}}}}},  # 8 bits, needs 64*64
    {"cache": {"method": "bac", "schedule": {"default": [[0, 10 ** 12]]}}},
    {"cache": {"method": "bac", "schedule": {"default": [[0, 12]]}, "calibrated_steps": 10}},
    {"cache": {"method": "fora", "interval": 10 ** 400}},
    {"guidance": {"method": "adaptive", "threshold": 10 ** 400}},
])
def test_odd_sections_are_policy_errors(spec):
    with pytest.raises(PolicyError):
        Policy.from_dict(spec)


# ---------------------------------------------------------------------------------------------------
# 3. calibration tables and every float option: finite, consistent
# ---------------------------------------------------------------------------------------------------

def _config_classes() -> list[type]:
    from dit_accel.attention.config import AttentionConfig, SparseConfig, SVG2Config
    from dit_accel.calibration import RecordConfig
    from dit_accel.caching.base import get_method, method_names
    from dit_accel.caching.adaptive_guidance import AdaptiveGuidanceConfig
    from dit_accel.quant.config import LinearQuantConfig

    return [*(get_method(m).config_cls for m in method_names()), AdaptiveGuidanceConfig, AttentionConfig,
            SparseConfig, SVG2Config, LinearQuantConfig, RecordConfig]


def _float_fields() -> list[tuple[type, str]]:
    out = []
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if float in (hints[f.name], *typing.get_args(hints[f.name])):
                out.append((cls, f.name))
    return out


@pytest.mark.parametrize("cls, name", _float_fields(), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_option_is_finite(cls, name, value):
    assert not next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("allow_inf")
    with pytest.raises(PolicyError, match=rf"{cls.section}\.{name}"):
        cls(**{name: value})


def test_adaptive_guidance_scale_and_threshold_reject_inf():
    for field in ("guidance_scale", "threshold"):
        with pytest.raises(PolicyError, match=f"guidance.{field}.*finite"):
            Policy.from_dict({"guidance": {"method": "adaptive", field: math.inf}})


ERTA = {"method": "ertacache", "compute_steps": {"cond": [0, 2]}, "scale": {"cond": [1.0, 0.9, 1.0, 0.8]},
        "shift": {"cond": [0.0, 0.1, 0.0, 0.1]}, "step_scale": {"cond": [1.0, 1.1, 1.0, 1.2]}}


@pytest.mark.parametrize("change, message", [
    ({"scale": {"cond": [1.0, math.inf, 1.0, 0.8]}}, r"cache\.scale\['cond'\]\[1\].*inf"),
    ({"shift": {"cond": [0.0, -math.inf, 0.0, 0.1]}}, r"cache\.shift\['cond'\]"),
    ({"step_scale": {"cond": [1.0, math.nan, 1.0, 1.2]}}, r"cache\.step_scale"),
    ({"shift": {"cond": [0.0, 0.1]}}, r"cache\.shift\['cond'\] has 2 steps.*4"),
    ({"step_scale": {"uncond": [1.0, 1.1, 1.0, 1.2]}}, r"cache\.step_scale has branches \['uncond'\]"),
    ({"compute_steps": {"cond": [0, 4]}}, r"cache\.compute_steps\['cond'\]: step 4 is out of range"),
    ({"compute_steps": {"uncond": [0]}}, r"cache\.compute_steps has branches"),
])
def test_ertacache_tables_are_finite_and_consistent(change, message):
    Policy.from_dict({"cache": ERTA})  # the consistent tables load
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict({"cache": {**ERTA, **change}})


@pytest.mark.parametrize("cache, message", [
    ({"method": "teacache", "coefficients": [1.0, math.inf]}, r"cache\.coefficients\[1\]"),
    ({"method": "magcache", "mag_ratios": {"cond": [1.0, math.inf]}}, r"cache\.mag_ratios\['cond'\]\[1\]"),
    ({"method": "magcache", "mag_ratios": {"cond": [1.0, 0.0]}}, r"cache\.mag_ratios\['cond'\]"),
    ({"method": "profiling_dit", "block_entropy": [0.1, math.inf]}, r"cache\.block_entropy\[1\]"),
    ({"method": "profiling_dit", "block_entropy": [0.1, 0.2], "block_classes": ["fg"]}, r"cache\.block_entropy"),
])
def test_calibrated_curves_are_finite(cache, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict({"cache": cache})


def test_ertacache_with_inf_in_a_policy_file_fails_at_load(tmp_path):
    path = tmp_path / "erta.yaml"
    path.write_text(yaml.safe_dump({"cache": {**ERTA, "scale": {"cond": [1.0, math.inf, 1.0, 0.8]}}}))
    with pytest.raises(PolicyError, match=r"cache\.scale"):
        load_policy(path)


# ---------------------------------------------------------------------------------------------------
# 4. calibrate: a string (or a dict) is one prompt; anything else fails before any generation
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def recorded_prompts(monkeypatch):
    module = sys.modules["dit_accel.calibration"]
    seen: list = []
    original = module.call_arguments

    def spy(prompt, call_kwargs):
        seen.append(prompt)
        return original(prompt, call_kwargs)

    monkeypatch.setattr(module, "call_arguments", spy)
    return seen


def _tiny():
    from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("pixart")
    kwargs = tiny_call_kwargs("pixart", num_inference_steps=4)
    kwargs.pop("prompt")
    return pipe, kwargs


def test_calibrate_takes_a_string_as_one_prompt(recorded_prompts):
    pipe, kwargs = _tiny()
    policy = dit_accel.calibrate(pipe, "a cat", "magcache", **kwargs)
    assert recorded_prompts == ["a cat"]  # not "a", " ", "c", "a", "t"
    assert set(policy.cache.mag_ratios) and all(len(c) == 4 for c in policy.cache.mag_ratios.values())
    recorded_prompts.clear()
    dit_accel.calibrate(pipe, {"prompt": "a dog"}, "magcache", **kwargs)
    assert recorded_prompts == [{"prompt": "a dog"}]  # not the key "prompt" as a prompt


@pytest.mark.parametrize("prompts, fragment", [
    (5, "int"), (None, "None"), ([], "at least one"), ((), "at least one"), ([1], r"prompts\[0\]"),
    (["a cat", b"a dog"], r"prompts\[1\].*bytes"), (b"a cat", "bytes"), (["a cat", None], r"prompts\[1\]"),
])
def test_calibrate_rejects_bad_prompts_before_generating(recorded_prompts, prompts, fragment):
    pipe, kwargs = _tiny()
    with pytest.raises(PolicyError, match=fragment):
        dit_accel.calibrate(pipe, prompts, "magcache", **kwargs)
    assert recorded_prompts == []
