"""Calibration tensors beside a policy's YAML: ``NAME.safetensors`` next to ``NAME.yaml``.

Calibrated policies carry long numeric fields (MagCache's ratio curves, ERTACache's per-step
scale/shift/step-size tables, BAC's per-block schedules, ProfilingDiT's block entropies...). When
a policy is saved, every list of numbers with at least ``SIDECAR_MIN_ELEMENTS`` elements (at any
depth of a section, e.g. ``cache.mag_ratios.cond``) moves into one safetensors file beside the
YAML — float64 for floats, int64 for integers, so loading gives back exactly the saved numbers —
and the YAML keeps a reference in its place::

    sidecar: flux_magcache.safetensors        # beside the YAML; named after it
    cache:
      method: magcache
      mag_ratios:
        cond: {$sidecar: cache.mag_ratios.cond}

A list of numeric lists (BAC's per-block compute steps) with as many numbers in all moves as one
tensor: 2-D when its rows are equally long, else the concatenated values plus ``NAME.offsets``
(marked ``$ragged: true``). Short lists (TeaCache's five coefficients), strings and flags stay
inline, so the YAML still reads as a recipe. ``load`` resolves the references; a missing sidecar file, or a reference the file does
not hold, is a :class:`~dit_accel.config.PolicyError` that names both files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import PolicyError

SIDECAR_MIN_ELEMENTS = 16
SIDECAR_KEY = "sidecar"
MARKER = "$sidecar"
RAGGED = "$ragged"
FORMAT = "dit_accel.policy-sidecar/1"


def _numeric_list(value: Any) -> str | None:
    """'int64' / 'float64' for a non-empty flat list of numbers (bools excluded), else None."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "int64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "float64"
    return None


def _rows(value: Any) -> str | None:
    """The common dtype of a non-empty list of numeric lists (empty rows allowed), else None."""
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        return None
    kinds = {_numeric_list(r) for r in value if r}
    if not kinds or None in kinds:
        return None
    return "float64" if "float64" in kinds else "int64"


def _is_marker(value: Any) -> bool:
    return isinstance(value, dict) and MARKER in value and set(value) <= {MARKER, RAGGED}


def split(data: dict, min_elements: int = SIDECAR_MIN_ELEMENTS) -> tuple[dict, dict[str, np.ndarray]]:
    """(``data`` with long numeric lists replaced by references, {reference: array}). Only the policy's
    sections (mappings) are searched; ``data`` itself is not modified."""
    tensors: dict[str, np.ndarray] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}") for k, v in value.items()}
        dtype = _numeric_list(value)
        if dtype is not None and len(value) >= min_elements:
            tensors[path] = np.asarray(value, dtype=dtype)
            return {MARKER: path}
        rows = _rows(value)
        if rows is not None and sum(len(r) for r in value) >= min_elements:
            if len({len(r) for r in value}) == 1:
                tensors[path] = np.asarray(value, dtype=rows)
                return {MARKER: path}
            tensors[path] = np.asarray([v for r in value for v in r], dtype=rows)
            tensors[f"{path}.offsets"] = np.cumsum([0] + [len(r) for r in value], dtype=np.int64)
            return {MARKER: path, RAGGED: True}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        return value

    out = {key: walk(value, key) if isinstance(value, dict) else value for key, value in data.items()}
    return out, tensors


def join(data: dict, tensors: dict[str, np.ndarray], where: str) -> dict:
    """``data`` with every ``{$sidecar: name}`` reference replaced by the list it names."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if _is_marker(value):
                name = value[MARKER]
                names = [name, f"{name}.offsets"] if value.get(RAGGED) else [name]
                missing = [n for n in names if n not in tensors]
                if missing:
                    raise PolicyError(f"{where} holds no tensor {missing[0]!r} (it holds {sorted(tensors)}); the YAML "
                                      "and its .safetensors file do not belong together — save the policy again")
                if value.get(RAGGED):
                    flat, offsets = tensors[name].tolist(), tensors[f"{name}.offsets"].tolist()
                    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
                return tensors[name].tolist()
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return {key: walk(value) for key, value in data.items()}


def has_references(data: Any) -> bool:
    if isinstance(data, dict):
        return _is_marker(data) or any(has_references(v) for v in data.values())
    if isinstance(data, list):
        return any(has_references(v) for v in data)
    return False


def sidecar_path(yaml_path: Path) -> Path:
    return yaml_path.with_suffix(".safetensors")


def save(data: dict, path: str | Path, inline: bool = False) -> Path | None:
    """Write the policy dict ``data`` as YAML at ``path``; long numeric lists go to ``NAME.safetensors``
    beside it (unless ``inline``). Returns the sidecar's path, or None when everything is inline (a
    stale sidecar of an earlier save is removed then)."""
    import yaml
    from safetensors.numpy import save_file

    path = Path(path)
    side = sidecar_path(path)
    body, tensors = ({**data}, {}) if inline else split(data)
    if tensors:
        if side == path:
            raise PolicyError(f"cannot put calibration tensors beside {str(path)!r}: give the policy file a .yaml "
                              "suffix (or save with inline=True)")
        save_file(tensors, str(side), metadata={"format": FORMAT, "policy": str(data.get("name", ""))})
        body = {SIDECAR_KEY: side.name, **body}
    elif side.exists() and side != path:
        side.unlink()
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return side if tensors else None


def load(data: dict, path: str | Path) -> dict:
    """Resolve a loaded YAML dict: read its sidecar (relative to the YAML's folder) into the references."""
    path = Path(path)
    if not isinstance(data, dict):
        return data
    name = data.get(SIDECAR_KEY)
    if name is None:
        if has_references(data):
            raise PolicyError(f"policy file {str(path)!r} refers to sidecar tensors but names no '{SIDECAR_KEY}' file")
        return data
    data = {k: v for k, v in data.items() if k != SIDECAR_KEY}
    if not isinstance(name, str) or not name:
        raise PolicyError(f"policy file {str(path)!r}: '{SIDECAR_KEY}' must be a file name, got {name!r}")
    side = path.parent / name
    if not side.is_file():
        raise PolicyError(f"policy file {str(path)!r} keeps its calibration tensors in {str(side)!r}, which does "
                          "not exist; copy the .safetensors file beside the YAML (policy.save writes both)")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(side))
    except (SafetensorError, OSError) as err:
        raise PolicyError(f"sidecar {str(side)!r} of policy file {str(path)!r} is not a readable safetensors "
                          f"file: {err}") from None
    return join(data, tensors, f"sidecar {str(side)!r}")
