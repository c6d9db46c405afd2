"""``benchmarks/bench_quant_attention.py --quick``: every variant runs on the CPU (interpreted kernels),
the accuracy columns are filled and within bounds, and the result files are written. No timing
assertion: only what ran and how accurate it was."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from helpers import interpreter_ready

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quant_attention.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not interpreter_ready():
        pytest.skip("needs triton imported with TRITON_INTERPRET=1 on the CPU")
    pytest.importorskip("torchao")
    spec = importlib.util.spec_from_file_location("bench_quant_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("quant_bench")
    argv = sys.argv
    sys.argv = ["bench_quant_attention.py", "--quick"]
    try:
        module.main(["--quick", "--out", str(out)])
    finally:
        sys.argv = argv
    return json.loads((out / "quant_attention_quick.json").read_text()), out


def test_attention_variants_run_and_are_accurate(quick):
    payload, out = quick
    dense = next(r for r in payload["rows"] if r["kind"] == "dense")
    sparse = next(r for r in payload["rows"] if r["kind"] == "sparse")
    assert not dense["errors"] and not sparse["errors"]
    bounds = {"int8": 0.02, "int8_pv8": 0.05, "fp8": 0.07}
    for name, bound in bounds.items():
        assert 0 < dense[name]["rel_l1_vs_cudnn"] < bound, (name, dense[name])
    assert 0 < sparse["sparse_int8"]["rel_l1_vs_bsa_bf16"] < 0.02
    assert 0 < sparse["sparse_int8_pv8"]["rel_l1_vs_bsa_bf16"] < 0.05
    md = (out / "quant_attention_quick.md").read_text()
    assert "| 136 | 1 | dense | int8 |" in md and payload["environment"]["command"].endswith("--quick")


def test_flux_variants_route_attention_and_quantize_linears(quick):
    payload, _ = quick
    flux = next(r for r in payload["rows"] if r["kind"] == "flux")["variants"]
    assert set(flux) == {"bf16", "int8_attn", "int8wo_linear", "int8wo_linear+int8_attn"}
    assert all("error" not in v for v in flux.values()), flux
    # Each quantized variant changes the output a little (so it really ran), none breaks it.
    for name in ("int8_attn", "int8wo_linear", "int8wo_linear+int8_attn"):
        assert 0 < flux[name]["rel_l1_vs_bf16"] < 0.05, (name, flux[name])
