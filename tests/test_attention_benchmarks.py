"""The sparse-attention benchmark scripts run end to end in --quick mode (CPU smoke test)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, stem", [("bench_sparse_accuracy", "sparse_accuracy_quick"),
                                          ("bench_sparse_wan", "sparse_wan_1_3b_quick")])
def test_quick_mode_writes_json_and_markdown(script, stem, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))  # restored after the test (the scripts set OUT from --out)
    argv = ["--quick", "--out", str(tmp_path)]
    if script == "bench_sparse_wan":
        argv += ["--variants", "topp,svg2", "--densities", "0.25"]
    _load(script).main(argv)
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    assert payload["rows"] and "date" in payload["environment"] and "command" in payload["environment"]
    assert (tmp_path / f"{stem}.md").read_text().startswith("# ")
    if script == "bench_sparse_accuracy":
        rows = payload["rows"]
        at = lambda r, d: next(x["rel_l2"] for x in rows if (x["method"], x["reorder"], x["compensate"],  # noqa: E731
                                                              x["density"]) == ("xattention", r, False, d))
        assert at("paro", 0.25) < at("none", 0.25)
    else:
        assert all(r["used_density"] <= 1.0 for r in payload["rows"])


def test_autotuned_tile_names_the_config_a_kernel_last_ran_with():
    triton = pytest.importorskip("triton")
    autotuned_tile = _load("common").autotuned_tile

    class Tuned:
        best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=1)

    assert autotuned_tile(Tuned()) == "64x128 w4 s1"
    assert autotuned_tile(None) is None and autotuned_tile(object()) is None  # not autotuned / not run yet
