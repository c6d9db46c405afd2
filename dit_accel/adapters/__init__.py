"""Model adapters: one description per transformer family (see ``base.ModelAdapter``)."""

from .base import (ADAPTERS, REFUSED, TRANSFORMER_COMPONENTS, BlockInfo, ModelAdapter, TokenLayout, get_adapter,
                   register_adapter, supported_classes)
from .families import TIER1
from . import image, video  # noqa: F401,E402  (register the coverage families' adapters)

__all__ = ["ADAPTERS", "REFUSED", "TRANSFORMER_COMPONENTS", "BlockInfo", "ModelAdapter", "TIER1", "TokenLayout",
           "get_adapter", "register_adapter", "supported_classes"]
