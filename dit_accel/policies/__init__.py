"""Caching and sparsity decision policies, one module per algorithm.

``CACHE_METHODS`` maps the ``cache.method`` name used in policies/YAML to its implementation;
``ALIASES`` maps convenience names to (method, defaults).
"""

from __future__ import annotations

from .base import BranchState, CacheMethod, CachePlan
from .dbcache import DBCache, DBCacheConfig
from .fora import FORA, FORAConfig

CACHE_METHODS: dict[str, type[CacheMethod]] = {"dbcache": DBCache, "fora": FORA}
ALIASES: dict[str, tuple[str, dict]] = {"fbcache": ("dbcache", {"fn_compute": 1, "bn_compute": 0})}

__all__ = ["CACHE_METHODS", "ALIASES", "BranchState", "CacheMethod", "CachePlan", "DBCache", "DBCacheConfig",
           "FORA", "FORAConfig"]
