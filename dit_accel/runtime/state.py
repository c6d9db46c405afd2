"""The bytes the features' typed states hold (a generic walk over dataclass fields, containers and slots)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..context import StepContext


def _children(value: Any):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in dataclasses.fields(value) if not isinstance(getattr(value, f.name),
                                                                                             StepContext)]
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    slots = getattr(type(value), "__slots__", None)
    if slots and not isinstance(value, torch.Tensor):
        return [getattr(value, s, None) for s in slots]
    return []


def tensor_bytes(value: Any) -> int:
    """Bytes of the distinct tensors reachable from ``value`` (dataclass fields, containers, slots)."""
    seen: set[int] = set()
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                total += item.numel() * item.element_size()
            continue
        if isinstance(item, (str, bytes, int, float, bool)) or item is None:
            continue
        stack.extend(_children(item))
    return total
