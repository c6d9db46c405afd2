"""``dit_accel.zoo`` imported by path, for the scripts in this folder: training, sampling and FID need
only the zoo (torch, diffusers, transformers, safetensors), not the rest of ``dit_accel``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "_dit_accel_zoo"


def import_zoo():
    """The zoo package, loaded once from ``REPO/dit_accel/zoo`` and registered in ``sys.modules``
    (so that worker processes can unpickle its functions)."""
    if NAME not in sys.modules:
        zoo_dir = REPO / "dit_accel" / "zoo"
        spec = importlib.util.spec_from_file_location(NAME, zoo_dir / "__init__.py",
                                                      submodule_search_locations=[str(zoo_dir)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = mod
        spec.loader.exec_module(mod)
    return sys.modules[NAME]
