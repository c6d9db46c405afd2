"""The sweep runner: same seeds, baseline reuse, resume after a kill, sharding over two processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dit_accel.eval.models import load_model
from dit_accel.eval.runner import run_sweep
from dit_accel.eval.store import ResultStore
from dit_accel.eval.sweep import ModelSpec, SweepSpec, Variant, generation_key

REPO = Path(__file__).resolve().parents[1]

SMALL = {"name": "small", "models": ["tiny-dit"], "policies": ["none", "fora"], "steps": [6, 3], "seeds": [0, 1],
         "classes": 2, "fewer_steps": [2], "timing": {"warmup": 0, "repeats": 1}, "device": "cpu",
         "metrics": ["psnr", "rel_l2", "ssim", "lpips", "fid"],
         "lpips": {"backbone": "py:dit_accel.eval.testing:tiny_backbone"},
         "fid": {"feature": "py:dit_accel.eval.testing:tiny_feature_net"}}

# long enough that a kill lands mid-run: 3 models x 8 configurations x 6 (seed, condition) pairs
KILL = {"name": "kill", "models": ["tiny-dit", "tiny-flux", "tiny-sd3"], "policies": ["fora", {"policy": "fbcache",
        "grid": {"threshold": [0.05, 0.3]}}], "steps": [6], "seeds": 3, "prompts": "builtin:2", "classes": 2,
        "timing": {"warmup": 0, "repeats": 1}, "device": "cpu", "metrics": ["psnr", "rel_l2"]}


def _lines(store: Path) -> list[dict]:
    rows = []
    for path in sorted((store / "rows").glob("*.jsonl")):
        for raw in path.read_bytes().splitlines(keepends=True):
            if raw.endswith(b"\n"):
                try:
                    rows.append(json.loads(raw))
                except ValueError:
                    pass
    return rows


def _comparable(store: Path, table: str, fields: tuple[str, ...]) -> dict:
    return {r["key"]: tuple(r.get(f) for f in fields) for r in ResultStore(store).rows(table)}


def test_small_sweep_reuses_baselines_and_resumes(tmp_path):
    spec = SweepSpec.from_dict(SMALL)
    first = run_sweep(spec, tmp_path, progress=False)
    # per (seed, class): baseline 6, none 6, fora 6, baseline 3 (= fewer-steps of 6), none 3, fora 3, 2 steps
    # ("none" generations differ from the baseline's: hooks attached)
    assert first.generated == 4 * 7
    assert first.samples == 4 * 8 and first.configs == 8
    again = run_sweep(spec, tmp_path, progress=False)
    assert (again.generated, again.samples, again.configs) == (0, 0, 0)
    assert (again.samples_skipped, again.configs_skipped) == (32, 8)

    store = ResultStore(tmp_path)
    samples = store.rows("sample")
    none = [r for r in samples if r["variant"] == "none"]
    assert all(r["psnr"] == math.inf and r["lpips"] == 0 for r in none)  # hooks alone are bit-exact
    fora = [r for r in samples if r["variant"] == "fora" and r["steps"] == 6]
    assert all(math.isfinite(r["psnr"]) and r["blocks_computed_share"] < 1 for r in fora)
    fewer = {(r["steps"], r["ref_steps"]) for r in samples if r["kind"] == "fewer-steps"}
    assert sorted(fewer) == [(2, 3), (3, 6)]

    # the stored baseline is what the pipeline gives for that seed, and the same seed drives every variant
    model = load_model("tiny-dit", device="cpu")
    for seed, cls in [(0, 0), (1, 1)]:
        key = generation_key(ModelSpec("tiny-dit"), Variant("baseline", "baseline", 6, 6), seed, cls)
        assert torch.equal(store.load_output(key)["output"], model.generate(cls, seed, 6).float())

    configs = store.rows("config")
    assert {r["kind"] for r in configs} == {"baseline", "policy", "fewer-steps"}
    base = next(r for r in configs if r["kind"] == "baseline" and r["steps"] == 6)
    assert base["speedup"] == 1.0 and base["n_samples"] == 4 and base["fid"] == pytest.approx(0, abs=1e-9)
    assert all(r["e2e_ms"] > 0 and r["transformer_ms_per_step"] > 0 for r in configs)
    f = [r for r in configs if r["variant"] == "fora"]
    assert all(r["blocks_computed_share"] < 1 and r["fid"] > 0 for r in f)


def test_max_samples_stops_and_continues(tmp_path):
    spec = SweepSpec.from_dict({**SMALL, "metrics": ["psnr"], "steps": [4], "policies": ["fora"]})
    part = run_sweep(spec, tmp_path, progress=False, max_samples=3)
    assert part.stopped_early and part.samples == 3 and part.configs == 0
    rest = run_sweep(spec, tmp_path, progress=False)
    # 4 (seed, class) pairs x (baseline, fora, 2 steps)
    assert rest.samples_skipped == 3 and rest.samples == 4 * 3 - 3 and rest.configs == 3


@pytest.fixture(scope="module")
def kill_spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    path = root / "kill.yaml"
    path.write_text(yaml.safe_dump(KILL))
    reference = root / "reference"
    run_sweep(SweepSpec.from_yaml(path), reference, progress=False)
    return path, reference


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dit_accel.cli", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_sweep_killed_halfway_resumes_with_nothing_lost_or_duplicated(kill_spec, tmp_path):
    path, reference = kill_spec
    total = len(ResultStore(reference).keys("sample"))
    store = tmp_path / "store"
    proc = subprocess.Popen(_cli("sweep", str(path), "--store", str(store), "--no-progress"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len([r for r in _lines(store) if r["table"] == "sample"]) >= 10:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = {r["key"]: r for r in _lines(store)}
    assert 10 <= len(before) < total  # killed halfway
    assert not any(r["table"] == "config" for r in before.values())

    resumed = subprocess.run(_cli("sweep", str(path), "--store", str(store), "--no-progress"), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(before)} already stored" in resumed.stdout
    rows = _lines(store)
    keys = [(r["table"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing duplicated
    after = ResultStore(store)
    assert all(after.get("sample", k) == r for k, r in before.items())  # nothing lost or rewritten
    fields = ("variant", "seed", "condition", "psnr", "rel_l2", "blocks_computed_share")
    assert _comparable(store, "sample", fields) == _comparable(reference, "sample", fields)
    assert after.keys("config") == ResultStore(reference).keys("config")


def _torchrun_sweep(path, store) -> list:
    """``dit-accel sweep`` under torchrun, two CPU processes; the store's row files."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dit_accel.cli", "sweep", str(path), "--store", str(store), "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted((store / "rows").glob("*.jsonl"))


