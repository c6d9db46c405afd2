"""Caching and sparsity decision policies, one module per algorithm.

``METHODS`` maps the ``cache.method`` name used in policies/YAML to ``module:Class`` of its
implementation (imported on first use); ``ALIASES`` maps convenience names to
(method, defaults).
"""

from __future__ import annotations

import importlib
import importlib.util

from ..config import PolicyError
from .base import BlockCall, BranchState, CacheMethod, CachePlan

METHODS: dict[str, str] = {
    "dbcache": "dbcache:DBCache",
    "fora": "fora:FORA",
    "teacache": "teacache:TeaCache",
    "magcache": "magcache:MagCache",
    "taylorseer": "taylorseer:TaylorSeer",
    "cg_taylor": "cg_taylor:CGTaylor",
    "delta_dit": "delta_dit:DeltaDiT",
    "bac": "bac:BAC",
    "ertacache": "ertacache:ERTACache",
    "profiling_dit": "profiling_dit:ProfilingDiT",
    "_record": "..calibrate:Recorder",  # internal: used by dit_accel.calibrate
}
ALIASES: dict[str, tuple[str, dict]] = {"fbcache": ("dbcache", {"fn_compute": 1, "bn_compute": 0})}


def _module(name: str) -> str:
    module = METHODS[name].split(":")[0]
    return f"dit_accel.{module[2:]}" if module.startswith("..") else f"{__name__}.{module}"


def method_names() -> list[str]:
    """Names of the user-facing caching methods whose module is installed."""
    return [name for name in METHODS if not name.startswith("_") and importlib.util.find_spec(_module(name))]


def get_method(name: str) -> type[CacheMethod]:
    """The class implementing caching method ``name``."""
    if name not in method_names() and not (name.startswith("_") and name in METHODS):
        raise PolicyError(f"cache.method: {name!r} is not a known caching method; choose one of "
                          f"{sorted([*method_names(), *ALIASES])}")
    return getattr(importlib.import_module(_module(name)), METHODS[name].split(":")[1])


__all__ = ["ALIASES", "METHODS", "BlockCall", "BranchState", "CacheMethod", "CachePlan", "get_method",
           "method_names"]
