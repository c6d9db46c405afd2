"""Quantization of linear layers through torchao (the ``quant:`` policy section).

Quantized *attention* kernels live in :mod:`dit_accel.kernels.quant_attention`; this package
only swaps the weights of ``nn.Linear`` layers for torchao's quantized tensors, reversibly.
``apply_policy_quant`` / ``remove_policy_quant`` are what ``dit_accel.accelerate`` /
``dit_accel.remove`` call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .config import LINEAR_MODES, LinearQuantConfig
from .linear import LinearQuantHandle, candidate_linears, quantize_linears, torchao_available

__all__ = ["LINEAR_MODES", "LinearQuantConfig", "LinearQuantHandle", "apply_policy_quant", "candidate_linears",
           "quantize_linears", "quantized", "remove_policy_quant", "torchao_available"]

_ATTR = "_dit_accel_linear_quant"


def apply_policy_quant(module: torch.nn.Module, adapter: Any,
                       cfg: LinearQuantConfig | None) -> LinearQuantHandle | None:
    """Quantize ``module``'s block linears as ``cfg`` (a policy's ``quant`` section) says; the handle is kept on
    the module. ``cfg=None`` does nothing."""
    if cfg is None:
        return None
    if getattr(module, _ATTR, None) is not None:
        raise RuntimeError(f"{type(module).__name__}'s linear layers are already quantized by dit_accel")
    handle = quantize_linears(module, cfg, adapter=adapter)
    setattr(module, _ATTR, handle)
    return handle


def remove_policy_quant(module: torch.nn.Module) -> None:
    """Restore the original weights of a module quantized by :func:`apply_policy_quant` (no-op otherwise)."""
    handle = module.__dict__.pop(_ATTR, None)
    if handle is not None:
        handle.restore()


@contextlib.contextmanager
def quantized(target: Any, config: LinearQuantConfig | None) -> Iterator[Any]:
    """``with quantized(pipe, policy.quant): ...`` — the transformer(s) of ``target`` (a pipeline or a
    transformer) run with quantized linears inside the block, original weights after it.

    For calibration: cache and quantization errors compound (CacheQuant, Liu et al. 2025), so a
    cache gate should be calibrated on the quantized model it will serve. ``config=None`` does nothing.
    """
    if config is None:
        yield target
        return
    modules = [target] if isinstance(target, torch.nn.Module) else [
        getattr(target, n) for n in ("transformer", "transformer_2") if isinstance(getattr(target, n, None),
                                                                               torch.nn.Module)]
    handles: list[LinearQuantHandle] = []
    try:
        for module in modules:
            if getattr(module, _ATTR, None) is None:  # already quantized by accelerate: leave it
                handles.append(quantize_linears(module, config))
        yield target
    finally:
        for handle in handles:
            handle.restore()
