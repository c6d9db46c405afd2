"""Sweep specs are checked as a whole before the first generation: a bad last model, prompt set, class list,
device, policy grid or metric setting fails up front, not after the earlier models ran. ``run_sweep`` takes a
dict as well as a path or a SweepSpec."""

from __future__ import annotations

import pytest
import torch
import yaml

from dit_accel.cli import main
from dit_accel.eval import runner
from dit_accel.eval.prompts import load_classes, load_prompts
from dit_accel.eval.runner import run_sweep
from dit_accel.eval.store import ResultStore
from dit_accel.eval.sweep import SweepError, SweepSpec

QUICK = {"name": "quick", "models": ["tiny-dit"], "policies": ["fora"], "steps": [2], "seeds": 1, "classes": 1,
         "prompts": ["a cat"], "fewer_steps": [], "metrics": ["psnr"], "timing": {"warmup": 0, "repeats": 1},
         "device": "cpu"}


@pytest.fixture
def generations(monkeypatch):
    """Record every generation the runner starts (and stop there: these tests are about what comes first)."""
    calls: list = []

    def output(self, spec_model, model, variant, seed, cond, summary):
        calls.append((spec_model.name, variant.label, seed, cond))
        raise RuntimeError("a generation ran")

    monkeypatch.setattr(runner.SweepRunner, "_output", output)
    return calls


BAD_LAST = {
    "unknown-tiny-model": ({"models": ["tiny-dit", "tiny-nope"]}, r"models\[1\].*tiny-nope"),
    "unknown-zoo-model": ({"models": ["tiny-dit", "zoo:nope"]}, r"models\[1\].*zoo:nope"),
    "missing-py-file": ({"models": ["tiny-dit", "py:no_such_file.py:build"]}, r"models\[1\].*no_such_file"),
    "missing-py-attr": ({"models": ["tiny-dit", "py:dit_accel.eval.testing:nope"]}, r"models\[1\].*nope"),
    "not-a-model-name": ({"models": ["tiny-dit", "no such model"]}, r"models\[1\].*'no such model'"),
    "bad-dtype": ({"models": ["tiny-dit", {"name": "tiny-sd3", "dtype": "float8"}]}, r"models\[1\]\.dtype"),
    "bad-kwargs": ({"models": ["tiny-dit", {"name": "tiny-sd3", "kwargs": [1, 2]}]}, r"models\[1\]\.kwargs"),
    "unknown-prompt-set": ({"models": ["tiny-dit", "tiny-sd3"], "prompts": "nosuchset:4"}, r"prompts.*nosuchset"),
    "zero-prompts": ({"models": ["tiny-dit", "tiny-sd3"], "prompts": "builtin:0"}, r"prompts"),
    "missing-prompt-file": ({"models": ["tiny-dit", "tiny-sd3"], "prompts": "missing.txt"}, r"prompts.*missing"),
    "empty-prompt-list": ({"models": ["tiny-dit", "tiny-sd3"], "prompts": []}, r"prompts"),
    "prompt-not-a-string": ({"models": ["tiny-dit", "tiny-sd3"], "prompts": ["a cat", 3]}, r"prompts"),
    "unknown-class-name": ({"models": ["tiny-sd3", "tiny-dit"], "classes": ["cat", "unicorn"]},
                           r"classes.*models\[1\].*unicorn"),
    "class-out-of-range": ({"models": ["tiny-sd3", "zoo:cifar10_dit"], "classes": [3, 12]},
                           r"classes.*models\[1\].*12"),
    "no-classes": ({"models": ["tiny-sd3", "tiny-dit"], "classes": []}, r"classes"),
    "class-float": ({"models": ["tiny-sd3", "tiny-dit"], "classes": [1.5]}, r"classes"),
    "class-bool": ({"models": ["tiny-sd3", "tiny-dit"], "classes": True}, r"classes"),
    "bad-device": ({"device": "gpu"}, r"device.*'gpu'"),
    "empty-grid": ({"policies": ["fora", {"policy": "fbcache", "grid": {"threshold": []}}]},
                   r"policies\[1\]\.grid.*threshold"),
    "grid-key-not-a-string": ({"policies": ["fora", {"policy": "fbcache", "grid": {1: [0.1]}}]},
                              r"policies\[1\]\.grid"),
    "grid-values-not-a-list": ({"policies": ["fora", {"policy": "fbcache", "grid": {"threshold": {"a": 1}}}]},
                               r"policies\[1\]"),
    "unknown-policy": ({"policies": ["fora", "no-such-preset"]}, r"policies\[1\]"),
    "missing-fid-reference": ({"metrics": ["psnr", "fid"], "fid": {"feature": "py:dit_accel.eval.testing:"
                                                                              "tiny_feature_net",
                                                                   "reference": "no/such/folder"}},
                              r"fid\.reference.*no/such/folder"),
    "unknown-fid-feature": ({"metrics": ["psnr", "fid"], "fid": {"feature": "inceptionn"}}, r"fid\.feature"),
    "unknown-lpips-net": ({"metrics": ["psnr", "lpips"], "lpips": {"net": "alexx"}}, r"lpips\.net.*alexx"),
    "missing-lpips-backbone": ({"metrics": ["psnr", "lpips"], "lpips": {"backbone": "py:dit_accel.eval.testing:no"}},
                               r"lpips\.backbone"),
    "no-models": ({"models": []}, r"models"),
    "no-steps": ({"steps": []}, r"steps"),
}


