"""Step/branch context, per-generation state and the block hooks, built on ``diffusers.hooks``.

Three pieces, none of which patches a class:

* ``StepTracker`` + ``ContextHook`` — torch forward pre/post hooks on the transformer pick, per
  call, the ``BranchState`` of (branch, input shape) and advance that branch's step; the branch
  name ("cond"/"uncond"; "default" where pipelines batch CFG) comes from diffusers'
  ``cache_context`` through a stateful ``ModelHook`` on the first block.
* ``BlockHook`` — a ``ModelHook`` on each transformer block the policy touches: it skips the
  block when its range is reused, adds the cached residual at the range's last block, stores
  fresh residuals, and hands watched inputs/outputs to the caching method.
* Generation boundaries (:mod:`dit_accel.generation`): at every transformer call the runtime
  finds the pipeline call in progress and its schedule; a new schedule is a new generation, and
  the end of every pipeline call (diffusers' ``_reset_stateful_cache``) frees cached tensors. A
  bare transformer (custom loop) has no pipeline: a timestep that goes up starts a new generation,
  or call ``dit_accel.reset``.

With a ``guidance`` section (Adaptive Guidance, :mod:`dit_accel.policies.adaptive_guidance`) the
transformer-level hooks also compare the conditional and guided predictions after each step and,
once the unconditional branch is dropped, either cut a batched CFG call to its conditional rows
(the pre hook slices the arguments, the post hook completes the output with the conditional rows
in both halves) or turn a separate "uncond" call into a passthrough of every block whose output
is replaced by the same step's conditional output.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .adapters.base import BlockInfo, ModelAdapter, call_argument
from .config import PolicyError
from .inspection import RuntimeView
from .generation import Plan, ScheduleMarker, planned_calls, running_pipeline
from .policies import get_method
from .policies.adaptive_guidance import (COND, UNCOND, AdaptiveGuidance, cfg_order_for, output_sample,
                                         pipeline_guidance_scale, pipeline_runs_cfg, replace_sample,
                                         slice_batched)
from .policies.base import BlockCall, BranchState, CacheMethod, CachePlan, RangeLinks, keep, take
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
                 blocks: list[BlockInfo], pipeline: Any | None = None, component: str = "transformer") -> None:
        self.transformer = transformer
        self.adapter = adapter
        self.policy = policy
        self.blocks = blocks
        if policy.calibrated_for is not None:
            policy.calibrated_for.check_model(transformer, len(blocks))
        self.method: CacheMethod | None = None
        if policy.cache is not None:
            self.method = get_method(policy.cache.method)(policy.cache, blocks, adapter)
        self.guidance: AdaptiveGuidance | None = None
        self.pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.component = component
        if policy.guidance is not None:
            config = policy.guidance
            if adapter.cfg_layout == "none":
                raise PolicyError(f"guidance: the {adapter.family} adapter runs no classifier-free guidance "
                                  "(cfg_layout 'none'); remove the guidance section")
            if pipeline is None and config.guidance_scale is None:
                raise PolicyError("guidance.guidance_scale is required for a bare transformer (there is no "
                                  "pipeline to read the guidance scale from)")
            self.guidance = AdaptiveGuidance(config, adapter.cfg_layout,
                                             cfg_order_for(pipeline, config, adapter.cfg_layout))
        self.skipping = False
        self._warned_no_scale = False
        self._warned: set[str] = set()
        self.clone_inputs = False
        self.marker = ScheduleMarker()
        self.custom_plan = Plan()  # what dit_accel.reset() said for custom loops
        self.pipeline_now: Any | None = None  # the pipeline whose call is in progress
        self.current: BranchState | None = None
        self.attention = None
        if policy.attention is not None:  # block-sparse self-attention (dit_accel.attention)
            from .attention.processor import AttentionController

            self.attention = AttentionController(self, policy.attention)
        self.new_generation()

    # ---- generation / call lifecycle -------------------------------------------------------
    def new_generation(self, plan: Plan | None = None) -> None:
        """Drop every cached tensor and counter: the next transformer call is step 0 of a new generation."""
        self.states: dict[tuple, BranchState] = {}
        self.current = None
        self.plan = plan or Plan()
        self.ended = False
        self.calls: dict[str, int] = {}
        self.range_reused = [0] * (len(self.method.plan.ranges) if self.method else 0)
        self.mixed_batch_decisions = 0
        self.released_bytes = 0
        self._last_timestep: dict[str, float] = {}
        # Adaptive Guidance, per generation
        self.guidance_switched: dict[str, bool] = {}
        self.guidance_switch_step: dict[str, int] = {}
        self.guidance_skipped = 0
        self.guidance_active: bool | None = None  # batched CFG on in this generation (guidance scale > 1)
        self._pending_cond: tuple | None = None  # (cond prediction, timestep, hidden shape) of separate CFG
        self._call: tuple | None = None  # what the guidance does with the call in progress
        self.skipping = False
        if self.attention is not None:
            self.attention.new_generation()

    def reset(self, num_inference_steps: int | None = None) -> None:
        """``dit_accel.reset``: a new generation of ``num_inference_steps`` calls per branch (custom loops)."""
        self.custom_plan = Plan(calls=num_inference_steps, num_inference_steps=num_inference_steps)
        self.marker.clear()
        self.new_generation(self.custom_plan)

    def release(self) -> None:
        """Free cached tensors (end of a pipeline call) but keep the call's statistics; the next call
        starts a new generation."""
        self.ended = True
        if self.states:  # a second release (two reset paths) keeps the first one's numbers
            self.released_bytes = sum(s.cache_bytes() for s in self.states.values())
            self.mixed_batch_decisions += sum(s.method.get("mixed_batch", 0) for s in self.states.values())
        self.states = {}
        self.current = None
        self._pending_cond = None
        self._call = None
        self.skipping = False

    # ---- Adaptive Guidance -------------------------------------------------------------------
    def _guidance_scale(self) -> tuple[float | None, float | None]:
        """(w for the guided prediction, the pipeline's own CFG scale) of the call in progress."""
        pipe = self.pipeline_now
        own = pipeline_guidance_scale(pipe, self.component) if pipe is not None else None
        w = self.guidance.config.guidance_scale
        w = own if w is None else w
        if w is None and not self._warned_no_scale:
            self._warned_no_scale = True
            logger.warning("dit_accel: adaptive guidance cannot find the guidance scale of %s; set "
                           "guidance.guidance_scale in the policy (the unconditional branch is kept)",
                           type(pipe).__name__)
        return w, own

    def sync_generation(self, branch: str, kwargs: dict) -> None:
        """Start a new generation if this call does not belong to the current one (see dit_accel.generation)."""
        registered = self.pipeline_ref() if self.pipeline_ref is not None else None
        pipe = running_pipeline(registered)
        self.pipeline_now = pipe
        if pipe is not None:
            new = self.marker.is_new(pipe)
            if new or (new is not None and self.ended):
                self.new_generation(planned_calls(pipe, self.component))
                made_for = self.policy.calibrated_for
                if made_for is not None:
                    scheduler = getattr(pipe, "scheduler", None)
                    for message in made_for.warnings(self.plan.calls, type(scheduler).__name__ if scheduler else None):
                        self.warn_once(message, message)
                return
            if new is not None:
                return
        if self.ended:
            self.new_generation(self.custom_plan)
        self._detect_new_generation(branch, kwargs.get("timestep"))

    def before_call(self, branch: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Pre-hook work: the generation boundary, the guidance's decision for this call, then the cache
        state. Returns replaced (args, kwargs) when a batched call runs on its conditional rows only."""
        self.sync_generation(branch, kwargs)
        self._call = None
        replaced = None
        if self.guidance is not None:
            replaced = self._guidance_before(branch, args, kwargs)
            if self._call is not None and self._call[0] == "skip":
                self.skipping = True
                self.current = None
                self.guidance_skipped += 1
                return None
            if replaced is not None:
                args, kwargs = replaced
        self.begin_call(branch, args, kwargs)
        return replaced

    def _guidance_before(self, branch: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim == 0:
            return None
        timestep = kwargs.get("timestep")
        if branch == COND:
            self._call = ("cond", timestep, tuple(hidden.shape))
            return None
        if branch == UNCOND:
            pending, self._pending_cond = self._pending_cond, None
            if pending is None or pending[2] != tuple(hidden.shape) or not _same_timestep(pending[1], timestep):
                return None  # no conditional prediction of this very step: run as usual
            self._call = ("skip" if self.guidance_switched.get(UNCOND) else "uncond", pending[0])
            return None
        if self.guidance.cfg_layout != "batched":
            return None
        batch = hidden.shape[0]
        if batch % 2:
            return None
        if self.guidance_switched.get(branch):
            self._call = ("half", batch)
            self.guidance_skipped += 1
            return self.guidance.slice_call(args, kwargs, batch)
        w, own = self._guidance_scale()
        if self.guidance_active is None:  # once per generation: does this pipeline call batch CFG at all?
            pipe = self.pipeline_now
            active = pipeline_runs_cfg(pipe, own) if pipe is not None else None
            self.guidance_active = True if active is None else active  # bare transformer: the policy says so
        if self.guidance_active and w is not None:
            self._call = ("full", batch, w)
        return None

    def after_call(self, output: Any) -> Any:
        """Post-hook work: close the cache state, then complete / replace the output or check the switch."""
        call, self._call = self._call, None
        if call is not None and call[0] == "skip":
            self.skipping = False
            sample = output_sample(output)
            if sample is None:
                return None
            return replace_sample(output, call[1].clone())
        state = self.current
        step = state.step if state is not None else None
        adjusted = None  # a caching method's correction of the model output (ERTACache's step-size adjustment)
        if state is not None and output is not None and getattr(self.method, "adjust_output", None) is not None:
            adjusted = self.method.adjust_output(output, state)
            output = output if adjusted is None else adjusted
        self.end_call()
        if call is None or output is None:
            return adjusted
        kind = call[0]
        if kind == "half":
            return self.guidance.complete_output(output, call[1] // 2)
        sample = output_sample(output)
        if sample is None or step is None:
            return adjusted
        g = self.guidance
        if kind == "cond":
            self._pending_cond = (sample, call[1], call[2])
        elif kind == "uncond":
            w, _ = self._guidance_scale()
            if w is not None and g.may_switch(step) and g.converged(call[1], sample, w):
                self.guidance_switched[UNCOND] = True
                self.guidance_switch_step[UNCOND] = step + 1
        elif kind == "full":
            branch, batch, w = state.key[0], call[1], call[2]
            if g.may_switch(step):
                cond, uncond = g.halves(sample)
                if g.converged(cond, uncond, w):
                    self.guidance_switched[branch] = True
                    self.guidance_switch_step[branch] = step + 1
                    self._halve_state(state, batch)
        return adjusted

    def _halve_state(self, state: BranchState, batch: int) -> None:
        """Move a batched branch's cache state to the conditional rows (the calls it will see from now on)."""
        rows = self.guidance.cond_rows(batch)
        branch, shape = state.key
        self.states.pop(state.key, None)
        state.key = (branch, (batch // 2, *shape[1:]) if shape else shape)
        state.residuals = slice_batched(state.residuals, batch, rows)
        state.method = slice_batched(state.method, batch, rows)
        self.states[state.key] = state

    def begin_call(self, branch: str, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        key = (branch, tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None)
        state = self.states.get(key)
        if state is None:
            if self.policy.calibrated_for is not None and self.method is not None:
                self.policy.calibrated_for.check_branch(branch)
            state = self.states[key] = BranchState(key=key)
        state.clone_inputs = self.clone_inputs
        state.num_steps = self.plan.calls
        state.schedule_offset = self.plan.offset
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
            self.new_generation(self.custom_plan)  # a custom loop keeps the step count it gave reset()
        self._last_timestep[branch] = t

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    # ---- statistics --------------------------------------------------------------------------
    def view(self) -> RuntimeView:
        """A read-only snapshot (``dit_accel.inspect``)."""
        hooked = tuple(b.name for b in self.blocks
                       if BLOCK_HOOK in getattr(getattr(b.module, "_diffusers_hook", None), "hooks", {}))
        return RuntimeView(component=self.component, family=self.adapter.family, policy=self.policy,
                           block_names=tuple(b.name for b in self.blocks), hooked_blocks=hooked,
                           planned_calls=self.plan.calls, schedule_offset=self.plan.offset,
                           branches={key: state.step for key, state in self.states.items()},
                           held_bytes=sum(s.cache_bytes() for s in self.states.values()),
                           clone_inputs=self.clone_inputs, generation_open=not self.ended)

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
                     block_names=[b.name for b in self.blocks], num_inference_steps=self.plan.num_inference_steps,
                     planned_calls=self.plan.calls,
                     calls_per_branch=dict(self.calls),
                     computed=[total_calls - r for r in reused], reused=reused,
                     mixed_batch_decisions=mixed,
                     cache_bytes=held,
                     guidance=self.guidance.describe() if self.guidance else "none",
                     guidance_skipped_calls=self.guidance_skipped,
                     guidance_switch_step=dict(self.guidance_switch_step),
                     extra={"attention": self.attention.stats()} if self.attention is not None else {})


def _same_timestep(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
    return a == b


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
    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return self.runtime.before_call(self.context.branch(), args, kwargs)

    @torch.compiler.disable
    def post(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        return self.runtime.after_call(output)

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
        if rt.skipping:  # an unconditional call dropped by Adaptive Guidance: every block is a passthrough
            return self._pack(*self._inputs(args, kwargs))
        state = rt.current
        forward = self.fn_ref.original_forward
        if state is None:  # called outside a transformer forward: leave it alone
            return forward(*args, **kwargs)
        rid = self.range_id
        method = rt.method
        multi, links = False, None
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
            multi = not (self.is_start and self.is_end)
            if multi:  # what the transformer adds between this range's blocks (ControlNet residuals)
                links = RangeLinks() if self.is_start else state.links.get(rid)
                if self.is_start:
                    state.links[rid] = links
                if links is not None and not self.is_start:
                    links.block_called(*self._inputs(args, kwargs))
        output = forward(*args, **kwargs)
        if rid is not None and multi and not self.is_end and links is not None:
            links.block_returned(*self._outputs(output))
        if self.is_end or self.watch_out:
            out_h, out_e = self._outputs(output)
            if self.is_end:
                in_h = take(state, f"range_in_h:{rid}")
                in_e = take(state, f"range_in_e:{rid}")
                links = state.links.pop(rid, None)
                if in_h is None or (links is not None and links.broken):
                    # modified in place, or changed between blocks other than by an addition: no
                    # trustworthy residual this step
                    state.residuals.pop(rid, None)
                    if links is not None and links.broken:
                        rt.warn_once("links", "dit_accel: %s changes the hidden states between cached blocks "
                                     "other than by an addition; that range is computed on every step",
                                     type(rt.transformer).__name__)
                else:
                    res_h = out_h - in_h
                    res_e = out_e - in_e if (out_e is not None and in_e is not None) else None
                    if links is not None and links.hidden is not None:
                        res_h = res_h - links.hidden
                    if links is not None and links.encoder is not None and res_e is not None:
                        res_e = res_e - links.encoder
                    method.on_range_computed(rid, res_h, res_e, out_e is None, state)
            if self.watch_out:
                method.on_output(self.index, out_h, out_e, state)
        return output


class EndOfCall:
    """Frees cached tensors at the end of every pipeline call, for transformers without diffusers' ``CacheMixin``.

    diffusers pipelines end ``__call__`` with ``maybe_free_model_hooks``, which calls
    ``component._reset_stateful_cache()`` on every component that has it. ``CacheMixin`` models
    (Flux, Wan, HunyuanVideo, CogVideoX) reset their stateful hooks there, our ``ContextHook``
    among them. SD3, PixArt and DiT have no such method: this gives the transformer *instance* one
    (an instance attribute, removed by ``detach``; the class is untouched), so every pipeline that
    holds the transformer, not only the one passed to ``accelerate``, ends its generations.
    """

    NAME = "_reset_stateful_cache"

    def __init__(self, runtime: Runtime) -> None:
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


def attach(runtime: Runtime) -> None:
    """Register the step hook and the block hooks the runtime's method needs (all or nothing)."""
    transformer = runtime.transformer
    registered: list[tuple[torch.nn.Module, str]] = []
    runtime.tracker = None
    runtime.end_of_call = None
    try:
        context = ContextHook(runtime)
        _register(runtime.blocks[0].module, context, CONTEXT_HOOK, registered)
        runtime.tracker = StepTracker(runtime, context)
        runtime.end_of_call = EndOfCall(runtime)
        method = runtime.method
        plan = method.plan if method is not None else CachePlan(ranges=())
        roles: dict[int, dict] = {}
        for rid, (start, end) in enumerate(plan.ranges):
            for i in range(start, end):
                roles[i] = {"range_id": rid, "is_start": i == start, "is_end": i == end - 1}
        hooked = set(roles) | plan.watch_inputs | plan.watch_outputs
        if runtime.guidance is not None:  # a dropped unconditional call passes through every block
            hooked = set(range(len(runtime.blocks)))
        for i in sorted(hooked):
            role = roles.get(i, {"range_id": None, "is_start": False, "is_end": False})
            block = runtime.blocks[i]
            hook = BlockHook(runtime, block, watch_in=i in plan.watch_inputs, watch_out=i in plan.watch_outputs,
                             **role)
            _register(block.module, hook, BLOCK_HOOK, registered)
        _invalidate_registry_cache(transformer)
        if runtime.attention is not None:
            runtime.attention.attach()
    except Exception:
        for module, name in reversed(registered):
            _unregister(module, name)
        if runtime.tracker is not None:
            runtime.tracker.remove()
        if runtime.end_of_call is not None:
            runtime.end_of_call.remove()
        raise
    runtime.registered = registered


def detach(runtime: Runtime) -> None:
    """Remove every hook ``attach`` registered, leaving the modules as they were."""
    if getattr(runtime, "attention", None) is not None:
        runtime.attention.detach()
    for module, name in reversed(getattr(runtime, "registered", [])):
        _unregister(module, name)
    runtime.registered = []
    if getattr(runtime, "tracker", None) is not None:
        runtime.tracker.remove()
        runtime.tracker = None
    if getattr(runtime, "end_of_call", None) is not None:
        runtime.end_of_call.remove()
        runtime.end_of_call = None
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
