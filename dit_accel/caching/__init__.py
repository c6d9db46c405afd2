"""Caching (and guidance) methods: one module each — config, typed state, method — registered once.

``@register_cache_method(name, Config)`` (see :mod:`dit_accel.caching.base`) is the one declaration a
method makes; the built-in modules of this package are found without a list. Third-party methods
register the same way when their module is imported.
"""

from .base import (BlockCall, CacheConfig, CacheMethod, CachePlan, CacheState, Residual,
                   alias_names, cache_config_from_dict, get_method, method_for, method_names, register_alias,
                   register_cache_method, register_guidance_method)
from .records import Records

__all__ = ["BlockCall", "CacheConfig", "CacheMethod", "CachePlan", "CacheState", "Records",
           "Residual", "alias_names", "cache_config_from_dict", "get_method", "method_for", "method_names",
           "register_alias", "register_cache_method", "register_guidance_method"]
