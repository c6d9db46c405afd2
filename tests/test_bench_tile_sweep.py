"""``benchmarks/bench_tile_sweep.py --quick``: every pinned tile of both kernels runs under the Triton
interpreter, the tiles agree with one another (and with SDPA when dense), a tile that does not divide
the table is reported as skipped, and the result files are written. No timing assertion."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from helpers import interpreter_ready

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tile_sweep.py"


def _load():
    sys.path.insert(0, str(BENCH.parent))   # the script imports its sibling modules
    spec = importlib.util.spec_from_file_location("bench_tile_sweep", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not interpreter_ready():
        pytest.skip("needs triton imported with TRITON_INTERPRET=1 on the CPU")
    out = tmp_path_factory.mktemp("tile_sweep")
    payload = _load().main(["--quick", "--tiles", "16,16,4,1", "32,32,4,1", "64,64,4,1", "--out", str(out)])
    return payload, out


def test_every_fitting_tile_runs_and_agrees(quick):
    payload, out = quick
    rows = [r for r in payload["rows"] if r["kernel"] != "dense"]
    assert {r["kernel"] for r in rows} == {"bsa", "int8_pv8"}
    assert {r["density"] for r in rows} == {1.0, 0.5}
    for r in rows:
        if r["cfg"] and r["cfg"][0] == 64:       # 64-row tile, 32-token table blocks: does not fit
            assert "divid" in r["skipped"], r
            continue
        assert "error" not in r and "skipped" not in r, r
        assert r["ms"] > 0 and r["useful_tflops"] > 0
        bound = 1e-3 if r["kernel"] == "bsa" else 0.05   # accumulation order; FP8 P rounding per tile
        assert r["maxdiff_vs_first"] < bound, r
        if r["kernel"] == "bsa" and r["density"] == 1.0:
            assert r["maxdiff_vs_dense"] < 2e-2, r
    assert sum(1 for r in rows if r["tile"].startswith("autotuned")) == 4   # the public call, per kernel x density
    saved = json.loads((out / "tile_sweep_quick.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert "## bsa" in (out / "tile_sweep_quick.md").read_text()


def test_tile_lists_expand():
    module = _load()
    from dit_accel.kernels._block_sparse_triton import hopper_configs

    space = module.expand_tiles(["space"], "bsa")
    assert len(space) == len(hopper_configs()) and (64, 128, 4, 1) in space
    assert module.expand_tiles(["64,128,4,1,168", "maxnreg"], "bsa")[0] == (64, 128, 4, 1, 168)
    assert len(module.expand_tiles(["64,128,4,1,168", "maxnreg"], "bsa")) == 3   # no repeats
    assert (128, 64, 8, 3) in module.expand_tiles(["space"], "int8")
    with pytest.raises(SystemExit):
        module.expand_tiles(["64,64"], "bsa")