def test_two_processes_shard_the_work_into_one_store(kill_spec, tmp_path):
    path, reference = kill_spec
    store = tmp_path / "store"
    shards = _torchrun_sweep(path, store)
    assert [p.name.rsplit("-", 1)[1] for p in shards] == ["r0.jsonl", "r1.jsonl"]
    per_shard = [{json.loads(line)["key"] for line in p.read_text().splitlines()} for p in shards]
    assert per_shard[0] and per_shard[1] and not per_shard[0] & per_shard[1]  # split, no overlap
    fields = ("variant", "seed", "condition", "psnr", "rel_l2", "blocks_computed_share")
    assert _comparable(store, "sample", fields) == _comparable(reference, "sample", fields)
    merged = ResultStore(store)
    assert merged.keys("config") == ResultStore(reference).keys("config")
    assert {r["num_processes"] for r in merged.rows("config")} == {2}


CONTEXT_PARALLEL = {"name": "cp", "models": ["tiny-flux", "tiny-wan"], "policies": ["fora", "fbcache"], "steps": [4],
                    "seeds": 2, "prompts": "builtin:1", "fewer_steps": [2], "timing": {"warmup": 0, "repeats": 1},
                    "device": "cpu", "metrics": ["psnr", "rel_l2"]}


def test_context_parallel_sweep_spreads_each_generation_and_matches_one_process(tmp_path):
    reference = tmp_path / "reference"
    run_sweep(SweepSpec.from_dict(CONTEXT_PARALLEL), reference, progress=False)
    path = tmp_path / "cp.yaml"
    path.write_text(yaml.safe_dump({**CONTEXT_PARALLEL, "context_parallel": 2}))
    store = tmp_path / "store"
    shards = _torchrun_sweep(path, store)
    assert [p.name.rsplit("-", 1)[1] for p in shards] == ["r0.jsonl"]  # rank 0 writes everything
    ours, ref = ResultStore(store), ResultStore(reference)
    assert ours.keys("sample") == ref.keys("sample") and ours.keys("config") == ref.keys("config")
    for key in ref.keys("sample"):  # same decisions; outputs equal to float rounding of the split attention
        a, b = ours.get("sample", key), ref.get("sample", key)
        assert a["blocks_computed_share"] == b["blocks_computed_share"], key
        out_a = ours.load_output(a["generation_key"])["output"]
        out_b = ref.load_output(b["generation_key"])["output"]
        torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    assert all(r["num_processes"] == 2 and r["context_parallel"] == {"degree": 2, "components": ["transformer"]}
               for r in ours.rows("config"))
    assert all(r["context_parallel"] is None for r in ref.rows("config"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**CONTEXT_PARALLEL, "context_parallel": 2}))
    one = subprocess.run(_cli("sweep", str(bad), "--store", str(tmp_path / "one"), "--no-progress"), cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert one.returncode != 0 and "torchrun --nproc-per-node 2" in one.stderr
