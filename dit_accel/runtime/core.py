"""The runtime core: one transformer, its adapter and blocks, its generations and CFG branches, its features.

Per transformer call (:class:`~dit_accel.runtime.hooks.StepTracker`), the core finds the generation
the call belongs to (:mod:`dit_accel.runtime.generation`), lets the features prepare the call, picks
the state of its (CFG branch, input shape) — one typed state per feature, made fresh in every
generation — hands every feature the call's read-only step context, and after the call advances the
branch's step. Blocks a feature decides or watches are gated before any compiled code runs
(:mod:`dit_accel.runtime.blocks`). What the features do is theirs (:mod:`dit_accel.runtime.feature`).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.base import BlockInfo, ModelAdapter
from ..context import StepContext
from ..inspection import RuntimeView
from ..stats import Stats
from .blocks import Gates
from .feature import Call, Feature, Host
from .generation import Plan, ScheduleMarker, planned_calls, running_pipeline
from .parallel import shard_group
from .hooks import CONTEXT_HOOK, ContextHook, EndOfCall, StepTracker, invalidate_registry_cache, register, unregister
from .state import tensor_bytes

logger = logging.getLogger("dit_accel")


@dataclass(eq=False)
class BranchState:
    """One (generation, CFG branch, input shape): its step and each feature's state."""

    key: tuple
    step: int = 0
    slots: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """Everything attached to one transformer under one policy (see the module docstring)."""

    def __init__(self, transformer: torch.nn.Module, adapter: ModelAdapter, blocks: list[BlockInfo],
                 features: list[Feature], *, policy: Any, pipeline: Any | None = None,
                 component: str = "transformer") -> None:
        self.transformer = transformer
        self.adapter = adapter
        self.blocks = blocks
        self.features = features
        self.policy = policy
        self.pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.component = component
        self.host = Host(transformer, adapter, blocks, component)
        if policy.calibrated_for is not None:
            policy.calibrated_for.check_model(transformer, len(blocks))
        self.clone_inputs = False
        self.marker = ScheduleMarker()
        self.custom_plan = Plan()  # what dit_accel.reset() said for custom loops
        self.pipeline_now: Any | None = None  # the pipeline whose call is in progress
        self.call: Call | None = None
        self.gates = Gates(self)
        self._warned: set[str] = set()
        self._hooks: list[Any] = []
        self.new_generation()

    def feature(self, name: str) -> Feature:
        """The attached feature called ``name`` ("cache", "guidance", "attention", "quant")."""
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"no {name!r} feature on this runtime (features: {[f.name for f in self.features]})")

    # ---- attach / detach --------------------------------------------------------------------
    def attach(self) -> None:
        """Register the hooks, gates and features (all or nothing)."""
        done: list[Feature] = []
        first = self.blocks[0].module
        try:
            self.context = ContextHook(self)
            register(first, self.context, CONTEXT_HOOK)
            self._hooks = [StepTracker(self, self.context), EndOfCall(self)]
            deciding = {i: f for f in self.features for i in f.gated_blocks()}
            passthrough = any(f.passes_through for f in self.features)
            watched = set().union(*(f.watched_blocks() for f in self.features))
            gated = [b for b in self.blocks if passthrough or b.index in deciding or b.index in watched]
            self.gates.install(gated, deciding)
            invalidate_registry_cache(self.transformer)
            for feature in self.features:
                feature.attach(self.host)
                done.append(feature)
        except Exception:
            for feature in reversed(done):
                feature.detach()
            self._detach_hooks()
            raise

    def detach(self) -> None:
        """Remove everything :meth:`attach` registered, leaving the modules as they were."""
        for feature in reversed(self.features):
            feature.detach()
        self._detach_hooks()

    def _detach_hooks(self) -> None:
        self.gates.remove()
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks = []
        unregister(self.blocks[0].module, CONTEXT_HOOK)
        invalidate_registry_cache(self.transformer)

    # ---- generations --------------------------------------------------------------------------
    def new_generation(self, plan: Plan | None = None) -> None:
        """Drop every cached tensor and counter: the next transformer call is step 0 of a new generation."""
        self.states: dict[tuple, BranchState] = {}
        self.plan = plan or Plan()
        self.ended = False
        self.calls: dict[str, int] = {}
        self.last_call: tuple[str, int] | None = None
        self._last_timestep: dict[str, float] = {}
        for feature in self.features:
            feature.new_generation()

    def reset(self, num_inference_steps: int | None = None) -> None:
        """``dit_accel.reset``: a new generation of ``num_inference_steps`` calls per branch (custom loops)."""
        self.custom_plan = Plan(calls=num_inference_steps, num_inference_steps=num_inference_steps)
        self.marker.clear()
        self.new_generation(self.custom_plan)

    def release(self) -> None:
        """Free cached tensors (end of a pipeline call) but keep the call's statistics; the next call
        starts a new generation."""
        self.ended = True
        self.states = {}
        self.call = None
        for feature in self.features:
            feature.release()

    def sync_generation(self, branch: str, kwargs: dict) -> None:
        """Start a new generation if this call does not belong to the current one (see runtime.generation)."""
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
                        self.warn_once(message)
                return
            if new is not None:
                return
        if self.ended:
            self.new_generation(self.custom_plan)
        timestep = kwargs.get("timestep")
        if timestep is not None:  # custom loops: a timestep that goes up starts a new generation
            t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            last = self._last_timestep.get(branch)
            if last is not None and t > last:
                self.new_generation(self.custom_plan)
            self._last_timestep[branch] = t

    # ---- per call -----------------------------------------------------------------------------
    def before_call(self, branch: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Transformer pre-hook: returns replaced (args, kwargs) when a feature changed them."""
        self.gates.follow()
        self.sync_generation(branch, kwargs)
        call = Call(branch, args, kwargs, self.pipeline_now, _rekey=self._rekey, _flag_inplace=self._flag_inplace)
        for feature in self.features:
            feature.prepare(call)
        self.call = call
        if call.passthrough:
            return None
        hidden = call.kwargs.get("hidden_states", call.args[0] if call.args else None)
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None
        state = self.states.get((branch, shape))
        ctx = StepContext(branch, shape, 0 if state is None else state.step, self.plan.calls, self.plan.offset,
                          self.clone_inputs, not self.adapter.inplace_safe, shard_group(self.transformer))
        if state is None:
            if self.policy.calibrated_for is not None and self.policy.cache is not None:
                self.policy.calibrated_for.check_branch(branch)
            state = self.states[ctx.key] = BranchState(ctx.key)
            for feature in self.features:
                slot = feature.new_state(ctx)
                if slot is not None:
                    state.slots[feature.name] = slot
        call.ctx, call.slots = ctx, state.slots
        self.calls[branch] = self.calls.get(branch, 0) + 1
        for feature in self.features:
            feature.before_call(call)
        return (call.args, call.kwargs) if call.replaced else None

    def after_call(self, output: Any) -> Any:
        """Transformer post-hook: the features' replaced output (or None: unchanged)."""
        call = self.call
        if call is None:
            return None
        if call.ctx is not None:  # the call's context keeps the step it ran at
            state = self.states.get(call.ctx.key)
            if state is not None:
                state.step += 1
            self.last_call = (call.branch, call.ctx.step)
        result = None
        try:
            for feature in reversed(self.features):
                replaced = feature.after_call(call, output if result is None else result)
                if replaced is not None:
                    result = replaced
        finally:
            self.call = None
        return result

    def _rekey(self, shape: tuple | None, transform) -> None:
        call = self.call  # the call in progress (features call this from after_call)
        state = self.states.pop(call.ctx.key, None)
        if state is None:
            return
        state.key = (call.branch, shape)
        state.slots = {name: transform(slot) for name, slot in state.slots.items()}
        self.states[state.key] = state

    def _flag_inplace(self) -> None:
        if not self.clone_inputs:
            self.clone_inputs = True
            logger.warning("dit_accel: a block of %s modified its input in place; block inputs are cloned from "
                           "now on so cached residuals stay correct", type(self.transformer).__name__)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    # ---- statistics ---------------------------------------------------------------------------
    def held_bytes(self) -> int:
        return tensor_bytes([s.slots for s in self.states.values()])

    def view(self) -> RuntimeView:
        """A read-only snapshot (``dit_accel.inspect``)."""
        gated = {g.block.name for g in self.gates.gates}
        return RuntimeView(component=self.component, family=self.adapter.family, policy=self.policy,
                           block_names=tuple(b.name for b in self.blocks),
                           hooked_blocks=tuple(b.name for b in self.blocks if b.name in gated),
                           compiled_blocks=self.gates.compiled, planned_calls=self.plan.calls,
                           schedule_offset=self.plan.offset,
                           branches={key: state.step for key, state in self.states.items()},
                           held_bytes=self.held_bytes(), clone_inputs=self.clone_inputs,
                           generation_open=not self.ended, last_call=self.last_call,
                           current_call=None if self.call is None or self.call.ctx is None
                           else (self.call.branch, self.call.ctx.step))

    def stats(self) -> Stats:
        fields: dict[str, Any] = {}
        for feature in self.features:
            fields.update(feature.stats())
        total = sum(self.calls.values())
        reused = fields.pop("reused", [0] * len(self.blocks))
        fields.pop("held_bytes", None)
        extra = {key: fields.pop(key) for key in list(fields) if key not in Stats.__dataclass_fields__}
        return Stats(policy=self.policy.name, family=self.adapter.family,
                     method=fields.pop("method", "none"), block_names=[b.name for b in self.blocks],
                     num_inference_steps=self.plan.num_inference_steps, planned_calls=self.plan.calls,
                     calls_per_branch=dict(self.calls), computed=[total - r for r in reused], reused=reused,
                     extra=extra, **fields)
