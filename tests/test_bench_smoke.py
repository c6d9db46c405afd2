"""``benchmarks/bench_cache_peers.py --quick``: every variant runs on CPU, ours and each peer do the
same measured work, and the result files are written (no wall-clock assertion: only the counts)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cache_peers.py"


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_cache_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("peers")
    argv = sys.argv
    sys.argv = ["bench_cache_peers.py", "--quick"]  # what the result records as its command
    try:
        payload = module.main(["--quick", "--repeats", "1", "--out", str(out), "--profile", "^baseline$|fora N=3 F1$"])
    finally:
        sys.argv = argv
    return payload, out


def test_quick_run_writes_json_and_markdown(quick_result):
    payload, out = quick_result
    assert json.loads((out / "cache_peers_quick.json").read_text())["rows"] == json.loads(json.dumps(payload["rows"]))
    md = (out / "cache_peers_quick.md").read_text()
    assert "Overhead per step, ours vs. each peer" in md and "diffusers" in payload["env"]
    assert payload["args"]["steps"] == 7 and payload["env"]["command"].endswith("--quick")


def test_profile_rows_say_where_host_time_goes(quick_result):
    payload, out = quick_result
    profiles = payload["profiles"]
    assert set(profiles) == {"baseline", "dit_accel fora N=3 F1"}
    base, ours = profiles["baseline"], profiles["dit_accel fora N=3 F1"]
    for p in (base, ours):
        assert p["host_ms_per_step"] > 0 and p["kernels"] == 0  # CPU: no CUDA kernels, all host time
        assert p["top_host_ops"] and all(op["calls"] > 0 for op in p["top_host_ops"])
    base_mm = sum(op["calls"] for op in base["top_host_ops"] if op["name"] == "aten::addmm")
    ours_mm = sum(op["calls"] for op in ours["top_host_ops"] if op["name"] == "aten::addmm")
    assert 0 < ours_mm < base_mm  # FORA skips most blocks on 2 of 3 steps: fewer matmuls in the profile
    assert "## Profiles" in (out / "cache_peers_quick.md").read_text()


def test_every_variant_runs_its_fixed_schedule(quick_result):
    rows = {r["variant"]: r for r in quick_result[0]["rows"]}
    cache_dit_installed = importlib.util.find_spec("cache_dit") is not None
    for name, row in rows.items():
        if name.startswith("cache-dit") and not cache_dit_installed:
            assert row["skipped"].startswith("skipped: cache-dit not importable")
            continue
        assert row["skipped"] is None, (name, row["skipped"])
        assert row["ms_per_step"] > 0
        if name == "baseline":
            assert row["compute_share"] == 1.0 and row["rel_l2_vs_baseline"] == 0.0
        else:  # the schedule really skipped work and changed the output
            assert 0.3 < row["compute_share"] < 0.8 and row["rel_l2_vs_baseline"] > 0, (name, row)
    # 7 steps, 1 step in 3 computed (0, 3, 6): 3 of 7 block evaluations for whole-stack schedules
    for name in ("dit_accel fora N=3", "dit_accel taylorseer N=3 O1", "dit_accel bac", "dit_accel ertacache",
                 "dit_accel ertacache static",
                 "dit_accel teacache gate", "diffusers TaylorSeerCache N=3 (blocks)"):
        assert rows[name]["block_share"] == pytest.approx(3 / 7), name


def test_ours_and_each_peer_do_the_same_work(quick_result):
    pairs = quick_result[0]["pairs"]
    names = {p["peer"] for p in pairs}
    assert {"diffusers FirstBlockCache", "diffusers TaylorSeerCache N=3 (blocks)", "diffusers MagCache K=2"} <= names
    measured = [p for p in pairs if "ours_minus_peer" in p and p["same_work"]]
    assert len(measured) >= 3
    for p in measured:
        assert p["peer_share"] == pytest.approx(p["ours_share"]), p
