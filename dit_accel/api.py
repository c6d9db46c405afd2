"""Public entry points: accelerate, remove, stats, inspect, reset, accelerated.

The one module that wires the layers together: it builds each transformer's runtime core
(:mod:`dit_accel.runtime`) with the features a policy asks for — caching through the method its
``cache`` section registers (:mod:`dit_accel.caching`), adaptive guidance, sparse attention,
quantized linears — and attaches them, all or nothing.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch

from .adapters import TRANSFORMER_COMPONENTS, BlockInfo, ModelAdapter, get_adapter
from .caching.adaptive_guidance import AdaptiveGuidance, cfg_order_for
from .caching.base import method_for
from .caching.linear_ag import LinearAG, LinearAGConfig
from .config import PolicyError
from .inspection import Inspection
from .policy import Policy, PolicyLike, load_policy
from .runtime import AttentionFeature, CacheFeature, CompileFeature, Feature, GuidanceFeature, QuantFeature, Runtime
from .runtime.guardrails import Guard
from .runtime.linear_guidance import LinearGuidanceFeature
from .runtime.memory import MemoryFeature
from .stats import Stats

_HANDLE = "_dit_accel"
DYNAMIC_ACTIVATION_MODES = ("fp8_dynamic", "int8_dynamic")  # torchao modes that quantize activations per call
logger = logging.getLogger(__name__)  # under the "dit_accel" logger (dit_accel.logging)


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
                          f"({' or '.join(TRANSFORMER_COMPONENTS)}); pass a diffusers pipeline or a transformer module "
                          "(a stage without a denoising transformer, e.g. a latent upsampler, has nothing to "
                          "accelerate: accelerate the pipelines of the denoising stages)")
    if len({id(m) for m in found.values()}) < len(found):
        raise PolicyError(f"{type(target).__name__}: {' and '.join(found)} are the same module; one runtime per module "
                          "(accelerate the transformer itself, or give the pipeline two experts)")
    others = _other_denoisers(target, found)
    if others:
        raise PolicyError(
            f"{type(target).__name__} also runs a diffusers transformer in {', '.join(others)}, which dit_accel "
            f"accelerates only as {' or '.join(TRANSFORMER_COMPONENTS)}: accelerating the pipeline would leave it "
            f"running untouched beside the accelerated one. Accelerate the transformers themselves "
            f"(dit_accel.accelerate(pipe.transformer, ...)) if that is what you want")
    return found


def _other_denoisers(target: Any, found: dict[str, torch.nn.Module]) -> list[str]:
    """Modules a pipeline holds, besides ``found``, that are models of ``diffusers.models.transformers``
    (diffusers 0.42.1: Ideogram4Pipeline's ``unconditional_transformer``). Read from the instance's attributes,
    where ``register_modules`` puts every component."""
    kept = {id(m) for m in found.values()}
    return [name for name, module in vars(target).items()
            if name not in found and isinstance(module, torch.nn.Module) and id(unwrap(module)) not in kept
            and type(unwrap(module)).__module__.startswith("diffusers.models.transformers.")]


def _check_attachable(name: str, module: torch.nn.Module, policy: Policy) -> None:
    """Refuse, before anything is attached, what would run twice or cannot run."""
    if getattr(module, _HANDLE, None) is not None:
        raise PolicyError(f"{name} is already accelerated; call dit_accel.remove() on it first")
    if getattr(module, "_cache_config", None) is not None:
        raise PolicyError(f"{name} has diffusers' own cache enabled ({type(module._cache_config).__name__}); two "
                          "caches "
                          f"would both run: call {name}.disable_cache() first")
    # cache-dit (>= 1.0) marks what its enable_cache patched: transformer._is_cached = True beside its own
    # _context_manager / _original_forward (the pipeline's class gets _is_cached and _original_call)
    if module.__dict__.get("_is_cached") is True and any(k in module.__dict__ for k in ("_context_manager",
                                                                                     "_original_forward")):
        raise PolicyError(f"{name} has cache-dit's cache attached (cache_dit.enable_cache); two caches would both "
                          "run: call cache_dit.disable_cache(pipe) first")
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
    pipeline = None if isinstance(target, torch.nn.Module) else target
    runtimes: dict[str, Runtime] = {}
    for name, module in modules.items():  # everything is validated before the first hook is registered
        adapter = get_adapter(module, blocks=blocks, block_returns=block_returns)
        block_list = adapter.blocks(module)
        runtimes[name] = Runtime(module, adapter, block_list, features(policy, adapter, block_list, pipeline, name),
                                 policy=policy, pipeline=pipeline, component=name)
    done: list[Runtime] = []
    try:
        for rt in runtimes.values():
            rt.attach()
            done.append(rt)
    except Exception:
        for rt in done:
            rt.detach()
        raise
    setattr(target, _HANDLE, runtimes)
    if not isinstance(target, torch.nn.Module):
        for name, module in modules.items():
            setattr(module, _HANDLE, {name: runtimes[name]})
    return target


def features(policy: Policy, adapter: ModelAdapter, blocks: list[BlockInfo], pipeline: Any | None,
             component: str = "transformer") -> list[Feature]:
    """The runtime features ``policy`` asks for, in the order they see each call (guidance first: it may
    cut or drop the call before the others see it)."""
    out: list[Feature] = []
    if policy.guidance is not None:
        config = policy.guidance
        if adapter.cfg_layout == "none":
            raise PolicyError(f"guidance: the {adapter.family} adapter runs no classifier-free guidance "
                              "(cfg_layout 'none'); remove the guidance section")
        if isinstance(config, LinearAGConfig):  # LinearAG: replaces the unconditional evaluation on chosen steps
            linear = LinearAG(config, adapter.cfg_layout, cfg_order_for(pipeline, config, adapter.cfg_layout))
            out.append(LinearGuidanceFeature(linear, component))
        else:
            if pipeline is None and config.guidance_scale is None:
                raise PolicyError("guidance.guidance_scale is required for a bare transformer (there is no "
                                  "pipeline to read the guidance scale from)")
            guidance = AdaptiveGuidance(config, adapter.cfg_layout, cfg_order_for(pipeline, config, adapter.cfg_layout))
            out.append(GuidanceFeature(guidance, component))
    if policy.memory is not None:  # before cache: its FFN hooks sit inside sub-block caching's
        out.append(MemoryFeature(policy.memory))
    if policy.cache is not None:
        guard = Guard(policy.guardrails) if policy.guardrails is not None and policy.guardrails.enabled else None
        out.append(CacheFeature(method_for(policy.cache)(policy.cache, blocks, adapter), guard))  # validates the plan
    if policy.attention is not None:
        out.append(AttentionFeature(policy.attention, len(blocks)))
    if policy.quant is not None:
        out.append(QuantFeature(policy.quant))
        compiled = any(b.module.__dict__.get("_compiled_call_impl") is not None for b in blocks)
        if policy.quant.linear in DYNAMIC_ACTIVATION_MODES and policy.compile is None and not compiled:
            logger.warning("dit_accel: quant.linear=%s quantizes activations in separate kernels when the blocks are "
                           "not compiled, which is slower than bf16 (measured 0.4-0.7x); add `compile: {mode: "
                           "regional}` to the policy (or compile the blocks yourself)", policy.quant.linear)
    if policy.compile is not None:
        out.append(CompileFeature(policy.compile))
    return out


def runtimes_of(target: Any) -> dict[str, Runtime]:
    """The runtime of each accelerated transformer of ``target`` (for the layers above: calibration, eval)."""
    return _runtimes(target)


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
        rt.detach()  # hooks, gates, processors off; original weights back, bit-exact
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
