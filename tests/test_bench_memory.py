"""``benchmarks/bench_memory.py --device cpu --tiny``: the tiny long-sequence Wan runs with and without ``memory:``,
the result files are written, and the measured peak drops (the GPU run measures the Wan2.1-1.3B shape)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"


def test_tiny_cpu_run_writes_results_and_measures_a_lower_peak(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    payload = module.main(["--device", "cpu", "--tiny", "--warmup", "0", "--rounds", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "memory_wan_1_3b_cpu_tiny.json").read_text())
    assert written["rows"] == json.loads(json.dumps(payload["rows"]))
    md = (tmp_path / "memory_wan_1_3b_cpu_tiny.md").read_text()
    assert "torch:" in md and "command:" in md and "| eager, memory.slice_tokens=512 |" in md
    base, sliced = payload["rows"]
    assert base["slice_tokens"] is None and sliced["slice_tokens"] == 512 and payload["tokens"] == 2048
    assert sliced["peak_activation_mib"] <= 0.7 * base["peak_activation_mib"], payload["rows"]
    assert sliced["rel_l2_vs_unsliced"] < 1e-5
