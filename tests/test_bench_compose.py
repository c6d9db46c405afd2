"""``benchmarks/bench_compose.py --quick``: the composition benchmark's logic on CPU (tiny FLUX config, the
eager backend): every variant that runs here runs, compiled blocks are gated (FORA enters compiled code only
for the steps it computes), and the result files are written. No wall-clock assertion."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compose.py"


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_compose", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_compose", module)  # its dataclass resolves annotations there
    spec.loader.exec_module(module)
    return module


def test_quick_run_counts_compiled_region_entries(tmp_path, monkeypatch):
    module = load_bench(monkeypatch)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert module.main(["--quick", "--rounds", "1"]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "compose_flux_quick.json").read_text())["rows"]}
    assert {"baseline eager", "baseline compiled", "dit_accel fora3 compiled"} <= set(rows)
    assert all("error" not in r for r in rows.values() if r["variant"] != "cache-dit"), rows
    blocks, steps = 6, 6  # the quick config: 2 + 4 blocks, 6 steps; FORA interval 3 computes steps 0 and 3
    assert rows["baseline compiled"]["compiled_region_entries"] == blocks * steps
    assert rows["dit_accel fora3 compiled"]["compiled_region_entries"] == blocks * 2
    assert rows["dit_accel fora3 compiled"]["recompiles"] == 0
    assert "| dit_accel fora3 compiled |" in (tmp_path / "compose_flux_quick.md").read_text()


def test_quick_wan_run_composes_sparse_attention_with_compiled_blocks(tmp_path, monkeypatch):
    """The Wan variants: sparse attention + FORA compile with no graph break (the routed attention is one custom
    op in the block's graph) and give the same latents as eager."""
    module = load_bench(monkeypatch)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert module.main(["--quick", "--model", "wan", "--rounds", "1", "--only",
                        "baseline eager,dit_accel sparse25 + fora2 eager,dit_accel sparse25 + fora2 compiled"]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "compose_wan_quick.json").read_text())["rows"]}
    assert set(rows) == {"baseline eager", "dit_accel sparse25 + fora2 eager", "dit_accel sparse25 + fora2 compiled"}
    assert all("error" not in r for r in rows.values()), rows
    eager, compiled = rows["dit_accel sparse25 + fora2 eager"], rows["dit_accel sparse25 + fora2 compiled"]
    assert compiled["graph_breaks"] == 0 and compiled["recompiles"] == 0
    assert abs(compiled["psnr_db"] - eager["psnr_db"]) < 1.0 and eager["saved_share"] == compiled["saved_share"] > 0
