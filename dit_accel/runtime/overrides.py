"""Forward overrides of sub-modules inside blocks (FFN slicing, sub-block reuse) that regional compile traces once.

A ``diffusers.hooks.ModelHook`` replaces ``module.forward`` by a ``functools.partial`` made for that module, and
``torch.compile`` guards a block's graph on the identity of its sub-modules' ``forward`` attribute: with one hook
per FFN, every block of a compiled stack gets its own graph and a 30-block model hits dynamo's recompile limit
(measured: the 9th block fails under ``fullgraph=True``). Here the override is one shared function bound to each
module (``types.MethodType``), which dynamo guards by the function, not by the bound object: one graph for every
block. The override keeps the forward it replaced (another override, or an instance-level forward some library
installed) and calls it, so overrides nest; :func:`restore_forward` undoes them in the reverse order, leaving no
attribute behind.
"""

from __future__ import annotations

import types
from typing import Any, Callable, NamedTuple

import torch

_PREFIX = "_dit_accel_"


class _Override(NamedTuple):
    owner: Any
    inner: Any  # the instance-level forward replaced (None: the class's forward)
    function: Callable[..., Any]


def override_forward(module: torch.nn.Module, key: str, function: Callable[..., Any], owner: Any) -> None:
    """``module.forward`` becomes ``function`` bound to ``module``; ``owner`` is what ``function`` reads its
    settings from (:func:`owner_of`)."""
    if _PREFIX + key in module.__dict__:
        raise RuntimeError(f"{type(module).__name__} already carries a dit_accel {key!r} override; call "
                           "dit_accel.remove first")
    module.__dict__[_PREFIX + key] = _Override(owner, module.__dict__.get("forward"), function)
    module.forward = types.MethodType(function, module)


def owner_of(module: torch.nn.Module, key: str) -> Any:
    return module.__dict__[_PREFIX + key].owner


def call_inner(module: torch.nn.Module, key: str, *args: Any, **kwargs: Any) -> Any:
    """The forward the ``key`` override replaced, called with ``args`` / ``kwargs``."""
    inner = module.__dict__[_PREFIX + key].inner
    if inner is None:
        return type(module).forward(module, *args, **kwargs)
    return inner(*args, **kwargs)


def restore_forward(module: torch.nn.Module, key: str) -> None:
    """Undo :func:`override_forward` (the last override applied to ``module`` must be undone first)."""
    record = module.__dict__.get(_PREFIX + key)
    if record is None:
        return
    current = module.__dict__.get("forward")
    if getattr(current, "__self__", None) is not module or getattr(current, "__func__", None) is not record.function:
        raise RuntimeError(f"{type(module).__name__}.forward was replaced after dit_accel's {key!r} override; undo "
                           "that first (in the reverse order of application)")
    del module.__dict__[_PREFIX + key]
    if record.inner is None:
        del module.__dict__["forward"]
    else:
        module.forward = record.inner
