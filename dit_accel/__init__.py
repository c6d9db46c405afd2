"""dit_accel: training-free acceleration of diffusion transformers in HuggingFace diffusers.

    import dit_accel
    dit_accel.accelerate(pipe, "fbcache")
    image = pipe("a cat").images[0]
    print(dit_accel.stats(pipe))
    dit_accel.remove(pipe)

Everything loads on first use, so ``import dit_accel`` (and ``dit-accel --help``) imports no torch: the API
below from its modules, and the sub-packages ``dit_accel.zoo`` (trained reference models),
``dit_accel.eval`` (metrics, sweeps, reports), ``dit_accel.attention``, ``dit_accel.quant``,
``dit_accel.kernels``, ``dit_accel.testing`` (tiny offline pipelines) etc. Log messages: ``dit_accel.logging``
(``set_verbosity_info()`` / ``_warning()`` / ``_error()``, or ``$DIT_ACCEL_VERBOSITY``; default warning).
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

from . import logging as _logging  # noqa: E402  (stdlib logging only: sets the dit_accel logger's level)

_logging.get_logger()

# public name -> the module that defines it (imported on first access)
_EXPORTS = {
    **dict.fromkeys(("accelerate", "accelerated", "inspect", "is_accelerated", "policy_of", "remove", "reset",
                     "stats"), ".api"),
    "calibrate": ".calibration",
    "PolicyError": ".config",
    **dict.fromkeys(("Policy", "load_policy", "preset_names"), ".policy"),
    "Stats": ".stats",
    "tune": ".eval.tune",
    "bottleneck_sample": ".sampling",
}

__all__ = ["Policy", "PolicyError", "Stats", "accelerate", "accelerated", "calibrate", "inspect", "is_accelerated",
           "load_policy",
           "policy_of", "preset_names", "remove", "reset", "stats", "tune", "bottleneck_sample", "__version__"]

_SUBPACKAGES = ("logging", "zoo", "eval", "attention", "quant", "kernels", "testing", "caching", "calibration",
                "runtime", "sampling")


def __getattr__(name: str):
    """The API and the sub-modules (``dit_accel.zoo`` etc.) without an explicit import (loaded on first access)."""
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'dit_accel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})


class _Package(_types.ModuleType):
    """Importing the sub-module ``dit_accel.stats`` binds it on the package; ``dit_accel.stats`` stays the
    function (as when the API was imported eagerly), the module is ``sys.modules["dit_accel.stats"]``."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
