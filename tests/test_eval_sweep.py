"""Sweep specifications: parsing, policy grids, fewer-steps variants, keys, clear errors."""

from __future__ import annotations

import pytest

from dit_accel.cli import main
from dit_accel.eval.sweep import ModelSpec, SweepError, SweepSpec, Variant, generation_key

BASE = {"models": ["tiny-dit"], "steps": [12]}


def test_grid_expands_through_policy_replace():
    spec = SweepSpec.from_dict({**BASE, "policies": [
        "fora", {"name": "fb", "cache": {"method": "fbcache"}},
        {"policy": "fbcache", "grid": {"cache.threshold": [0.05, 0.1], "fn_compute": [1, 2]}}]})
    names = [p.name for p in spec.policies]
    assert names[:2] == ["fora", "fb"]
    assert names[2:] == ["fbcache[threshold=0.05,fn_compute=1]", "fbcache[threshold=0.05,fn_compute=2]",
                         "fbcache[threshold=0.1,fn_compute=1]", "fbcache[threshold=0.1,fn_compute=2]"]
    grid = spec.policies[5]
    assert grid.cache.threshold == 0.1 and grid.cache.fn_compute == 2


def test_defaults_and_seeds():
    spec = SweepSpec.from_dict({**BASE, "seeds": 3})
    assert spec.seeds == [0, 1, 2] and spec.metrics == ["psnr", "rel_l2", "ssim"]
    assert SweepSpec.from_dict({**BASE, "seeds": [4, 9]}).seeds == [4, 9]


def test_variants_fewer_steps():
    spec = SweepSpec.from_dict({**BASE, "policies": ["fora"], "fewer_steps": [1.5, 2, 3, 2.1]})
    vs = spec.variants(12)
    assert [(v.kind, v.label, v.steps, v.ref_steps) for v in vs] == [
        ("baseline", "baseline", 12, 12), ("policy", "fora", 12, 12), ("fewer-steps", "8 steps", 8, 12),
        ("fewer-steps", "6 steps", 6, 12), ("fewer-steps", "4 steps", 4, 12)]  # 12/2.1 rounds to 6 again
    assert [v.steps for v in spec.variants(2)][2:] == [1]  # never below one step


def test_generation_keys_depend_on_content_not_names():
    m = ModelSpec("tiny-dit")
    spec = SweepSpec.from_dict({**BASE, "policies": [{"name": "a", "cache": {"method": "fora"}},
                                                     {"name": "b", "cache": {"method": "fora"}},
                                                     {"name": "c", "cache": {"method": "fora", "interval": 2}}]})
    a, b, c = (Variant("policy", p.name, 12, 12, p) for p in spec.policies)
    assert generation_key(m, a, 0, "x") == generation_key(m, b, 0, "x")
    assert generation_key(m, a, 0, "x") != generation_key(m, c, 0, "x")
    assert generation_key(m, a, 0, "x") != generation_key(m, a, 1, "x")
    base, fewer = Variant("baseline", "baseline", 6, 6), Variant("fewer-steps", "6 steps", 6, 12)
    assert generation_key(m, base, 0, "x") == generation_key(m, fewer, 0, "x")  # the same generation, reused
    assert ModelSpec("tiny-dit", {"height": 32}).key != m.key


@pytest.mark.parametrize("data, message", [
    ({**BASE, "bogus": 1}, "unknown sweep field"),
    ({"models": ["tiny-dit"]}, "'steps' is required"),
    ({**BASE, "metrics": ["psnr", "fidd"]}, "fidd"),
    ({**BASE, "policies": [{"policy": "fbcache", "grid": {"thresh": [0.1]}}]}, "policies\\[0\\].*thresh"),
    ({**BASE, "policies": ["no-such-preset"]}, "policies\\[0\\]: unknown preset"),
    ({**BASE, "policies": ["fora", "fora"]}, "duplicate names"),
    ({**BASE, "fewer_steps": [0.5]}, "factors > 1"),
    ({**BASE, "steps": [0]}, "positive integers"),
    ({**BASE, "timing": {"repeats": 0}}, "timing.repeats"),
    ({**BASE, "lpips": {"netz": "alex"}}, "lpips: unknown key"),
    ({**BASE, "models": [{"kwargs": {}}]}, "models\\[0\\]"),
    ({**BASE, "context_parallel": 1}, "context_parallel: expected the number of processes"),
    ({**BASE, "context_parallel": "two"}, "context_parallel"),
])
def test_errors_name_the_field(data, message):
    with pytest.raises(SweepError, match=message):
        SweepSpec.from_dict(data)


def test_yaml_file(tmp_path):
    (tmp_path / "pol.yaml").write_text("name: mine\ncache: {method: fora, interval: 2}\n")
    path = tmp_path / "s.yaml"
    path.write_text("models: [tiny-dit]\nsteps: 4\npolicies: [pol.yaml]\n")
    spec = SweepSpec.from_yaml(path)
    assert spec.name == "s" and spec.steps == [4] and spec.policies[0].name == "mine"
    path.write_text("models: [tiny-dit\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        SweepSpec.from_yaml(path)


def test_cli_help_and_errors(capsys, tmp_path):
    for command in ("eval", "sweep", "report"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "accelerate launch" in text and "--max-samples" in text and "fewer-steps" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [tiny-dit]\nsteps: [4]\npolicies: [nope]\n")
    assert main(["sweep", str(bad), "--store", str(tmp_path / "s")]) == 2
    assert "policies[0]: unknown preset 'nope'" in capsys.readouterr().err
