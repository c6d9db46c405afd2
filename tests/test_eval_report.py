"""Reports: Pareto fronts, the fewer-steps verdict, Markdown/HTML/PNG output, the eval/sweep/report commands,
and the offline CI sweep of every tiny pipeline (benchmarks/sweeps/tiny.yaml)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pandas", reason="reports need the eval extra: pip install -e '.[eval]'")
pytest.importorskip("matplotlib", reason="reports need the eval extra: pip install -e '.[eval]'")

from dit_accel.cli import main  # noqa: E402
from dit_accel.eval.report import load_configs, pareto_front, versus_fewer_steps  # noqa: E402
from dit_accel.eval.store import ResultStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_pareto_front():
    speed = np.array([1.0, 1.5, 2.0, 1.4, 3.0, 2.0])
    quality = np.array([40.0, 30.0, 25.0, 28.0, np.nan, 26.0])  # higher is better
    assert pareto_front(speed, quality, True).tolist() == [True, True, False, False, False, True]
    loss = -quality  # the same points with lower-is-better values
    assert pareto_front(speed, loss, False).tolist() == [True, True, False, False, False, True]


def test_versus_fewer_steps():
    curve = [(1.0, math.inf), (1.5, 30.0), (2.0, 25.0), (3.0, 20.0)]  # baseline + fewer steps, PSNR
    assert versus_fewer_steps(1.5, 31.0, curve, True) == "✓"
    assert versus_fewer_steps(1.75, 26.0, curve, True) == "✗"  # 10^-2.6 > the curve's MSE at 1.75x
    assert versus_fewer_steps(0.9, math.inf, curve, True) == "✗"  # slower than the baseline, no better
    assert versus_fewer_steps(3.5, 21.0, curve, True) == "✓"  # faster and better than the fastest point
    assert versus_fewer_steps(3.5, 19.0, curve, True) == "?"
    lpips = [(1.0, 0.0), (2.0, 0.2)]
    assert versus_fewer_steps(1.5, 0.05, lpips, False) == "✓" and versus_fewer_steps(1.5, 0.15, lpips, False) == "✗"
    assert versus_fewer_steps(1.5, float("nan"), lpips, False) == "?"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """The CI sweep: every tiny pipeline, 3 policies (one a grid), fewer steps, all metrics (stand-in nets)."""
    store = tmp_path_factory.mktemp("tiny") / "store"
    assert main(["sweep", str(REPO / "benchmarks" / "sweeps" / "tiny.yaml"), "--store", str(store),
                 "--no-progress", "--report"]) == 0
    return store


def test_ci_sweep_produces_a_report(tiny_store):
    from dit_accel.testing import FAMILIES

    df = load_configs(tiny_store)
    assert set(df["model"]) == {f"tiny-{f}" for f in FAMILIES}
    assert len(df) == len(FAMILIES) * 8  # baseline, 4 policies, 3 fewer-steps runs
    fora = df[df["variant"] == "fora"]
    assert (fora["blocks_computed_share"] < 0.5).all()  # (CPU timings are too noisy to assert speed-ups on)
    assert np.allclose(df["speedup"], df["baseline_e2e_ms"] / df["e2e_ms"]) and (df["e2e_ms"] > 0).all()
    dit = df[df["model"] == "tiny-dit"]
    assert dit[["fid", "clip"]].notna().all().all()  # images: every metric
    assert dit.loc[dit["kind"] != "baseline", ["psnr", "ssim", "lpips"]].notna().all().all()
    assert (dit["clip"] > 0).all() and dit.loc[dit["kind"] == "baseline", "fid"].iloc[0] == 0
    report = (tiny_store / "report" / "report.md").read_text()
    for family in FAMILIES:
        assert f"## tiny-{family} — sweep tiny" in report
    for word in ("speed-up", "FID", "CLIP", "PSNR", "SSIM", "LPIPS (custom backbone)", "peak mem", "blocks computed",
                 "attn density", "vs fewer steps", "Pareto"):
        assert word in report
    pngs = sorted((tiny_store / "report").glob("*.png"))
    assert len(pngs) == len(FAMILIES) and all(p.stat().st_size > 10_000 for p in pngs)
    html = (tiny_store / "report" / "report.html").read_text()
    assert html.count("<img") == len(FAMILIES) and html.count("<table>") == len(FAMILIES)
    assert "<h2>tiny-dit — sweep tiny</h2>" in html and "<li>" in html and "<code>" in html  # rendered Markdown
    assert "|---" not in html and "![" not in html and "`" not in html
    outputs = list((tiny_store / "outputs").rglob("*.png"))
    assert outputs, "image outputs are stored viewable (PNG) beside their records"


def test_markdown_to_html():
    from dit_accel.eval.report import markdown_to_html

    out = markdown_to_html("# T\n\nsee `a|b` and **c**\n\n- one\n- two\n\n| x | y\\|z |\n|---|---|\n| 1 | 2 |\n\n"
                           "![plot](p.png)\n")
    assert out.splitlines() == ["<h1>T</h1>", "<p>see <code>a|b</code> and <strong>c</strong></p>",
                                "<ul><li>one</li><li>two</li></ul>",
                                "<table><thead><tr><th>x</th><th>y|z</th></tr></thead><tbody><tr><td>1</td>"
                                "<td>2</td></tr></tbody></table>", '<p><img src="p.png" alt="plot"></p>']


def test_report_command(tiny_store, tmp_path, capsys):
    assert main(["report", str(tiny_store), "--out", str(tmp_path / "r"), "--format", "md"]) == 0
    assert (tmp_path / "r" / "report.md").is_file() and not (tmp_path / "r" / "report.html").exists()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no configuration rows" in capsys.readouterr().err


def test_eval_command_prints_tables(tmp_path, capsys):
    store = tmp_path / "s"
    assert main(["eval", "--model", "tiny-pixart", "--policies", "fora", "--steps", "6", "--seeds", "1",
                 "--prompts", "builtin:2", "--repeats", "1", "--warmup", "0", "--store", str(store),
                 "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tiny-pixart" in out and "| fora | policy | 6 |" in out and "| 3 steps | fewer-steps |" in out
    assert len(ResultStore(store).keys("config")) == 5  # baseline, fora, 4, 3 and 2 steps
