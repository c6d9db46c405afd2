"""Shared helpers for the GPU benchmarks: environment record, CUDA-event timing, result files."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch


def environment() -> dict:
    """GPU, library versions and the command line, written beside every result."""
    try:  # the kernel benchmarks do not need diffusers (and a bare GPU image may lack it)
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers_version,
           "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), written beside CPU results."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_call(fn: Callable[[], object], reps: int = 1) -> float:
    """Milliseconds per call over ``reps`` back-to-back calls, timed with CUDA events (host clock on CPU)."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    import time

    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def reps_for(fn: Callable[[], object], min_ms: float) -> int:
    """Back-to-back calls per timed sample so that a sample lasts at least ``min_ms`` (1 when 0):
    single short calls measure launch gaps and clock ramps as much as the kernel."""
    return max(1, math.ceil(min_ms / max(time_call(fn), 1e-3))) if min_ms > 0 else 1


def autotuned_tile(kernel) -> str | None:
    """The config a ``triton.autotune``-d kernel ran with last, as "BLOCK_MxBLOCK_N wW sS" (None if it
    has not run). The autotuner's choice can differ between runs when clocks vary (power cap), so
    results record it."""
    cfg = getattr(kernel, "best_config", None)
    if cfg is None:
        return None
    return f"{cfg.kwargs.get('BLOCK_M')}x{cfg.kwargs.get('BLOCK_N')} w{cfg.num_warps} s{cfg.num_stages}"


def median_spread(values: list[float]) -> tuple[float, float]:
    """Median and half the min-max range, in the units given."""
    return statistics.median(values), (max(values) - min(values)) / 2


def write_results(name: str, payload: dict, markdown: str) -> None:
    """Write ``name``.json and ``name``.md under $OUT (device runs) or benchmarks/results/."""
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
