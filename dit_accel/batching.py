"""Rows of a batched call: cut every tensor of a structure (arguments, states) to some rows of its batch."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .context import StepContext


def slice_rows(value: Any, batch: int, rows: slice) -> Any:
    """``value`` with every tensor whose dim 0 is ``batch`` cut to ``rows``, through dataclass fields (in
    place), dicts, lists, tuples and containers with a ``map_tensors`` method (Taylor series)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == batch else value
    if hasattr(value, "map_tensors"):
        return value.map_tensors(lambda t: slice_rows(t, batch, rows))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            current = getattr(value, f.name)
            if not isinstance(current, StepContext):
                object.__setattr__(value, f.name, slice_rows(current, batch, rows))
        return value
    if isinstance(value, dict):
        return {k: slice_rows(v, batch, rows) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(slice_rows(v, batch, rows) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(slice_rows(v, batch, rows) for v in value)
    return value
