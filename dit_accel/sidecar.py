"""Calibration tensors beside a policy's YAML: ``NAME.yaml.safetensors`` next to ``NAME.yaml``.

Calibrated policies carry long numeric fields (MagCache's ratio curves, ERTACache's per-step
scale/shift/step-size tables, BAC's per-block schedules, ProfilingDiT's block entropies...). When
a policy is saved, every list of numbers with at least ``SIDECAR_MIN_ELEMENTS`` elements (at any
depth of a section, e.g. ``cache.mag_ratios.cond``) moves into one safetensors file beside the
YAML — float64 for floats, int64 for integers, so loading gives back exactly the saved numbers —
and the YAML keeps a reference in its place::

    sidecar: flux_magcache.yaml.safetensors   # beside the YAML; its full file name + .safetensors
    cache:
      method: magcache
      mag_ratios:
        cond: {$sidecar: cache.mag_ratios.cond}

A list of numeric lists (BAC's per-block compute steps) with as many numbers in all moves as one
tensor: 2-D when its rows are equally long, else the concatenated values plus ``NAME.offsets``
(marked ``$ragged: true``). Short lists (TeaCache's five coefficients), strings and flags stay
inline, so the YAML still reads as a recipe. ``load`` resolves the references; a missing sidecar file, or a
reference the file does
not hold, is a :class:`~dit_accel.config.PolicyError` that names both files.

Ownership. The sidecar's name is the YAML's whole file name plus ``.safetensors``, so ``p.yaml`` and
``p.yml`` never share one, and ``model.yaml`` never touches ``model.safetensors`` (model weights, say).
Every sidecar carries ``format: dit_accel.policy-sidecar/1`` in its safetensors metadata; ``save``
replaces or deletes an existing file only when its header carries that marker (only the header is
read), and otherwise raises a PolicyError before writing anything. Files written before this naming
(``p.safetensors``) still load: loading follows the YAML's ``sidecar:`` key.

Policy files are untrusted input. ``load_yaml`` reads at most ``MAX_POLICY_BYTES`` and refuses YAML
whose aliases expand to more than ``MAX_ALIAS_EXPANSION`` extra nodes ("billion laughs"), refer to
themselves, or nest deeper than ``MAX_DEPTH``. ``load`` reads only a plain ``.safetensors`` file name
in the YAML's own folder, only a file carrying the marker, and only the tensors referenced, each
checked against what its reference claims (float64/int64; 1-D, or 2-D for equal rows; ragged values
and offsets that partition them), ``MAX_SIDECAR_ELEMENTS`` numbers in all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import PolicyError

SIDECAR_MIN_ELEMENTS = 16
SIDECAR_KEY = "sidecar"
MARKER = "$sidecar"
RAGGED = "$ragged"
FORMAT = "dit_accel.policy-sidecar/1"
SUFFIX = ".safetensors"
MAX_POLICY_BYTES = 16 * 2 ** 20      # a policy YAML larger than this is refused unread
MAX_ALIAS_EXPANSION = 1_000_000      # nodes YAML aliases may add beyond the document's own
MAX_DEPTH = 64                       # nesting of mappings / lists in a policy YAML
MAX_SIDECAR_ELEMENTS = 4 * 2 ** 20   # numbers loaded from one sidecar (calibration tables are far smaller)
DTYPES = {"F64": "float64", "I64": "int64"}  # what split() writes
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "I16": "int16", "I8": "int8",
                "U8": "uint8", "BOOL": "bool", **DTYPES}


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
    """``NAME.yaml`` -> ``NAME.yaml.safetensors`` (distinct for every YAML file name)."""
    yaml_path = Path(yaml_path)
    return yaml_path.with_name(yaml_path.name + SUFFIX)


def is_sidecar(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save` (its header carries ``FORMAT``). Reads
    the header only, never the tensors (the file may be a multi-GB weights file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except Exception:  # not a file, unreadable, not safetensors: not ours either way
        return False
    return meta.get("format") == FORMAT


def _refuse_foreign(side: Path, path: Path) -> None:
    if (side.exists() or side.is_symlink()) and not is_sidecar(side):
        raise PolicyError(f"cannot save policy {str(path)!r}: its calibration tensors go to {str(side)!r}, which "
                          "exists and was not written by dit_accel (it is not a policy sidecar); policy.save never "
                          "replaces a file it did not write — choose another name for the policy file (or move "
                          "that file away)")


def _temp(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def save(data: dict, path: str | Path, inline: bool = False) -> Path | None:
    """Write the policy dict ``data`` as YAML at ``path``; long numeric lists go to ``NAME.yaml.safetensors``
    beside it (unless ``inline``). Returns the sidecar's path, or None when everything is inline (a stale
    sidecar of an earlier save is removed then).

    An existing file at the sidecar's name is replaced (or removed) only if it is one of ours
    (:func:`is_sidecar`); otherwise a PolicyError names it and nothing is written. Both files are written
    to temporary names first and renamed into place, so a failure leaves no half-written policy."""
    import yaml
    from safetensors.numpy import save_file

    path = Path(path)
    if path.name.lower().endswith(SUFFIX):
        raise PolicyError(f"cannot save a policy as {str(path)!r}: that is a safetensors name (model weights?); "
                          "give the policy file a .yaml suffix")
    if path.is_dir():
        raise PolicyError(f"cannot save a policy as {str(path)!r}: it is a folder; give a .yaml file path")
    side = sidecar_path(path)
    body, tensors = ({**data}, {}) if inline else split(data)
    if tensors:
        _refuse_foreign(side, path)
        body = {SIDECAR_KEY: side.name, **body}
    text = yaml.safe_dump(body, sort_keys=False)
    temps = [_temp(path)] + ([_temp(side)] if tensors else [])
    try:
        if tensors:
            save_file(tensors, str(temps[1]), metadata={"format": FORMAT, "policy": str(data.get("name", "")),
                                                        "policy_file": path.name})
        temps[0].write_text(text)
        if tensors:
            os.replace(temps[1], side)
        os.replace(temps[0], path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    if not tensors and is_sidecar(side):  # a stale sidecar of an earlier save; anything else stays untouched
        side.unlink()
    return side if tensors else None


# ---------------------------------------------------------------------------------------------------
# loading untrusted policy files
# ---------------------------------------------------------------------------------------------------

def _expansion_error(node: Any) -> str | None:
    """Why the composed YAML ``node`` is too costly to build (aliases re-use nodes, so the built document can
    be exponentially larger than the text), or None. Iterative: deep documents do not hit Python's stack."""
    from yaml.nodes import MappingNode, SequenceNode

    def children(n: Any) -> list:
        if isinstance(n, MappingNode):
            return [c for pair in n.value for c in pair]
        if isinstance(n, SequenceNode):
            return list(n.value)
        return []

    size: dict[int, int] = {}      # id(node) -> nodes in its fully expanded tree
    active: set[int] = set()
    distinct = 0
    stack: list[tuple[Any, int, bool]] = [(node, 1, False)]
    while stack:
        n, depth, done = stack.pop()
        key = id(n)
        if done:
            active.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children(n))
            if size[key] - distinct > MAX_ALIAS_EXPANSION:
                return f"its aliases expand to more than {MAX_ALIAS_EXPANSION:,} extra nodes (a YAML alias bomb?)"
            continue
        if key in size:
            continue
        if key in active:
            return "an alias refers to itself (a recursive structure)"
        if depth > MAX_DEPTH:
            return f"it nests deeper than {MAX_DEPTH} levels"
        active.add(key)
        distinct += 1
        stack.append((n, depth, True))
        stack.extend((c, depth + 1, False) for c in children(n) if id(c) not in size)
    return None


