"""The runtime: a small core per transformer and the features that plug into it (see ``core`` and ``feature``)."""

from .attention import AttentionFeature
from .cache import CacheFeature
from .compile import CompileFeature
from .core import Runtime
from .feature import Call, Feature, Host
from .guidance import GuidanceFeature
from .quant import QuantFeature

__all__ = ["AttentionFeature", "CacheFeature", "Call", "CompileFeature", "Feature", "GuidanceFeature", "Host",
           "QuantFeature",
           "Runtime"]
