"""``dit-accel demo``: progress, timing spread and compute bound, labelled grid, early errors, a quiet stderr."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_accel import demo
from dit_accel.cli import main
from dit_accel.config import PolicyError

REPO = Path(__file__).resolve().parents[1]


def test_rows_have_spread_compute_share_and_bound(capsys):
    rows = demo.run_demo(model="tiny-pixart", policies=["none", "fora"], repeats=2, out_dir=None)
    by_name = {r["policy"]: r for r in rows}
    fora = by_name["fora"]
    assert fora["repeats"] == 2 and fora["spread"] >= 0
    assert fora["compute_share"] == pytest.approx(1 - fora["blocks_saved"])
    assert fora["compute_bound"] == pytest.approx(1 / fora["compute_share"])
    assert by_name["none"]["compute_share"] == 1.0 and by_name["none"]["compute_bound"] == 1.0
    captured = capsys.readouterr()
    assert "compute" in captured.out and "bound" in captured.out and "±" in captured.out
    progress = [line for line in captured.err.splitlines() if line.startswith("dit-accel demo [")]
    assert any("round 2/2, fora" in line for line in progress) and progress[0].endswith("loading tiny-pixart")


def test_speedup_notes():
    # 3x faster with half the blocks computed: above the 2x bound -> noise
    assert demo.speedup_note(3.0, 2.0, 1.0, 0.01, 3.0, 0.01, 3) == "above compute bound: timing noise"
    # 1.05x with ranges that overlap the baseline's
    assert demo.speedup_note(1.05, 2.0, 1.0, 0.05, 1.05, 0.05, 3) == "within noise"
    assert demo.speedup_note(1.5, 2.0, 1.0, 0.01, 1.5, 0.01, 3) == ""
    assert demo.speedup_note(1.5, 2.0, 1.0, 0.0, 1.5, 0.0, 1) == "1 run: spread unknown"
    assert demo.speedup_note(1.5, None, 1.0, 0.01, 1.5, 0.01, 3) == ""  # no bound (guidance): only the spread
    table = demo.format_table([
        {"policy": "baseline", "seconds": 3.0, "spread": 0.01, "speedup": 1.0, "psnr_db": math.inf,
         "blocks_saved": 0.0, "compute_share": 1.0, "compute_bound": 1.0, "note": ""},
        {"policy": "fast", "seconds": 1.0, "spread": 0.01, "speedup": 3.0, "psnr_db": 30.0, "blocks_saved": 0.5,
         "compute_share": 0.5, "compute_bound": 2.0, "note": "above compute bound: timing noise"}])
    line = next(line for line in table.splitlines() if line.startswith("fast"))
    assert "2.00x" in line and "50%" in line and "timing noise" in line


def test_reference_settings_match_the_readme_numbers():
    """README / docs/methods.md / tests/test_quality.py measured cifar10_dit at labels 0, 3, 5, 8, seed 0."""
    assert demo._labels(4) == [0, 3, 5, 8] and demo.SEED == 0
    assert demo._labels(2) == [0, 3] and sorted(demo._labels(10)) == list(range(10))
    quality = (REPO / "tests" / "test_quality.py").read_text()
    assert "class_labels=[0, 3, 5, 8]" in quality and "manual_seed(0)" in quality


def test_grid_is_labelled(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    outputs = {"baseline": torch.rand(4, 3, 8, 8, generator=g), "fora": torch.rand(4, 3, 8, 8, generator=g)}
    path = demo.save_grid(outputs, tmp_path / "grid.png", columns=("airplane", "cat", "dog", "ship"),
                          psnr_db={"baseline": math.inf, "fora": 31.5})
    image = torch.tensor(np.array(Image.open(path).convert("L")), dtype=torch.float32)
    tile = 8 * 3
    assert image.shape[1] > 4 * tile and image.shape[0] > 2 * tile  # margins for the labels
    left = image.shape[1] - 4 * (tile + 4)
    assert (image[:, :left] < 128).any(), "row labels (policy, PSNR) are drawn in the left margin"
    assert (image[:12, left:] < 128).any(), "column labels (classes) are drawn above the images"


def test_mistyped_policy_or_model_fails_before_anything_runs(monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the names were checked")
    monkeypatch.setattr(demo, "load_demo_model", no_model)
    with pytest.raises(PolicyError, match="unknown preset 'fbcahe'"):
        demo.run_demo(model="tiny-dit", policies=["fora", "fbcahe"], out_dir=None)
    assert main(["demo", "--model", "flux"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'tiny-flux'" in err
    assert all(name in err for name in demo.model_names())


def test_policy_for_another_model_fails_before_the_baseline(capsys):
    with pytest.raises(PolicyError, match="calibrated"):
        demo.run_demo(model="tiny-dit", policies=["fora", "cifar10_dit-teacache"], out_dir=None)
    assert "round 1" not in capsys.readouterr().err  # nothing was generated or timed


def test_demo_stderr_has_no_dependency_warnings(tmp_path):
    """The smallest demo (tiny-dit, one policy, one round), run as a newcomer would, in a fresh process.

    What counts: with ``--quiet`` every byte on stderr is something a dependency (or we) printed uninvited,
    so stderr must be empty; without it, every stderr line must be one of the demo's own progress lines
    (``dit-accel demo [...]``) — an import-time notice of torchao, torch's pytree deprecation, transformers or
    tqdm, a Python warning, a log record would each be another line. Run with the environment's settings
    (no ``-W``/``PYTHONWARNINGS``), from a folder outside the repository.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DIT_ACCEL_VERBOSITY")}
    cmd = [sys.executable, "-m", "dit_accel.cli", "demo", "--model", "tiny-dit", "--policies", "fora",
           "--repeats", "1", "--no-images"]
    quiet = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", f"unexpected stderr:\n{quiet.stderr}"
    assert "fora" in quiet.stdout and "compute" in quiet.stdout
    loud = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert loud.returncode == 0, loud.stderr
    others = [line for line in loud.stderr.splitlines() if not line.startswith("dit-accel demo [")]
    assert not others, "stderr lines that are not the demo's progress:\n" + "\n".join(others)
    assert "warm-up" in loud.stderr
