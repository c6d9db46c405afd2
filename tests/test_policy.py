"""Policy validation and serialisation: presets, loaders, error messages, and plans that don't fit a model.

Every rejected input must raise ``dit_accel.PolicyError`` (a ValueError) whose message names the
offending field and what is allowed; a plan that cannot be applied to a model must leave nothing
attached to it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import pytest
import torch
import yaml

import dit_accel
from dit_accel import Policy, PolicyError, load_policy, preset_names
from dit_accel.caching.dbcache import DBCacheConfig
from dit_accel.caching.fora import FORAConfig
from dit_accel.testing import tiny_pipeline, tiny_transformer

DBCACHE_KEYS = ("batch_decision", "bn_compute", "fn_compute", "gate_lag", "max_consecutive_reuse", "method",
                "threshold", "warmup_steps")
FORA_KEYS = ("bn_compute", "fn_compute", "interval", "method", "warmup_steps")
KNOWN_METHODS = ("dbcache", "fbcache", "fora")
SHIPPED = ("dbcache", "fbcache", "fora", "none")


def policy_error(build, *fragments: str) -> str:
    """Call ``build()``; it must raise PolicyError (a ValueError) whose message contains every fragment."""
    with pytest.raises(PolicyError) as info:
        build()
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"
    return message


def cache(**fields):
    """A policy dict with only a cache section."""
    return {"cache": fields}


def hook_snapshot(*roots: torch.nn.Module) -> dict:
    """Everything a hook could leave behind on the modules under ``roots``, per module."""
    snap = {}
    for r, root in enumerate(roots):
        for name, module in root.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            snap[(r, name)] = (
                len(module._forward_pre_hooks),
                len(module._forward_hooks),
                len(module._forward_pre_hooks_with_kwargs),
                len(module._forward_hooks_with_kwargs),
                len(module._forward_hooks_always_called),
                None if registry is None else tuple(registry.hooks),
                "forward" in module.__dict__,
                hasattr(module, "_dit_accel"),
            )
    return snap


def dit_accel_hooks(*roots: torch.nn.Module) -> list[str]:
    """Names of modules carrying a diffusers hook registry with a ``dit_accel.*`` hook."""
    return [f"{name}:{hook}" for root in roots for name, module in root.named_modules()
            for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
            if hook.startswith("dit_accel")]


@functools.lru_cache(maxsize=None)
def cached_pipeline(family: str):
    """One shared tiny pipeline per family (tests using it leave it unchanged)."""
    return tiny_pipeline(family)


# ---------------------------------------------------------------------------------------------------
# Presets and round trips
# ---------------------------------------------------------------------------------------------------


def test_preset_names_lists_shipped_yaml_files():
    names = preset_names()
    assert names == sorted(names)
    assert set(SHIPPED) <= set(names)
    presets_dir = Path(dit_accel.__file__).parent / "presets"
    assert names == sorted(p.stem for p in presets_dir.glob("*.yaml"))


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_and_round_trips(name, tmp_path):
    p = load_policy(name)
    assert isinstance(p, Policy)
    assert p.name == name
    assert p.is_empty == (name == "none")
    d = p.to_dict()
    sections = ("guidance", "attention", "quant", "compile", "calibrated_for")
    assert set(d) == {"name", "cache"} | {s for s in sections if getattr(p, s) is not None}
    assert (p.calibrated_for is not None) == name.startswith("cifar10_dit-")  # the calibrated presets say for what

    # dict
    again = Policy.from_dict(d)
    assert again == p
    assert again.to_dict() == d
    # YAML text
    from_yaml = Policy.from_dict(yaml.safe_load(p.to_yaml()))
    assert from_yaml == p
    assert from_yaml.to_dict() == d
    # file, as str and as Path
    path = tmp_path / f"{name}.yaml"
    p.save(path)
    assert load_policy(path) == p
    assert load_policy(str(path)) == p
    assert load_policy(path).to_dict() == d
    # types survive (a float threshold stays a float, not an int that compares equal)
    for key, value in d["cache"].items() if d["cache"] else ():
        assert type(load_policy(path).cache.to_dict()[key]) is type(value), key


@pytest.mark.parametrize("spec", [
    cache(method="fora", interval=5, warmup_steps=2, fn_compute=1, bn_compute=1),
    cache(method="dbcache", threshold=0, fn_compute=2, bn_compute=1, warmup_steps=3, max_consecutive_reuse=2,
          batch_decision="mean", gate_lag=1),
    {"name": "mine", "cache": {"method": "dbcache", "threshold": 0.125}},
    {"name": "off", "cache": None},
], ids=["fora", "dbcache-all-fields", "named", "no-cache"])
def test_custom_policy_round_trips(spec, tmp_path):
    p = load_policy(spec)
    assert Policy.from_dict(p.to_dict()) == p
    assert Policy.from_dict(yaml.safe_load(p.to_yaml())) == p
    p.save(tmp_path / "p.yml")
    assert load_policy(tmp_path / "p.yml") == p
    if p.cache is not None and p.cache.method == "dbcache":
        assert isinstance(p.cache.threshold, float)  # an int threshold is coerced to a float


# ---------------------------------------------------------------------------------------------------
# load_policy inputs
# ---------------------------------------------------------------------------------------------------


def test_load_policy_accepts_every_form(tmp_path):
    by_name = load_policy("fora")
    assert by_name.cache.method == "fora" and by_name.cache.interval == 3

    path = tmp_path / "policy.yaml"
    path.write_text("name: from-file\ncache:\n  method: fora\n  interval: 4\n")
    from_path = load_policy(path)
    from_str = load_policy(str(path))
    assert from_path == from_str
    assert from_path.name == "from-file" and from_path.cache.interval == 4

    other = tmp_path / "policy.txt"  # an existing file without a YAML suffix is still a file
    other.write_text(path.read_text())
    assert load_policy(other) == from_path

    from_dict = load_policy({"name": "d", "cache": {"method": "fora", "interval": 4}})
    assert from_dict.cache == from_path.cache and from_dict.name == "d"

    assert load_policy(from_dict) is from_dict

    empty = load_policy(None)
    assert isinstance(empty, Policy) and empty.is_empty and empty.cache is None
    assert load_policy("none").is_empty
    assert load_policy({}).is_empty
    assert not load_policy("fbcache").is_empty


def test_fbcache_alias_resolves_to_dbcache():
    p = load_policy({"cache": {"method": "fbcache"}})
    assert isinstance(p.cache, DBCacheConfig)
    assert p.cache.method == "dbcache"
    assert (p.cache.fn_compute, p.cache.bn_compute) == (1, 0)
    assert p.cache == load_policy("fbcache").cache
    assert p.to_dict()["cache"]["method"] == "dbcache"  # serialised under its real name
    assert load_policy({"cache": {"method": "fbcache", "threshold": 0.2}}).cache.threshold == 0.2


# ---------------------------------------------------------------------------------------------------
# Errors: every message names the field and what is allowed
# ---------------------------------------------------------------------------------------------------

BAD_SPECS = {
    # unknown keys (with a did-you-mean hint where one is close)
    "unknown-top-level": ({"cahce": {"method": "fora"}}, ["'cahce'", "did you mean 'cache'", "cache", "name"]),
    "unknown-top-level-no-hint": ({"speedup": 2}, ["'speedup'", "allowed keys", "cache", "name"]),
    "unknown-cache-key": (cache(method="dbcache", treshold=0.1),
                          ["'treshold'", "did you mean 'threshold'", *DBCACHE_KEYS]),
    "unknown-fora-key": (cache(method="fora", intervall=2), ["'intervall'", "did you mean 'interval'", *FORA_KEYS]),
    "dbcache-key-under-fora": (cache(method="fora", threshold=0.1), ["'threshold'", *FORA_KEYS]),
    # wrong types
    "threshold-str": (cache(method="dbcache", threshold="high"), ["cache.threshold", "number", "'high'"]),
    "threshold-bool": (cache(method="dbcache", threshold=True), ["cache.threshold", "number"]),
    "fn_compute-float": (cache(method="dbcache", fn_compute=1.5), ["cache.fn_compute", "integer", "1.5"]),
    "fn_compute-bool": (cache(method="dbcache", fn_compute=True), ["cache.fn_compute", "integer", "True"]),
    "interval-bool": (cache(method="fora", interval=True), ["cache.interval", "integer"]),
    "warmup-str": (cache(method="fora", warmup_steps="3"), ["cache.warmup_steps", "integer"]),
    "max_consecutive_reuse-float": (cache(method="dbcache", max_consecutive_reuse=2.5),
                                    ["cache.max_consecutive_reuse", "integer"]),
    "batch_decision-int": (cache(method="dbcache", batch_decision=3), ["cache.batch_decision", "string"]),
    "name-int": ({"name": 3}, ["name", "string"]),
    "name-empty": ({"name": ""}, ["name", "non-empty"]),
    # out of range
    "threshold-negative": (cache(method="dbcache", threshold=-0.1), ["cache.threshold", "-0.1", ">= 0"]),
    "threshold-too-big": (cache(method="dbcache", threshold=11), ["cache.threshold", "<= 10"]),
    "interval-zero": (cache(method="fora", interval=0), ["cache.interval", ">= 1"]),
    "fn_compute-zero": (cache(method="dbcache", fn_compute=0), ["cache.fn_compute", ">= 1"]),
    "bn_compute-negative": (cache(method="dbcache", bn_compute=-1), ["cache.bn_compute", ">= 0"]),
    "max_consecutive_reuse-zero": (cache(method="dbcache", max_consecutive_reuse=0),
                                   ["cache.max_consecutive_reuse", ">= 1"]),
    # bad choices, methods
    "batch_decision-choice": (cache(method="dbcache", batch_decision="any"),
                              ["cache.batch_decision", "'any'", "'strict'", "'mean'"]),
    "unknown-method": (cache(method="nosuchcache"), ["cache.method", "'nosuchcache'", *KNOWN_METHODS]),
    "missing-method": (cache(threshold=0.1), ["cache.method", "required", *KNOWN_METHODS]),
    # not a mapping
    "int": (42, ["int", "preset name", "dict"]),
    "list": (["cache"], ["list", "preset name", "dict"]),
    "cache-str": ({"cache": "fbcache"}, ["cache", "mapping", "method"]),
    "cache-int": ({"cache": 3}, ["cache", "mapping"]),
}


@pytest.mark.parametrize("spec,fragments", list(BAD_SPECS.values()), ids=list(BAD_SPECS))
def test_bad_policy_raises_named_error(spec, fragments):
    policy_error(lambda: load_policy(spec), *fragments)
    if isinstance(spec, dict):  # the dict entry point says the same
        policy_error(lambda: Policy.from_dict(spec), *fragments)


def test_unknown_preset_lists_shipped_presets():
    policy_error(lambda: load_policy("fbcach"), "'fbcach'", "preset", *preset_names())


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    policy_error(lambda: load_policy(missing), "nope.yaml", "does not exist")
    policy_error(lambda: load_policy(str(tmp_path / "nope.yml")), "nope.yml", "does not exist")


def test_yaml_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- fbcache\n- fora\n")
    policy_error(lambda: load_policy(path), "mapping", "list")
    policy_error(lambda: Policy.from_dict(["cache"]), "mapping", "list")


def test_yaml_file_with_bad_field_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cache:\n  method: dbcache\n  treshold: 0.1\n")
    policy_error(lambda: load_policy(path), "'treshold'", "did you mean 'threshold'")


def test_config_classes_validate_on_construction():
    policy_error(lambda: DBCacheConfig(threshold=-1.0), "cache.threshold", ">= 0")
    policy_error(lambda: FORAConfig(interval=0), "cache.interval", ">= 1")
    policy_error(lambda: Policy(cache={"method": "fora", "interval": 0}), "cache.interval")
    policy_error(lambda: Policy(name=""), "name")
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_policy("fora").cache.interval = 5


def test_nan_threshold_is_rejected():
    policy_error(lambda: load_policy(cache(method="dbcache", threshold=float("nan"))), "cache.threshold")


@pytest.mark.parametrize("spec", [{1: "x"}, {"cache": {"method": "fora", True: 1}}],
                         ids=["int-top-level-key", "bool-cache-key"])
def test_non_string_key_is_rejected_with_policy_error(spec):
    policy_error(lambda: load_policy(spec), "unknown key")


def test_unhashable_method_is_rejected_with_policy_error():
    policy_error(lambda: load_policy(cache(method=["dbcache"])), "cache.method", *KNOWN_METHODS)


@pytest.mark.parametrize("data", [5, "abc", [("threshold", 0.1)]], ids=["int", "str", "pairs"])
def test_config_from_dict_rejects_non_mapping(data):
    policy_error(lambda: DBCacheConfig.from_dict(data), "mapping")


# ---------------------------------------------------------------------------------------------------
# Policy.replace
# ---------------------------------------------------------------------------------------------------


def test_replace_validates_again():
    p = load_policy("fbcache")
    q = p.replace(threshold=0.2)
    assert q.cache.threshold == 0.2
    assert q.name == p.name
    assert dataclasses.replace(q.cache, threshold=p.cache.threshold) == p.cache  # nothing else changed
    assert p.cache.threshold == 0.08  # the original is untouched
    assert q == Policy.from_dict(q.to_dict())

    policy_error(lambda: p.replace(threshold=-1), "cache.threshold", ">= 0")
    policy_error(lambda: p.replace(threshold="high"), "cache.threshold", "number")
    policy_error(lambda: p.replace(treshold=0.2), "'treshold'", "did you mean 'threshold'")
    policy_error(lambda: p.replace(batch_decision="any"), "cache.batch_decision", "'strict'", "'mean'")
    policy_error(lambda: load_policy("fora").replace(threshold=0.2), "'threshold'", *FORA_KEYS)
    policy_error(lambda: load_policy(None).replace(threshold=0.2), "no cache")


# ---------------------------------------------------------------------------------------------------
# A plan that doesn't fit the model: an error naming the fields and the block count, nothing attached
# ---------------------------------------------------------------------------------------------------

TOO_BIG = {
    "dbcache-f3b1": (cache(method="dbcache", fn_compute=3, bn_compute=1), ["cache.fn_compute", "cache.bn_compute"]),
    "dbcache-gate_lag": (cache(method="dbcache", fn_compute=1, gate_lag=3), ["cache.fn_compute", "cache.gate_lag"]),
    "fora-f2b2": (cache(method="fora", fn_compute=2, bn_compute=2), ["cache.fn_compute", "cache.bn_compute"]),
    "dbcache-preset-F8": ("dbcache", ["cache.fn_compute", "cache.bn_compute"]),
}


@pytest.mark.parametrize("spec,fragments", list(TOO_BIG.values()), ids=list(TOO_BIG))
@pytest.mark.parametrize("family,target_kind", [("dit", "transformer"), ("flux", "transformer"), ("dit", "pipeline")])
def test_plan_that_does_not_fit_raises_and_attaches_nothing(spec, fragments, family, target_kind):
    if target_kind == "pipeline":
        target = cached_pipeline(family)
        transformer = target.transformer
        roots = [c for c in target.components.values() if isinstance(c, torch.nn.Module)]
        scheduler = target.scheduler
    else:
        target = transformer = tiny_transformer(family)
        roots = [target]
        scheduler = None
    groups = ("transformer_blocks", "single_transformer_blocks")
    num_blocks = sum(len(getattr(transformer, group, ())) for group in groups)
    assert num_blocks == 4
    before = hook_snapshot(*roots)

    msg = policy_error(lambda: dit_accel.accelerate(target, spec), *fragments)
    assert re.search(r"\b4\b", msg) and "block" in msg, f"message {msg!r} does not give the block count (4)"

    assert hook_snapshot(*roots) == before
    assert dit_accel_hooks(*roots) == []
    assert not dit_accel.is_accelerated(target)
    assert not dit_accel.is_accelerated(transformer)
    if scheduler is not None:
        assert "set_timesteps" not in scheduler.__dict__
    with pytest.raises(PolicyError, match="not accelerated"):
        dit_accel.remove(target)

    # nothing stale either: a policy that fits attaches and detaches cleanly afterwards
    dit_accel.accelerate(target, cache(method="dbcache", fn_compute=1, bn_compute=1))
    assert dit_accel.is_accelerated(target)
    assert dit_accel_hooks(*roots)
    assert hook_snapshot(*roots) != before  # the snapshot does see attached hooks
    dit_accel.remove(target)
    assert dit_accel_hooks(*roots) == []
    assert hook_snapshot(*roots) == before
    assert not dit_accel.is_accelerated(target)


def test_policy_file_errors_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {method: fora, interval: [")
    policy_error(lambda: load_policy(bad), "bad.yaml", "not valid YAML")
    policy_error(lambda: load_policy(tmp_path / "missing.YAML"), "missing.YAML", "does not exist")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fora").mkdir()  # a folder named like a preset does not shadow the preset
    assert load_policy("fora").cache.method == "fora"
