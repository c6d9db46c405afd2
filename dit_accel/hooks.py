"""Step/branch context, per-generation state and the block hooks, built on ``diffusers.hooks``.

Three pieces, none of which patches a class:

* ``StepTracker`` + ``ContextHook`` — torch forward pre/post hooks on the transformer pick, per
  call, the ``BranchState`` of (branch, input shape) and advance that branch's step; the branch
  name ("cond"/"uncond"; "default" where pipelines batch CFG) comes from diffusers'
  ``cache_context`` through a stateful ``ModelHook`` on the first block.
* ``BlockHook`` — a ``ModelHook`` on each transformer block the policy touches: it skips the
  block when its range is reused, adds the cached residual at the range's last block, stores
  fresh residuals, and hands watched inputs/outputs to the caching method.
* ``SchedulerWatch`` — wraps the *instance's* ``scheduler.set_timesteps`` (every diffusers
  pipeline calls it once at the start of ``__call__``): that is where a new generation starts,
  all state is dropped and ``num_inference_steps`` is learnt. A bare transformer (custom loop)
  has no scheduler: a timestep that goes up starts a new generation, or call ``dit_accel.reset``.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .adapters.base import BlockInfo, ModelAdapter, call_argument
from .policies import get_method
from .policies.base import BlockCall, BranchState, CacheMethod, keep, take
from .policy import Policy
from .stats import Stats

logger = logging.getLogger("dit_accel")

CONTEXT_HOOK = "dit_accel.context"
BLOCK_HOOK = "dit_accel.block"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class Runtime:
    """All acceleration state of one transformer under one policy."""

    def __init__(self, transformer: torch.nn.Module, adapter: ModelAdapter, policy: Policy,
                 blocks: list[BlockInfo]) -> None:
        self.transformer = transformer
        self.adapter = adapter
        self.policy = policy
        self.blocks = blocks
        self.method: CacheMethod | None = None
        if policy.cache is not None:
            self.method = get_method(policy.cache.method)(policy.cache, blocks, adapter)
        self.clone_inputs = False
        self.pipeline_driven = False
        self.scheduler_watch: SchedulerWatch | None = None
        self.current: BranchState | None = None
        self.new_generation()

    # ---- generation / call lifecycle -------------------------------------------------------
    def new_generation(self, num_inference_steps: int | None = None) -> None:
        """Drop every cached tensor and counter: the next transformer call is step 0 of a new generation."""
        self.states: dict[tuple, BranchState] = {}
        self.current = None
        self.num_inference_steps = num_inference_steps
        self.calls: dict[str, int] = {}
        self.range_reused = [0] * (len(self.method.plan.ranges) if self.method else 0)
        self.mixed_batch_decisions = 0
        self.released_bytes = 0
        self._last_timestep: dict[str, float] = {}

    def release(self) -> None:
        """Free cached tensors (end of a pipeline call) but keep the call's statistics."""
        self.released_bytes = sum(s.cache_bytes() for s in self.states.values())
        self.mixed_batch_decisions += sum(s.method.get("mixed_batch", 0) for s in self.states.values())
        self.states = {}
        self.current = None

    def begin_call(self, branch: str, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if self.scheduler_watch is not None:
            self.scheduler_watch.follow_scheduler_swap()
        if not self.pipeline_driven:
            self._detect_new_generation(branch, kwargs.get("timestep"))
        key = (branch, tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = BranchState(key=key)
        state.clone_inputs = self.clone_inputs
        state.num_steps = self.num_inference_steps
        state.clone_unverifiable = not self.adapter.inplace_safe
        self.current = state
        self.calls[branch] = self.calls.get(branch, 0) + 1

    def end_call(self) -> None:
        state = self.current
        self.current = None
        if state is None:
            return
        state.step += 1
        if state.method.pop("modified_inplace", False) and not self.clone_inputs:
            self.clone_inputs = True
            logger.warning("dit_accel: a block of %s modified its input in place; block inputs are cloned from "
                           "now on so cached residuals stay correct", type(self.transformer).__name__)

    def _detect_new_generation(self, branch: str, timestep: Any) -> None:
        if timestep is None:
            return
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        last = self._last_timestep.get(branch)
        if last is not None and t > last:
            self.new_generation(self.num_inference_steps)  # a custom loop keeps the step count it gave reset()
        self._last_timestep[branch] = t

    # ---- statistics --------------------------------------------------------------------------
    def stats(self) -> Stats:
        ranges = self.method.plan.ranges if self.method else ()
        total_calls = sum(self.calls.values())
        reused = [0] * len(self.blocks)
        for (start, end), n in zip(ranges, self.range_reused):
            for i in range(start, end):
                reused[i] += n
        mixed = self.mixed_batch_decisions + sum(s.method.get("mixed_batch", 0) for s in self.states.values())
        held = sum(s.cache_bytes() for s in self.states.values()) if self.states else self.released_bytes
        return Stats(policy=self.policy.name, family=self.adapter.family,
                     method=self.method.describe() if self.method else "none",
                     block_names=[b.name for b in self.blocks], num_inference_steps=self.num_inference_steps,
                     calls_per_branch=dict(self.calls),
                     computed=[total_calls - r for r in reused], reused=reused,
                     mixed_batch_decisions=mixed,
                     cache_bytes=held)


class ContextHook(ModelHook):
    """Stateful passthrough hook on the first block: diffusers' ``cache_context`` writes the CFG
    branch name into its ``StateManager``, and diffusers' end-of-call reset reaches it."""

    _is_stateful = True

    def __init__(self, runtime: Runtime) -> None:
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


class StepTracker:
    """Transformer-level step tracking with torch's own forward pre/post hooks.

    Not a diffusers ``ModelHook`` on purpose: ``enable_model_cpu_offload`` re-wraps the
    transformer's ``forward`` at the end of every pipeline call, which silently cuts any
    forward wrapper installed in between; torch's hook dicts survive that in any order.
    """

    def __init__(self, runtime: Runtime, context: ContextHook) -> None:
        self.runtime = runtime
        self.context = context
        module = runtime.transformer
        self.handles = [module.register_forward_pre_hook(self.pre, with_kwargs=True),
                        module.register_forward_hook(self.post, always_call=True)]

    @torch.compiler.disable
    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.runtime.begin_call(self.context.branch(), args, kwargs)

    @torch.compiler.disable
    def post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.runtime.end_call()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class BlockHook(ModelHook):
    """Block-level hook: skip / reuse / store residuals for the block's range, feed watched points."""

    def __init__(self, runtime: Runtime, block: BlockInfo, range_id: int | None, is_start: bool, is_end: bool,
                 watch_in: bool, watch_out: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.block = block
        self.index = block.index
        self.meta = block.meta
        self.has_encoder = block.meta.return_encoder_hidden_states_index is not None
        self.range_id, self.is_start, self.is_end = range_id, is_start, is_end
        self.watch_in, self.watch_out = watch_in, watch_out

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        meta = self.meta
        hidden = call_argument(meta, meta.hidden_states_argument_name, args, kwargs)
        encoder = call_argument(meta, meta.encoder_hidden_states_argument_name, args, kwargs) if self.has_encoder else None
        return hidden, encoder

    def _outputs(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(output, tuple):
            return output, None
        enc_i = self.meta.return_encoder_hidden_states_index
        return output[self.meta.return_hidden_states_index], (output[enc_i] if enc_i is not None else None)

    def _pack(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        if not self.has_encoder:
            return hidden
        out = [None, None]
        out[self.meta.return_hidden_states_index] = hidden
        out[self.meta.return_encoder_hidden_states_index] = encoder
        return tuple(out)

    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        # Per-step decisions run eagerly; the block's own forward is still compiled (as its own
        # frame), so a compiled transformer does not recompile as the step changes.
        rt = self.runtime
        state = rt.current
        forward = self.fn_ref.original_forward
        if state is None:  # called outside a transformer forward: leave it alone
            return forward(*args, **kwargs)
        rid = self.range_id
        method = rt.method
        if self.watch_in:
            method.on_input(BlockCall(self.block, args, kwargs), state)
        if rid is not None:
            if self.is_start:
                reuse = method.should_reuse(rid, state)
                state.reuse[rid] = reuse
                if reuse:
                    rt.range_reused[rid] += 1
                else:
                    hidden, encoder = self._inputs(args, kwargs)
                    keep(state, f"range_in_h:{rid}", hidden)
                    keep(state, f"range_in_e:{rid}", encoder)
            if state.reuse[rid]:
                hidden, encoder = self._inputs(args, kwargs)
                if self.is_end:
                    hidden, encoder = method.reused_output(rid, hidden, encoder, state)
                return self._pack(hidden, encoder)
        output = forward(*args, **kwargs)
        if self.is_end or self.watch_out:
            out_h, out_e = self._outputs(output)
            if self.is_end:
                in_h = take(state, f"range_in_h:{rid}")
                in_e = take(state, f"range_in_e:{rid}")
                if in_h is None:  # modified in place: no trustworthy residual this step
                    state.residuals.pop(rid, None)
                else:
                    res_e = out_e - in_e if (out_e is not None and in_e is not None) else None
                    method.on_range_computed(rid, out_h - in_h, res_e, out_e is None, state)
            if self.watch_out:
                method.on_output(self.index, out_h, out_e, state)
        return output


class SchedulerWatch:
    """Starts a new generation whenever the pipeline calls ``scheduler.set_timesteps``."""

    def __init__(self, pipeline: Any, runtimes: list[Runtime]) -> None:
        self.pipeline_ref = weakref.ref(pipeline)
        self.runtimes = runtimes
        self.scheduler = None
        self.attach(pipeline.scheduler)
        for rt in runtimes:
            rt.pipeline_driven = True
            rt.scheduler_watch = self

    def attach(self, scheduler: Any) -> None:
        original = scheduler.set_timesteps
        runtimes = self.runtimes

        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            n = kwargs.get("num_inference_steps", args[0] if args and isinstance(args[0], int) else None)
            if n is None:
                timesteps = getattr(scheduler, "timesteps", None)
                n = len(timesteps) if timesteps is not None else None
            for rt in runtimes:
                rt.new_generation(num_inference_steps=n)
            return result

        set_timesteps._dit_accel = True
        scheduler.set_timesteps = set_timesteps
        self.scheduler = scheduler

    def detach(self) -> None:
        if self.scheduler is not None and getattr(self.scheduler.__dict__.get("set_timesteps"), "_dit_accel", False):
            del self.scheduler.__dict__["set_timesteps"]
        self.scheduler = None

    def follow_scheduler_swap(self) -> None:
        pipe = self.pipeline_ref()
        if pipe is not None and getattr(pipe, "scheduler", None) is not self.scheduler:
            self.detach()
            self.attach(pipe.scheduler)


def attach(runtime: Runtime) -> None:
    """Register the step hook and the block hooks the runtime's method needs (all or nothing)."""
    transformer = runtime.transformer
    registered: list[tuple[torch.nn.Module, str]] = []
    runtime.tracker = None
    try:
        context = ContextHook(runtime)
        _register(runtime.blocks[0].module, context, CONTEXT_HOOK, registered)
        runtime.tracker = StepTracker(runtime, context)
        method = runtime.method
        if method is not None:
            plan = method.plan
            roles: dict[int, dict] = {}
            for rid, (start, end) in enumerate(plan.ranges):
                for i in range(start, end):
                    roles[i] = {"range_id": rid, "is_start": i == start, "is_end": i == end - 1}
            for i in sorted(set(roles) | plan.watch_inputs | plan.watch_outputs):
                role = roles.get(i, {"range_id": None, "is_start": False, "is_end": False})
                block = runtime.blocks[i]
                hook = BlockHook(runtime, block, watch_in=i in plan.watch_inputs, watch_out=i in plan.watch_outputs,
                                 **role)
                _register(block.module, hook, BLOCK_HOOK, registered)
        _invalidate_registry_cache(transformer)
    except Exception:
        for module, name in reversed(registered):
            _unregister(module, name)
        if runtime.tracker is not None:
            runtime.tracker.remove()
        raise
    runtime.registered = registered


def detach(runtime: Runtime) -> None:
    """Remove every hook ``attach`` registered, leaving the modules as they were."""
    for module, name in reversed(getattr(runtime, "registered", [])):
        _unregister(module, name)
    runtime.registered = []
    if getattr(runtime, "tracker", None) is not None:
        runtime.tracker.remove()
        runtime.tracker = None
    if runtime.scheduler_watch is not None:
        runtime.scheduler_watch.detach()
        runtime.scheduler_watch = None
    _invalidate_registry_cache(runtime.transformer)


def _invalidate_registry_cache(transformer: torch.nn.Module) -> None:
    """diffusers caches which submodules carry registries (for ``cache_context``): refresh it."""
    if hasattr(transformer, "_diffusers_hook"):
        transformer._diffusers_hook.invalidate_child_registries_cache()


def _register(module: torch.nn.Module, hook: ModelHook, name: str, registered: list) -> None:
    had_registry = hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if name in registry.hooks:
        raise RuntimeError(f"{type(module).__name__} already carries a {name!r} hook; call dit_accel.remove first")
    registry.register_hook(hook, name)
    hook._dit_accel_owns_registry = not had_registry
    hook._dit_accel_forward = module.forward
    registered.append((module, name))


def _unregister(module: torch.nn.Module, name: str) -> None:
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
