"""``py:`` references: how a sweep file names user code (a model factory, a feature network, a backbone).

``py:package.module:attr`` imports a module; ``py:path/to/file.py:attr`` loads a file (relative paths are
tried against the working directory first, then against ``base_dir``, usually the sweep file's folder).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

PREFIX = "py:"


def is_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def resolve(ref: str, base_dir: str | Path | None = None) -> Any:
    """The object named by ``py:MODULE_OR_FILE:ATTR`` (``ATTR`` may be dotted)."""
    if not is_ref(ref):
        raise ValueError(f"{ref!r} is not a python reference (expected 'py:module:attr' or 'py:file.py:attr')")
    target, sep, attr = ref[len(PREFIX):].rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"{ref!r}: expected 'py:module:attr' or 'py:path/to/file.py:attr'")
    if target.endswith(".py"):
        module = _load_file(target, base_dir)
    else:
        module = importlib.import_module(target)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{ref!r}: {target} has no attribute {attr!r}") from None
    return obj


def _load_file(target: str, base_dir: str | Path | None) -> Any:
    candidates = [Path(target)]
    if base_dir is not None and not Path(target).is_absolute():
        candidates.append(Path(base_dir) / target)
    path = next((p.resolve() for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"python file {target!r} not found (looked in {', '.join(map(str, candidates))})")
    name = "_dit_accel_ref_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