def load_yaml(path: str | Path) -> Any:
    """The document of the policy file ``path``, read safely: at most ``MAX_POLICY_BYTES``, plain YAML data only
    (``yaml.SafeLoader``: no Python objects), bounded alias expansion and depth, one document. An empty file
    is an error. Any failure is a PolicyError naming the file."""
    import yaml

    path = Path(path)
    where = f"policy file {str(path)!r}"
    if path.is_dir():
        raise PolicyError(f"{where} is a folder, not a policy YAML file")
    if not path.is_file():
        raise PolicyError(f"{where} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_POLICY_BYTES:
            raise PolicyError(f"{where} is {size:,} bytes, over the {MAX_POLICY_BYTES:,}-byte limit for policy files "
                              "(long calibration tables belong in its .safetensors sidecar: policy.save writes one)")
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as err:
        raise PolicyError(f"{where} cannot be read: {err}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{where} is over the {MAX_POLICY_BYTES:,}-byte limit for policy files")
    loader = None
    try:
        loader = yaml.SafeLoader(raw)  # decoding starts here: a binary file fails already
        node = loader.get_single_node()
        if node is not None:
            problem = _expansion_error(node)
            if problem:
                raise PolicyError(f"{where} is refused: {problem}")
            data = loader.construct_document(node)
        else:
            data = None
    except yaml.YAMLError as err:
        raise PolicyError(f"{where} is not valid YAML: {err}") from None
    except RecursionError:
        raise PolicyError(f"{where} is not valid YAML: it nests too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        raise PolicyError(f"{where} is empty: it holds no policy (a mapping with name:, cache:, guidance:, "
                          "attention:, quant:)")
    return data


def _check_name(name: Any, path: Path) -> str:
    where = f"policy file {str(path)!r}"
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}: '{SIDECAR_KEY}' must be a file name, got {name!r}")
    plain = ("/" not in name and "\\" not in name and "\x00" not in name and name not in (".", "..")
             and Path(name).name == name and not Path(name).is_absolute() and not os.path.splitdrive(name)[0])
    if not plain or not name.lower().endswith(SUFFIX) or name.lower() == SUFFIX:
        raise PolicyError(f"{where}: '{SIDECAR_KEY}' must name a .safetensors file in the YAML's own folder (a plain "
                          f"file name such as {sidecar_path(path).name!r}), got {name!r}; a policy file never reads "
                          "from anywhere else")
    return name


def _references(data: Any, out: dict[str, bool], where: str) -> None:
    """Collect ``{name: ragged}`` of every reference in ``data``; malformed references are PolicyErrors."""
    if isinstance(data, dict):
        if MARKER in data:
            extra = sorted(set(map(str, data)) - {MARKER, RAGGED})
            name, ragged = data[MARKER], data.get(RAGGED, False)
            if extra or not isinstance(name, str) or not name or not isinstance(ragged, bool):
                raise PolicyError(f"{where}: malformed sidecar reference {data!r}; expected {{{MARKER}: NAME}} or "
                                  f"{{{MARKER}: NAME, {RAGGED}: true}}")
            if out.get(name, ragged) != ragged:
                raise PolicyError(f"{where}: sidecar tensor {name!r} is referenced both as ragged and as not ragged")
            out[name] = ragged
            return
        for v in data.values():
            _references(v, out, where)
    elif isinstance(data, list):
        for v in data:
            _references(v, out, where)


def _read_tensors(side: Path, wanted: dict[str, bool], where: str) -> dict[str, np.ndarray]:
    """The referenced tensors of ``side`` (plus the offsets of ragged ones), each checked against its reference."""
    from safetensors import safe_open

    names = [n for name, ragged in wanted.items() for n in ([name, f"{name}.offsets"] if ragged else [name])]
    try:
        with safe_open(str(side), framework="np") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise PolicyError(f"{where} is not a dit_accel policy sidecar (its safetensors metadata carries no "
                                  f"format {FORMAT!r}); the YAML must name the .safetensors file policy.save wrote")
            held = set(f.keys())
            missing = [n for n in names if n not in held]
            if missing:
                raise PolicyError(f"{where} holds no tensor {missing[0]!r} (it holds {sorted(held)}); the YAML "
                                  "and its .safetensors file do not belong together — save the policy again")
            total = 0
            for n in names:
                part = f.get_slice(n)
                shape, dtype = list(part.get_shape()), part.get_dtype()
                offsets = n.endswith(".offsets") and wanted.get(n[:-len(".offsets")]) is True
                claim = "int64 offsets" if offsets else "float64 or int64"
                if (dtype != "I64") if offsets else (dtype not in DTYPES):
                    raise PolicyError(f"{where}: tensor {n!r} is {_DTYPE_NAMES.get(dtype, dtype)}, its reference "
                                      f"needs {claim} (a policy sidecar holds what policy.save writes)")
                dims = (1,) if offsets or wanted.get(n) else (1, 2)
                if len(shape) not in dims:
                    raise PolicyError(f"{where}: tensor {n!r} is {len(shape)}-D {shape}, its reference needs a "
                                      + ("1-D list" if dims == (1,) else "1-D list or a 2-D table of equal rows"))
                total += int(np.prod(shape))
                if total > MAX_SIDECAR_ELEMENTS:
                    raise PolicyError(f"{where}: the referenced tensors hold more than {MAX_SIDECAR_ELEMENTS:,} "
                                      "numbers, far more than any calibration; refusing to load them")
            tensors = {n: f.get_tensor(n) for n in names}
    except PolicyError:
        raise
    except Exception as err:  # SafetensorError, OSError
        raise PolicyError(f"{where} is not a readable safetensors file: {err}") from None
    for name, ragged in wanted.items():
        if ragged:
            offsets, n = tensors[f"{name}.offsets"].tolist(), len(tensors[name])
            if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n or any(
                    b < a for a, b in zip(offsets[:-1], offsets[1:])):
                raise PolicyError(f"{where}: {name + '.offsets'!r} does not partition the {n} values of {name!r} "
                                  "(expected non-decreasing offsets from 0 to their count)")
    return tensors


def load(data: dict, path: str | Path) -> dict:
    """Resolve a loaded YAML dict: read its sidecar (a ``.safetensors`` file in the YAML's folder) into the
    references."""
    path = Path(path)
    if not isinstance(data, dict):
        return data
    name = data.get(SIDECAR_KEY)
    if name is None:
        if has_references(data):
            raise PolicyError(f"policy file {str(path)!r} refers to sidecar tensors but names no '{SIDECAR_KEY}' file")
        return data
    data = {k: v for k, v in data.items() if k != SIDECAR_KEY}
    side = path.parent / _check_name(name, path)
    where = f"sidecar {str(side)!r}"
    wanted: dict[str, bool] = {}
    _references(data, wanted, f"policy file {str(path)!r}")
    if not side.is_file():
        raise PolicyError(f"policy file {str(path)!r} keeps its calibration tensors in {str(side)!r}, which does "
                          "not exist; copy the .safetensors file beside the YAML (policy.save writes both)")
    return join(data, _read_tensors(side, wanted, where), where)
