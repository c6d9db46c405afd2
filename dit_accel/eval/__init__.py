"""Evaluation harness: metrics, sweeps, a resumable results store, Pareto reports (see README.md here).

    from dit_accel.eval import SweepSpec, run_sweep, write_report
    run_sweep("benchmarks/sweeps/tiny.yaml", "runs/tiny")
    write_report("runs/tiny")

Command line: ``dit-accel eval``, ``dit-accel sweep SPEC.yaml``, ``dit-accel report STORE``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"SweepSpec": "sweep", "run_sweep": "runner", "write_report": "report", "ResultStore": "store",
            "EvalModel": "models", "load_model": "models", "load_prompts": "prompts"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: importing dit_accel.eval pulls in neither pandas nor matplotlib
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
