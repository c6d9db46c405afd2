"""The prediction inside a transformer's output, whatever its form (tensor, tuple, output dataclass)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def output_sample(output: Any) -> torch.Tensor | None:
    """The prediction in a transformer output: ``.sample`` of an output dataclass, ``[0]`` of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``output`` (tensor, tuple, or output dataclass) with ``fn`` applied to each of its tensors."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        changes = {f.name: fn(getattr(output, f.name)) for f in dataclasses.fields(output)
                   if isinstance(getattr(output, f.name), torch.Tensor)}
        return dataclasses.replace(output, **changes)
    if isinstance(output, (tuple, list)):
        return type(output)(fn(o) if isinstance(o, torch.Tensor) else o for o in output)
    return output


def replace_sample(output: Any, sample: torch.Tensor) -> Any:
    """``output`` with its prediction (see :func:`output_sample`) replaced by ``sample``."""
    if isinstance(output, torch.Tensor):
        return sample
    if dataclasses.is_dataclass(output) and hasattr(output, "sample"):
        return dataclasses.replace(output, sample=sample)
    if isinstance(output, (tuple, list)):
        return type(output)([sample, *output[1:]])
    return output
