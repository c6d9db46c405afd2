"""dit_accel's log messages: one ``dit_accel`` parent logger, module loggers below it (diffusers' conventions).

    import dit_accel.logging
    dit_accel.logging.set_verbosity_info()      # or _warning() (the default), _error(), _debug()
    # or, before the process starts:  DIT_ACCEL_VERBOSITY=error python ...

Modules log through ``dit_accel.logging.get_logger(__name__)`` (``dit_accel.api``, ``dit_accel.zoo...``), all
children of the ``dit_accel`` logger, whose level this module sets: ``$DIT_ACCEL_VERBOSITY`` (``debug``,
``info``, ``warning``, ``error``, ``critical`` or a number) when set, else ``warning``. Messages go to stderr
through a handler of our own only while the application has not configured logging itself (the root logger
has no handler); once it has, they propagate to the application's handlers instead (also pytest's ``caplog``),
so nothing is printed twice.
"""

from __future__ import annotations

import logging as _logging
import os
import sys

__all__ = ["get_logger", "get_verbosity", "set_verbosity", "set_verbosity_debug", "set_verbosity_error",
           "set_verbosity_info", "set_verbosity_warning", "ENV_VAR", "LIBRARY"]

LIBRARY = "dit_accel"
ENV_VAR = "DIT_ACCEL_VERBOSITY"
DEBUG, INFO, WARNING, ERROR, CRITICAL = (_logging.DEBUG, _logging.INFO, _logging.WARNING, _logging.ERROR,
                                         _logging.CRITICAL)
_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "warn": WARNING, "error": ERROR, "critical": CRITICAL}


class _WhenUnconfigured(_logging.Filter):
    """Lets a record through our handler only while the root logger has no handler of the application's."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not _logging.getLogger().handlers


def _default_level() -> int:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return WARNING
    if value in _LEVELS:
        return _LEVELS[value]
    if value.isdigit():
        return int(value)
    _logging.getLogger(LIBRARY).warning("dit_accel: %s=%r is not a level; choose one of %s (using warning)",
                                        ENV_VAR, value, ", ".join(k for k in _LEVELS if k != "warn"))
    return WARNING


def _configure() -> _logging.Logger:
    root = _logging.getLogger(LIBRARY)
    if not getattr(root, "_dit_accel_configured", False):
        handler = _logging.StreamHandler(sys.stderr)
        handler.setFormatter(_logging.Formatter("%(message)s"))
        handler.addFilter(_WhenUnconfigured())
        root.addHandler(handler)
        root._dit_accel_configured = True  # type: ignore[attr-defined]
        root.setLevel(_default_level())
    return root


def get_logger(name: str | None = None) -> _logging.Logger:
    """The logger ``name`` (a module's ``__name__``, under ``dit_accel``), or the library's parent logger."""
    _configure()
    if name is None or name == LIBRARY:
        return _logging.getLogger(LIBRARY)
    if not name.startswith(LIBRARY + "."):
        name = f"{LIBRARY}.{name}"
    return _logging.getLogger(name)


def get_verbosity() -> int:
    """The level of the ``dit_accel`` logger (``logging.WARNING`` unless changed)."""
    return _configure().getEffectiveLevel()


def set_verbosity(level: int | str) -> None:
    """Set the level of every dit_accel logger: a ``logging`` level or its name (``"info"``)."""
    if isinstance(level, str):
        if level.strip().lower() not in _LEVELS:
            raise ValueError(f"verbosity {level!r}: choose one of {', '.join(k for k in _LEVELS if k != 'warn')}")
        level = _LEVELS[level.strip().lower()]
    _configure().setLevel(level)


def set_verbosity_debug() -> None:
    set_verbosity(DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    set_verbosity(WARNING)


def set_verbosity_error() -> None:
    set_verbosity(ERROR)
