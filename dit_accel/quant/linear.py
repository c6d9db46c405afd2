"""Weight / activation quantization of a transformer's linear layers through torchao, reversibly.

The GEMMs are torchao's (``torchao.quantization.quantize_`` with its configs; no hand-written
kernels here):

* ``fp8_dynamic`` → ``Float8DynamicActivationFloat8WeightConfig``: FP8 e4m3 weights, activations
  quantized per call, ``torch._scaled_mm``; per-row scales by default (``granularity="row"``),
  torchao's recommended accurate setting for FLUX-class models. Needs compute capability >= 8.9.
* ``int8_dynamic`` → ``Int8DynamicActivationInt8WeightConfig`` (per-row weights, per-token
  activations, ``torch._int_mm``).
* ``int8_weight_only`` → ``Int8WeightOnlyConfig`` (per-row INT8 weights, 16-bit activations);
  the one mode that also runs on the CPU.

What is quantized: every ``nn.Linear`` inside the blocks the model adapter lists
(:meth:`dit_accel.adapters.ModelAdapter.blocks`) — never the embedders or the final projection,
which sit outside the blocks — minus the ``skip`` patterns and any layer whose dimensions are not
multiples of 16 (the FP8/INT8 GEMMs need them).

Reversible: torchao replaces ``weight`` with a quantized tensor subclass (and sets an instance
``extra_repr``); :class:`LinearQuantHandle` keeps the original parameters (on the CPU by default)
and :meth:`LinearQuantHandle.restore` puts them back bit-exactly. ``set_inductor_config=False``:
torchao would otherwise change global ``torch._inductor`` settings, which ``remove`` could not undo.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import PolicyError
from .config import LINEAR_MODES, LinearQuantConfig

__all__ = ["LinearQuantHandle", "quantize_linears", "torchao_available", "candidate_linears"]


def torchao_available() -> bool:
    """Whether torchao is installed (looked up, not imported: importing it loads its C extensions)."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def _torchao_config(mode: str, granularity: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    if mode == "fp8_dynamic":
        gran = PerRow() if granularity == "row" else PerTensor()
        return Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False)
    if mode == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return Int8WeightOnlyConfig(set_inductor_config=False)


@dataclass
class _Saved:
    module: torch.nn.Linear
    weight: torch.nn.Parameter | torch.Tensor
    device: torch.device
    requires_grad: bool
    extra_repr: object  # the instance attribute before quantization, or _MISSING


_MISSING = object()


@dataclass
class LinearQuantHandle:
    """What :func:`quantize_linears` changed: ``quantized`` / ``skipped`` layer names and the saved
    weights; :meth:`restore` undoes it."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    _saved: dict[str, _Saved] = field(default_factory=dict, repr=False)

    def restore(self) -> None:
        """Put every original weight back (bit-exact) and drop torchao's instance attributes."""
        for name in list(self._saved):
            s = self._saved.pop(name)
            weight = s.weight
            if not isinstance(weight, torch.nn.Parameter):  # a CPU copy: back to its device
                weight = torch.nn.Parameter(weight.to(s.device), requires_grad=s.requires_grad)
            s.module.weight = weight
            if s.extra_repr is _MISSING:
                s.module.__dict__.pop("extra_repr", None)
            else:
                s.module.__dict__["extra_repr"] = s.extra_repr
        self.quantized.clear()

    @property
    def active(self) -> bool:
        return bool(self._saved)


