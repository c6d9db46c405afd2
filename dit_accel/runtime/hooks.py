"""The hooks the runtime core puts on a transformer, none of which patches a class.

* :class:`ContextHook` — a stateful, passthrough ``diffusers.hooks.ModelHook`` on the first block:
  diffusers' ``cache_context("cond" / "uncond")`` writes the CFG branch name into its state manager,
  and diffusers' end-of-call ``reset_stateful_hooks`` reaches it.
* :class:`StepTracker` — torch's own forward pre/post hooks on the transformer (not a ``ModelHook``:
  ``enable_model_cpu_offload`` re-wraps the transformer's ``forward`` at the end of every pipeline call,
  which silently cuts any forward wrapper installed in between; torch's hook dicts survive that).
* :class:`BranchOrder` — the CFG branch of separate-CFG pipelines that call the transformer outside
  ``cache_context`` (``ModelAdapter.cfg_context`` False), told by the calls' order within a step.
* :class:`EndOfCall` — ``_reset_stateful_cache`` for transformers without diffusers' ``CacheMixin``.
* ``register`` / ``unregister`` — ``HookRegistry`` bookkeeping that leaves no registry or forward
  override behind, also when accelerate's offload hooks wrapped the forward after us.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

if TYPE_CHECKING:  # pragma: no cover
    from .core import Runtime

CONTEXT_HOOK = "dit_accel.context"
BLOCK_HOOK = "dit_accel.block"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class ContextHook(ModelHook):
    """Stateful passthrough hook on the first block (see the module docstring)."""

    _is_stateful = True

    def __init__(self, runtime: "Runtime") -> None:
        super().__init__()
        self.runtime = runtime
        self.context = StateManager(_NoState)

    def branch(self) -> str:
        ctx = self.context._context
        return ctx.name if ctx is not None else "default"

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # diffusers pipelines call this at the end of every __call__ (maybe_free_model_hooks):
        # free the cached tensors, keep the statistics of the call that just ended.
        self.runtime.release()
        return module


class BranchOrder:
    """The CFG branch of a call that came outside diffusers' ``cache_context``, from the calls' order.

    ChromaPipeline and Lumina2Pipeline (diffusers 0.42.1) run each denoising step as a conditional call and
    then, with guidance, an unconditional call at the same timestep, with no ``cache_context`` around
    either: both would land in the one ``"default"`` branch, the second call of a step reading the first
    one's cache and every step counted twice. Here the first call at a timestep is ``"cond"`` and a further
    call at the same timestep ``"uncond"``. Comparing timesteps reads one value per call (a host sync on
    an accelerator: one per transformer call, next to a whole forward). A call without a ``timestep`` stays
    ``"default"``.
    """

    def __init__(self) -> None:
        self.last: float | None = None

    def branch(self, runtime: "Runtime", kwargs: dict) -> str:
        timestep = kwargs.get("timestep")
        if timestep is None:
            return "default"
        if runtime.ended:  # the previous pipeline call ended: this call starts the next one
            self.last = None
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self.last is not None and t == self.last:
            return "uncond"
        self.last = t
        return "cond"


class StepTracker:
    """Transformer-level ``before_call`` / ``after_call`` through torch's forward pre/post hooks."""

    def __init__(self, runtime: "Runtime", context: ContextHook) -> None:
        self.runtime = runtime
        self.context = context
        self.order = None if getattr(runtime.adapter, "cfg_context", True) else BranchOrder()
        module = runtime.transformer
        self.handles = [module.register_forward_pre_hook(self.pre, with_kwargs=True),
                        module.register_forward_hook(self.post, always_call=True)]

    @torch.compiler.disable
    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        branch = self.context.branch()
        if branch == "default" and self.order is not None and self.runtime.adapter.cfg_layout == "separate":
            branch = self.order.branch(self.runtime, kwargs)
        return self.runtime.before_call(branch, args, kwargs)

    @torch.compiler.disable
    def post(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        return self.runtime.after_call(output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class EndOfCall:
    """Frees cached tensors at the end of every pipeline call, for transformers without diffusers' ``CacheMixin``.

    diffusers pipelines end ``__call__`` with ``maybe_free_model_hooks``, which calls
    ``component._reset_stateful_cache()`` on every component that has it. ``CacheMixin`` models
    (Flux, Wan, HunyuanVideo, CogVideoX) reset their stateful hooks there, our ``ContextHook``
    among them. SD3, PixArt and DiT have no such method: this gives the transformer *instance* one
    (an instance attribute, removed by ``remove``; the class is untouched), so every pipeline that
    holds the transformer, not only the one passed to ``accelerate``, ends its generations.
    """

    NAME = "_reset_stateful_cache"

    def __init__(self, runtime: "Runtime") -> None:
        self.transformer = runtime.transformer
        self.installed = not hasattr(type(self.transformer), self.NAME) and self.NAME not in self.transformer.__dict__
        if self.installed:
            release = runtime.release

            def reset_stateful_cache(recurse: bool = True) -> None:
                release()

            reset_stateful_cache._dit_accel = True
            object.__setattr__(self.transformer, self.NAME, reset_stateful_cache)

    def remove(self) -> None:
        if self.installed and getattr(self.transformer.__dict__.get(self.NAME), "_dit_accel", False):
            del self.transformer.__dict__[self.NAME]
        self.installed = False


def invalidate_registry_cache(transformer: torch.nn.Module) -> None:
    """diffusers caches which submodules carry registries (for ``cache_context``): refresh it."""
    if hasattr(transformer, "_diffusers_hook"):
        transformer._diffusers_hook.invalidate_child_registries_cache()


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Add ``hook`` to ``module``'s diffusers registry under ``name`` (made if missing, removed with the hook)."""
    had_registry = hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if name in registry.hooks:
        raise RuntimeError(f"{type(module).__name__} already carries a {name!r} hook; call dit_accel.remove first")
    registry.register_hook(hook, name)
    hook._dit_accel_owns_registry = not had_registry
    hook._dit_accel_forward = module.forward


def unregister(module: torch.nn.Module, name: str) -> None:
    """Remove what :func:`register` added; the module is as it was (accelerate's offload wrapper kept)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return
    hook = registry.hooks[name]
    current = module.forward
    wrapped_after_us = registry._hook_order[-1] == name and current is not hook._dit_accel_forward
    registry.remove_hook(name, recurse=False)
    if wrapped_after_us:
        # Something outside diffusers' registry (accelerate's cpu-offload hook) wrapped our forward:
        # point its inner forward at the restored one and keep its wrapper in place.
        if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
            module._old_forward = module.forward
            module.forward = current
        else:
            raise RuntimeError(
                f"{type(module).__name__}.forward was wrapped by another library after dit_accel.accelerate; "
                "remove that wrapper first (undo in the reverse order of application)")
    if not registry.hooks and hook._dit_accel_owns_registry:
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is type(module).forward and forward.__self__ is module:
            del module.__dict__["forward"]
        del module._diffusers_hook
