"""The ``dit-accel`` command line: demo table, presets, policy errors."""

from __future__ import annotations

import math

from dit_accel.cli import main
from dit_accel.demo import run_demo


def test_demo_on_tiny_pipeline_prints_table(capsys):
    assert main(["demo", "--model", "tiny-dit", "--repeats", "1", "--no-images"]) == 0
    out = capsys.readouterr().out
    for word in ("baseline", "fbcache", "fora", "speedup", "PSNR", "blocks saved"):
        assert word in out


def test_demo_rows_are_measured():
    rows = run_demo(model="tiny-pixart", policies=["none", "fora"], repeats=1, out_dir=None)
    by_name = {r["policy"]: r for r in rows}
    assert math.isinf(by_name["none"]["psnr_db"]) and by_name["none"]["blocks_saved"] == 0
    assert 0 < by_name["fora"]["blocks_saved"] < 1 and math.isfinite(by_name["fora"]["psnr_db"])
    assert all(r["seconds"] > 0 for r in rows)


def test_presets_and_show(capsys):
    assert main(["presets"]) == 0
    assert "fbcache" in capsys.readouterr().out
    assert main(["show", "fora"]) == 0
    assert "interval: 3" in capsys.readouterr().out


def test_bad_policy_is_a_clean_error(capsys):
    assert main(["show", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset" in err and "fbcache" in err
