"""Caching and sparsity decision policies, one module per algorithm.

``METHODS`` maps the ``cache.method`` name used in policies/YAML to ``module:Class`` of its
implementation (imported on first use); ``ALIASES`` maps convenience names to
(method, defaults).
"""

from __future__ import annotations

import importlib

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
}
ALIASES: dict[str, tuple[str, dict]] = {"fbcache": ("dbcache", {"fn_compute": 1, "bn_compute": 0})}


def method_names() -> list[str]:
    """Names of the caching methods whose module is installed."""
    return [name for name in METHODS if importlib.util.find_spec(f"{__name__}.{METHODS[name].split(':')[0]}")]


def get_method(name: str) -> type[CacheMethod]:
    """The class implementing caching method ``name``."""
    if name not in method_names():
        raise PolicyError(f"cache.method: {name!r} is not a known caching method; choose one of "
                          f"{sorted([*method_names(), *ALIASES])}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["ALIASES", "METHODS", "BlockCall", "BranchState", "CacheMethod", "CachePlan", "get_method",
           "method_names"]