@pytest.mark.parametrize("change, message", list(BAD_LAST.values()), ids=list(BAD_LAST))
def test_a_bad_last_entry_fails_before_anything_is_generated(generations, tmp_path, change, message):
    with pytest.raises(SweepError, match=message):
        run_sweep(SweepSpec.from_dict({**QUICK, **change}, base_dir=str(tmp_path)), tmp_path / "store",
                  progress=False)
    assert generations == []
    assert not (tmp_path / "store" / "outputs").exists() or not any((tmp_path / "store" / "outputs").iterdir())


def test_cuda_device_without_cuda_fails_up_front(generations, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SweepError, match="device.*cuda"):
        SweepSpec.from_dict({**QUICK, "device": "cuda"})
    assert generations == []


def test_the_cli_checks_the_spec_after_its_device_override(generations, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**QUICK, "models": ["tiny-dit", "tiny-nope"]}))
    assert main(["sweep", str(spec), "--store", str(tmp_path / "store"), "--no-progress"]) == 2
    assert "models[1]" in capsys.readouterr().err and generations == []
    spec.write_text(yaml.safe_dump(QUICK))
    assert main(["sweep", str(spec), "--store", str(tmp_path / "store"), "--device", "gpu", "--no-progress"]) == 2
    assert "device" in capsys.readouterr().err and generations == []
    if not torch.cuda.is_available():  # a GPU sweep file run with --device cpu on a CPU machine is fine
        spec.write_text(yaml.safe_dump({**QUICK, "device": "cuda"}))
        with pytest.raises(RuntimeError, match="a generation ran"):
            main(["sweep", str(spec), "--store", str(tmp_path / "store"), "--device", "cpu", "--no-progress"])


def test_run_sweep_accepts_a_dict(tmp_path):
    summary = run_sweep(QUICK, tmp_path, progress=False)
    assert summary.samples == 2 and summary.configs == 2  # baseline and fora, one (seed, class) pair
    assert {r["variant"] for r in ResultStore(tmp_path).rows("config")} == {"baseline", "fora"}
    with pytest.raises(SweepError, match=r"models\[1\]"):
        run_sweep({**QUICK, "models": ["tiny-dit", "tiny-nope"]}, tmp_path, progress=False)


def test_prompt_files_relative_to_the_sweep_file_are_checked(tmp_path, generations):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SweepError, match="prompts.*empty.txt"):
        SweepSpec.from_dict({**QUICK, "models": ["tiny-sd3"], "prompts": "empty.txt"}, base_dir=str(tmp_path))
    (tmp_path / "mine.txt").write_text("a cat\na dog\n")
    spec = SweepSpec.from_dict({**QUICK, "models": ["tiny-sd3"], "prompts": "mine.txt:1"}, base_dir=str(tmp_path))
    assert load_prompts(spec.prompts) == ["a cat"]  # the file beside the sweep file, as the runner reads it


def test_load_prompts_and_classes_refuse_empty_and_odd_sets(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    for bad in ([], True, [1.5], [True], -1, 0, "0"):
        with pytest.raises(ValueError, match="classes"):
            load_classes(bad, 10)
    assert load_classes(["3", 4, "cat"], 10, [str(i) for i in range(3)] + ["cat"] + ["x"] * 6) == [3, 4, 3]