def candidate_linears(transformer: torch.nn.Module, block_modules: Sequence[tuple[str, torch.nn.Module]],
                      skip: Sequence[str] = ()) -> tuple[dict[str, torch.nn.Linear], dict[str, str]]:
    """The linear layers to quantize (``{qualified name: module}``) and the skipped ones with a reason."""
    chosen: dict[str, torch.nn.Linear] = {}
    skipped: dict[str, str] = {}
    for block_name, block in block_modules:
        for sub, mod in block.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            name = f"{block_name}.{sub}" if sub else block_name
            if any(fnmatch.fnmatchcase(name, p) for p in skip):
                skipped[name] = "matches quant.skip"
            elif mod.in_features % 16 or mod.out_features % 16:
                skipped[name] = f"shape {mod.out_features}x{mod.in_features} is not a multiple of 16"
            elif not mod.weight.is_floating_point() or type(mod.weight.data) is not torch.Tensor:
                skipped[name] = "weight is already quantized or not floating point"
            else:
                chosen[name] = mod
    return chosen, skipped


def quantize_linears(transformer: torch.nn.Module, mode: str | LinearQuantConfig = "fp8_dynamic", *,
                     skip: Sequence[str] = (), granularity: str = "row", keep_originals: str = "cpu",
                     adapter=None, blocks: Sequence[str] | None = None) -> LinearQuantHandle:
    """Quantize the linear layers inside ``transformer``'s blocks with torchao; returns a handle to undo it.

    Args:
        transformer: a diffusers transformer the adapters know (or any module with ``blocks``).
        mode: ``"fp8_dynamic"``, ``"int8_dynamic"``, ``"int8_weight_only"``, or a
            :class:`LinearQuantConfig` (then the keyword options below are taken from it).
        skip: fnmatch patterns over qualified names under the transformer to leave in full precision.
        granularity: FP8 scale granularity, ``"row"`` or ``"tensor"``.
        keep_originals: keep the original weights on ``"cpu"`` or on their ``"device"`` for restore.
        adapter, blocks: the model adapter (default: :func:`dit_accel.adapters.get_adapter`), or block
            list names for a model the adapters do not know.

    Raises:
        PolicyError: unknown mode or option, torchao missing, FP8 without a capable GPU.
    """
    if isinstance(mode, LinearQuantConfig):
        cfg = mode
    else:
        if not isinstance(mode, str) or mode not in LINEAR_MODES:
            raise PolicyError(f"quant.linear: {mode!r} is not a linear quantization mode; choose one of "
                              f"{list(LINEAR_MODES)}")
        cfg = LinearQuantConfig(linear=mode, skip=tuple(skip), granularity=granularity,
                                keep_originals=keep_originals)
    if not torchao_available():
        raise PolicyError("quant.linear needs torchao: pip install 'dit-accel[quant]' (torchao>=0.14)")
    if adapter is None:
        from ..adapters import get_adapter

        adapter = get_adapter(transformer, blocks=blocks)
    chosen, skipped = candidate_linears(transformer, [(b.name, b.module) for b in adapter.blocks(transformer)],
                                        cfg.skip)
    if cfg.linear == "fp8_dynamic":
        devices = {m.weight.device for m in chosen.values()}
        bad = [d for d in devices if d.type != "cuda" or torch.cuda.get_device_capability(d) < (8, 9)]
        if bad:
            raise PolicyError(f"quant.linear=fp8_dynamic needs the weights on a CUDA GPU with compute capability "
                              f">= 8.9 (Ada/Hopper); they are on {sorted(map(str, bad))}. Use int8_weight_only on "
                              "the CPU.")
    from torchao.quantization import quantize_

    tao_cfg = _torchao_config(cfg.linear, cfg.granularity)
    handle = LinearQuantHandle(mode=cfg.linear, skipped=skipped)
    try:
        for name, mod in chosen.items():
            w = mod.weight
            saved = w if cfg.keep_originals == "device" else w.detach().to("cpu", copy=True)
            handle._saved[name] = _Saved(mod, saved, w.device, w.requires_grad,
                                         mod.__dict__.get("extra_repr", _MISSING))
            quantize_(mod, tao_cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
            handle.quantized.append(name)
    except Exception as err:
        handle.restore()
        raise PolicyError(f"quant.linear={cfg.linear}: torchao failed on {name}: {type(err).__name__}: {err}") from err
    return handle
