"""``benchmarks/bench_compose.py --quick``: the composition benchmark's logic on CPU (tiny FLUX config, the
eager backend): every variant that runs here runs, compiled blocks are gated (FORA enters compiled code only
for the steps it computes), and the result files are written. No wall-clock assertion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compose.py"


def test_quick_run_counts_compiled_region_entries(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_compose", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
