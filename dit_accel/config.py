"""Validated, serialisable configuration dataclasses.

Every recipe section (a caching method's settings, the policy itself) is a frozen dataclass
whose fields carry their own constraints in ``field(metadata=...)``. ``from_dict`` rejects
unknown keys, wrong types and out-of-range values with an error that names the field and
what is allowed, so a typo in a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, ClassVar, Mapping


class PolicyError(ValueError):
    """A policy, preset or adapter request that cannot be honoured (the message says why)."""


MAX_STEPS = 100_000  # bound on a calibrated step index without a recorded step count (tables are sized by it)


def option(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           choices: tuple | None = None, allow_inf: bool = False, doc: str = "") -> Any:
    """A dataclass field with validation constraints (``ge``/``gt``/``le`` bounds, ``choices``).

    A float field must be finite (NaN is never allowed; ``inf`` / ``-inf`` only with ``allow_inf=True``)."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "choices": choices,
                                                        "allow_inf": allow_inf, "doc": doc})


def is_number(value: Any) -> bool:
    """An int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_numbers(where: str, values: Any, *, positive: bool = False, min_length: int = 1) -> list:
    """Check that ``values`` is a list/tuple of at least ``min_length`` finite numbers (``positive``: > 0)
    and return it as a list; else a PolicyError naming ``where``. Calibration tables are read in the hot
    loop, so an ``inf`` / ``nan`` or a stray string is refused when the policy is loaded, not discovered as
    NaN images or an exception mid-generation."""
    what = "positive finite numbers" if positive else "finite numbers"
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or len(values) < min_length:
        raise PolicyError(f"{where}: expected a list of at least {min_length} {what}, got {_short(values)}")
    for i, v in enumerate(values):
        if not (is_number(v) and math.isfinite(v) and (not positive or v > 0)):
            raise PolicyError(f"{where}[{i}]: expected {what}, got {v!r}")
    return list(values)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check_type(where: str, value: Any, tp: Any, allow_inf: bool = False) -> Any:
    """Check ``value`` against a simple annotation (int, float, bool, str, X | None); return it coerced.
    Floats must be finite (``allow_inf``: ``inf`` / ``-inf`` pass; NaN never does)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _check_type(where, value, a, allow_inf)
            except PolicyError as e:
                errors.append(str(e))
        raise PolicyError(errors[0])
    if tp is bool:
        if not isinstance(value, bool):
            raise PolicyError(f"{where}: expected a boolean (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise PolicyError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            raise PolicyError(f"{where}: {value!r} is too large for a number") from None
        if not allow_inf and not math.isfinite(value):
            raise PolicyError(f"{where}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise PolicyError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def unknown_key_error(where: str, key: Any, allowed: list[str]) -> PolicyError:
    hint = difflib.get_close_matches(key, allowed, n=1) if isinstance(key, str) else []
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return PolicyError(f"{where}: unknown key {key!r}{did_you_mean}; allowed keys: {', '.join(sorted(allowed))}")


class ConfigBase:
    """Mixin for frozen dataclasses: ``from_dict`` with validation, ``to_dict``, ``validate``."""

    section: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{self.section}.{f.name}"
            value = getattr(self, f.name)
            coerced = _check_type(where, value, hints[f.name], bool(f.metadata.get("allow_inf")))
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
                value = coerced
            if value is None:
                continue
            m = f.metadata
            if m.get("choices") is not None and value not in m["choices"]:
                raise PolicyError(f"{where}: {value!r} is not allowed; choose one of {list(m['choices'])}")
            if m.get("ge") is not None and value < m["ge"]:
                raise PolicyError(f"{where}: {value!r} is out of range; must be >= {m['ge']}")
            if m.get("gt") is not None and value <= m["gt"]:
                raise PolicyError(f"{where}: {value!r} is out of range; must be > {m['gt']}")
            if m.get("le") is not None and value > m["le"]:
                raise PolicyError(f"{where}: {value!r} is out of range; must be <= {m['le']}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str | None = None):
        where = where or cls.section
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PolicyError(f"{where}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise unknown_key_error(where, key, names)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _constraint_text(f: dataclasses.Field) -> str:
    m = f.metadata
    parts = []
    if m.get("choices") is not None:
        parts.append("one of " + ", ".join(repr(c) for c in m["choices"]))
    for key, symbol in (("ge", ">="), ("gt", ">"), ("le", "<=")):
        if m.get(key) is not None:
            parts.append(f"{symbol} {m[key]}")
    return "; ".join(parts)


def explain_options(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, default, constraints, doc) of every documented field of a config dataclass, in order."""
    rows = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("doc"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "method" and getattr(cls, "method_name", ""):
            default = cls.method_name  # a registered method's name, filled in by its config
        rows.append((f.name, describe_value(default), _constraint_text(f), f.metadata["doc"]))
    return rows


def document_options(cls: type) -> type:
    """Append an ``Args:`` section, rendered from the fields' ``option(doc=...)``, to ``cls.__doc__``
    (once; diffusers' style: one entry per field). Returns ``cls`` (usable as a decorator)."""
    if getattr(cls, "_options_documented", None) is cls:
        return cls
    lines = ["", "Args:"]
    for name, default, constraints, doc in explain_options(cls):
        extra = f" ({constraints})" if constraints else ""
        lines.append(f"    {name}: {doc}{extra}. Default: {default}.")
    base = (cls.__doc__ or "").rstrip()
    if base.startswith(f"{cls.__name__}("):  # the signature dataclasses writes when there is no docstring
        base = ""
    cls.__doc__ = (base + "\n" if base else "") + "\n".join(lines) + "\n"
    cls._options_documented = cls
    return cls


def describe_value(value: Any, limit: int = 8) -> str:
    """A short text for a config value: calibrated tables (long lists, per-branch mappings of them) are
    summarised by their size instead of printed."""
    def count(v: Any) -> int:
        if isinstance(v, (list, tuple)):
            return sum(count(x) for x in v) if any(isinstance(x, (list, tuple, dict)) for x in v) else len(v)
        if isinstance(v, dict):
            return sum(count(x) for x in v.values())
        return 1
    if isinstance(value, dict) and count(value) > limit:
        return "{" + ", ".join(f"{k}: <{count(v)} values>" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)) and count(value) > limit:
        return f"<{count(value)} values>"
    return repr(value) if isinstance(value, str) else str(value)
