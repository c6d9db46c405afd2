"""Public entry points: accelerate, remove, stats, reset, accelerated."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from .adapters import get_adapter
from .config import PolicyError
from .hooks import Runtime, attach, detach
from .inspection import Inspection
from .policy import Policy, PolicyLike, load_policy
from .quant import apply_policy_quant, remove_policy_quant
from .stats import Stats

_HANDLE = "_dit_accel"
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, or the one ``torch.compile(module)`` wrapped (hooks go on the real blocks)."""
    while isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def _transformers(target: Any) -> dict[str, torch.nn.Module]:
    if isinstance(target, torch.nn.Module):
        return {"transformer": unwrap(target)}
    found = {name: unwrap(getattr(target, name)) for name in TRANSFORMER_COMPONENTS
             if isinstance(getattr(target, name, None), torch.nn.Module)}
    if not found:
        raise PolicyError(f"{type(target).__name__} has no transformer component "
                          f"({' or '.join(TRANSFORMER_COMPONENTS)}); pass a diffusers pipeline or a transformer module")
    return found


def _check_attachable(name: str, module: torch.nn.Module, policy: Policy) -> None:
    """Refuse, before anything is attached, what would run twice or cannot run."""
    if getattr(module, _HANDLE, None) is not None:
        raise PolicyError(f"{name} is already accelerated; call dit_accel.remove() on it first")
    if getattr(module, "_cache_config", None) is not None:
        raise PolicyError(f"{name} has diffusers' own cache enabled ({type(module._cache_config).__name__}); two caches "
                          f"would both run: call {name}.disable_cache() first")
    if policy.quant is not None and any(p.is_meta for p in module.parameters()):
        raise PolicyError(f"{name} has parameters on the meta device (weights not loaded); quant.linear needs real "
                          "weights: load them (or move the model to a device) before dit_accel.accelerate")


def accelerate(target: Any, policy: PolicyLike = "fbcache", *, blocks: Sequence[str] | None = None,
               block_returns: Sequence[str] | None = None, **cache_overrides: Any) -> Any:
    """Attach ``policy`` to a diffusers pipeline (or a bare transformer) through hooks; returns ``target``.

    ``policy``: a shipped preset name, a YAML path, a dict or a :class:`Policy`; keyword arguments
    change fields of its cache section (``accelerate(pipe, "fbcache", threshold=0.12)``). ``blocks`` /
    ``block_returns`` describe an unsupported transformer by hand (generic adapter). A transformer
    wrapped by ``torch.compile`` is accelerated through the module it wraps. Everything is validated
    before the first hook is registered; on any error nothing stays attached.
    """
    if target is None:
        raise PolicyError("accelerate: expected a diffusers pipeline or a transformer module, got None")
    if getattr(target, _HANDLE, None) is not None:
        raise PolicyError(f"{type(target).__name__} is already accelerated; call dit_accel.remove() first")
    policy = load_policy(policy)
    if cache_overrides:
        policy = policy.replace(**cache_overrides)
    modules = _transformers(target)
    for name, module in modules.items():
        _check_attachable(name, module, policy)
    runtimes: dict[str, Runtime] = {}
    for name, module in modules.items():
        adapter = get_adapter(module, blocks=blocks, block_returns=block_returns)
        pipeline = None if isinstance(target, torch.nn.Module) else target
        runtimes[name] = Runtime(module, adapter, policy, adapter.blocks(module),  # validates the plan
                                 pipeline=pipeline, component=name)
    done: list[Runtime] = []
    try:
        for rt in runtimes.values():
            attach(rt)
            done.append(rt)
            apply_policy_quant(rt.transformer, rt.adapter, policy)  # policy.quant: torchao linears
    except Exception:
        for rt in done:
            detach(rt)
            remove_policy_quant(rt.transformer)
        raise
    setattr(target, _HANDLE, runtimes)
    if not isinstance(target, torch.nn.Module):
        for name, module in modules.items():
            setattr(module, _HANDLE, {name: runtimes[name]})
    return target


def _runtimes(target: Any) -> dict[str, Runtime]:
    runtimes = getattr(target, _HANDLE, None)
    if runtimes is None and not isinstance(target, torch.nn.Module):
        # another pipeline around an accelerated transformer (e.g. img2img built from a text-to-image's components)
        shared = {}
        for name in TRANSFORMER_COMPONENTS:
            handle = getattr(getattr(target, name, None), _HANDLE, None)
            if handle is not None:
                shared.update({name: rt for rt in handle.values()})
        runtimes = shared or None
    if runtimes is None:
        raise PolicyError(f"{type(target).__name__} is not accelerated (call dit_accel.accelerate first)")
    return runtimes


def remove(target: Any) -> Any:
    """Detach everything ``accelerate`` attached; outputs are bit-identical to the untouched model again."""
    runtimes = _runtimes(target)
    for rt in runtimes.values():
        detach(rt)
        remove_policy_quant(rt.transformer)  # original weights back, bit-exact
        if getattr(rt.transformer, _HANDLE, None) is not None:
            delattr(rt.transformer, _HANDLE)
    if hasattr(target, _HANDLE):
        delattr(target, _HANDLE)
    return target


def is_accelerated(target: Any) -> bool:
    return getattr(target, _HANDLE, None) is not None


def stats(target: Any) -> Stats | dict[str, Stats]:
    """Statistics of the last call: a :class:`Stats`, or one per transformer for two-transformer pipelines."""
    runtimes = _runtimes(target)
    if len(runtimes) == 1:
        return next(iter(runtimes.values())).stats()
    return {name: rt.stats() for name, rt in runtimes.items()}


def inspect(target: Any) -> Inspection:
    """What is attached to ``target`` and what it holds now (a read-only :class:`~dit_accel.inspection.Inspection`)."""
    return Inspection({name: rt.view() for name, rt in _runtimes(target).items()})


def reset(target: Any, num_inference_steps: int | None = None) -> None:
    """Start a new generation by hand (custom sampling loops on a bare transformer).

    ``num_inference_steps``: the transformer calls each CFG branch will make in this and later
    generations of the loop (schedules such as "always compute the last step" need it)."""
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                            or not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise PolicyError(f"num_inference_steps: expected a positive integer, got {num_inference_steps!r}")
    for rt in _runtimes(target).values():
        rt.reset(num_inference_steps)


def policy_of(target: Any) -> Policy:
    return next(iter(_runtimes(target).values())).policy


@contextlib.contextmanager
def accelerated(target: Any, policy: PolicyLike = "fbcache", **kwargs: Any) -> Iterator[Any]:
    """``with dit_accel.accelerated(pipe, policy): ...`` — attached inside the block, removed after."""
    accelerate(target, policy, **kwargs)
    try:
        yield target
    finally:
        remove(target)
