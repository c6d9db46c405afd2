"""Public entry points: accelerate, remove, stats, reset, accelerated."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from .adapters import get_adapter
from .config import PolicyError
from .hooks import Runtime, SchedulerWatch, attach, detach
from .policy import Policy, PolicyLike, load_policy
from .quant import apply_policy_quant, remove_policy_quant
from .stats import Stats

_HANDLE = "_dit_accel"
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


def _transformers(target: Any) -> dict[str, torch.nn.Module]:
    if isinstance(target, torch.nn.Module):
        return {"transformer": target}
    found = {name: getattr(target, name) for name in TRANSFORMER_COMPONENTS
             if isinstance(getattr(target, name, None), torch.nn.Module)}
    if not found:
        raise PolicyError(f"{type(target).__name__} has no transformer component "
                          f"({' or '.join(TRANSFORMER_COMPONENTS)}); pass a diffusers pipeline or a transformer module")
    return found


def accelerate(target: Any, policy: PolicyLike = "fbcache", *, blocks: Sequence[str] | None = None,
               block_returns: Sequence[str] | None = None) -> Any:
    """Attach ``policy`` to a diffusers pipeline (or a bare transformer) through hooks; returns ``target``.

    ``policy``: a shipped preset name, a YAML path, a dict or a :class:`Policy`. ``blocks`` /
    ``block_returns`` describe an unsupported transformer by hand (generic adapter). Everything is
    validated before the first hook is registered; on any error nothing stays attached.
    """
    if getattr(target, _HANDLE, None) is not None:
        raise PolicyError(f"{type(target).__name__} is already accelerated; call dit_accel.remove() first")
    policy = load_policy(policy)
    modules = _transformers(target)
    for name, module in modules.items():
        if getattr(module, _HANDLE, None) is not None:
            raise PolicyError(f"{name} is already accelerated; call dit_accel.remove() on it first")
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
        if not isinstance(target, torch.nn.Module) and getattr(target, "scheduler", None) is not None:
            SchedulerWatch(target, list(runtimes.values()))
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


def reset(target: Any, num_inference_steps: int | None = None) -> None:
    """Start a new generation by hand (custom sampling loops on a bare transformer)."""
    for rt in _runtimes(target).values():
        rt.new_generation(num_inference_steps)


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
