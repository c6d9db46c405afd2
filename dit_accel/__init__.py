"""dit_accel: training-free acceleration of diffusion transformers in HuggingFace diffusers.

    import dit_accel
    dit_accel.accelerate(pipe, "fbcache")
    image = pipe("a cat").images[0]
    print(dit_accel.stats(pipe))
    dit_accel.remove(pipe)

Sub-packages load on first use: ``dit_accel.zoo`` (trained reference models), ``dit_accel.eval``
(metrics, sweeps, reports), ``dit_accel.attention``, ``dit_accel.quant``, ``dit_accel.kernels``,
``dit_accel.testing`` (tiny offline pipelines).
"""

import importlib as _importlib

from .api import accelerate, accelerated, inspect, is_accelerated, policy_of, remove, reset, stats
from .calibrate import calibrate
from .config import PolicyError
from .policy import Policy, load_policy, preset_names
from .stats import Stats

__version__ = "0.1.0"

__all__ = ["Policy", "PolicyError", "Stats", "accelerate", "accelerated", "calibrate", "inspect", "is_accelerated",
           "load_policy",
           "policy_of", "preset_names", "remove", "reset", "stats", "__version__"]

_SUBPACKAGES = ("zoo", "eval", "attention", "quant", "kernels", "testing")


def __getattr__(name: str):
    """``dit_accel.zoo`` etc. without an explicit import (loaded on first access)."""
    if name in _SUBPACKAGES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dit_accel' has no attribute {name!r}")
