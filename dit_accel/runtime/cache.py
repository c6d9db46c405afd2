"""The caching feature: runs one :class:`~dit_accel.caching.base.CacheMethod` on the transformer's blocks.

For every gated block it skips the block when its range is reused, adds the cached residual at the
range's last block, stores fresh residuals and hands watched inputs / outputs to the method. The
method's typed ``State`` is made by the runtime per (generation, CFG branch, input shape).

A range's residual excludes what the transformer's own loop adds between the range's blocks
(:class:`RangeLinks`): diffusers' Flux and SD3 add ControlNet residuals there
(``hidden_states = hidden_states + controlnet_block_samples[i]``). On a reused step the skipped
blocks pass their input through, the loop adds *this* step's additions again, and the range's last
block adds the cached residual — so the cached residual must be the sum of the blocks' own work.

A range may span the place where the transformer joins its text and image streams into one
(``ModelAdapter.join_group``: FLUX.2, Chroma, AuraFlow concatenate ``[text, image]`` after their
double-stream blocks). Its residual is then kept in the joined layout: the range's last block returns
``joined output − join(input image, input text)``. On a reused step every skipped block passes its input
through, the transformer joins the passed-through streams, and the last block receives exactly that
joined input, to which the residual is added. What the transformer adds across the join (the
concatenation itself excepted) is a link like any other.

Sub-blocks (``CachePlan.sub_blocks``, the adapter's attention / FFN sub-modules: ``ModelAdapter.sub_blocks``):
their block always runs, and each sub-module's ``forward`` is overridden (:mod:`dit_accel.runtime.overrides`) to
return the output the method chose before the block started (``should_reuse_sub``, decided in the block's eager
gate) or to compute and hand its fresh output back (``on_sub_computed``, after the block). The override reads
and writes two attributes of its module and nothing else, so under regional ``torch.compile`` it traces into
the block's graph (one graph per reuse pattern, shared by all blocks) and no decision runs inside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..caching.base import BlockCall, CacheMethod, CacheState, Kept, Residual, keep, take
from ..config import PolicyError
from .blocks import block_inputs, block_outputs, pack_outputs
from ..context import StepContext
from .feature import COMPUTE, Call, Feature, Host
from .guardrails import Guard
from .overrides import call_inner, override_forward, restore_forward
from .state import tensor_bytes

SUB_KEY = "sub_block"
_CACHED, _FRESH = "_dit_accel_sub_cached", "_dit_accel_sub_fresh"


def sub_block_forward(module: torch.nn.Module, *args, **kwargs):
    """A cached sub-module's forward: the output its gate chose, or its own forward (kept for the method)."""
    cached = getattr(module, _CACHED)
    if cached is not None:
        return cached
    out = call_inner(module, SUB_KEY, *args, **kwargs)
    setattr(module, _FRESH, out)
    return out

logger = logging.getLogger("dit_accel")


class RangeLinks:
    """What the transformer adds to the streams between the blocks of one range, on a computed step.

    Detection costs nothing without such additions: a block's input is the very tensor object the
    previous block returned. Otherwise the difference is accumulated. A change between blocks that is
    not an addition (another shape, or the previous output modified in place) marks the range broken:
    its residual is not cached that step.
    """

    __slots__ = ("last", "versions", "hidden", "encoder", "broken", "join")

    def __init__(self, join: "Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None" = None) -> None:
        self.last: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        self.versions: tuple[int | None, int | None] = (None, None)
        self.hidden: torch.Tensor | None = None
        self.encoder: torch.Tensor | None = None
        self.broken = False
        self.join = join  # how the transformer joins (hidden, encoder) into one stream, if it does

    @staticmethod
    def _version(t: torch.Tensor | None) -> int | None:
        return None if t is None or t.is_inference() else t._version

    def block_returned(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        self.last = (hidden, encoder)
        self.versions = (self._version(hidden), self._version(encoder))

    def block_called(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        if self.last is None or self.broken:
            return
        (last_h, last_e), (ver_h, ver_e) = self.last, self.versions
        if encoder is None and last_e is not None and self.join is not None and hidden.shape != last_h.shape:
            self._joined(hidden, last_h, last_e, ver_h, ver_e)
            self.last = None
            return
        self.hidden = self._add(self.hidden, hidden, last_h, ver_h)
        if encoder is not None and last_e is not None:
            self.encoder = self._add(self.encoder, encoder, last_e, ver_e)
        self.last = None

    def _joined(self, now: torch.Tensor, last_h: torch.Tensor, last_e: torch.Tensor, ver_h: int | None,
                ver_e: int | None) -> None:
        """The transformer joined the two streams between these blocks: the links so far and the gap in the
        joined layout (the gap is zero unless something besides the concatenation changed the streams)."""
        joined = self.join(last_h, last_e)
        touched = any(v is not None and t._version != v for t, v in ((last_h, ver_h), (last_e, ver_e)))
        if joined.shape != now.shape or touched:
            self.broken = True
            return
        if self.hidden is not None or self.encoder is not None:
            self.hidden = self.join(torch.zeros_like(last_h) if self.hidden is None else self.hidden,
                                    torch.zeros_like(last_e) if self.encoder is None else self.encoder)
        self.encoder = None
        gap = now - joined
        self.hidden = gap if self.hidden is None else self.hidden + gap

    def _add(self, total: torch.Tensor | None, now: torch.Tensor, before: torch.Tensor, version: int | None):
        if now is before and (version is None or before._version == version):
            return total
        if now.shape != before.shape or (version is not None and before._version != version):
            self.broken = True
            return total
        gap = now - before
        return gap if total is None else total + gap


def _join_of(method: CacheMethod) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """How the method's transformer joins its (hidden, encoder) streams (``ModelAdapter.join_group``), or None.

    Refuses a probe across the join: a plan that watches inputs only before the join and outputs only after
    it (DBCache's first-blocks residual with ``fn_compute`` past the double-stream blocks), whose tensors
    would have different token layouts."""
    adapter = method.adapter
    at = adapter.join_index(method.blocks)
    if at is None:
        return None
    plan = method.plan
    if plan.watch_inputs and plan.watch_outputs and max(plan.watch_inputs) < at <= min(plan.watch_outputs):
        raise PolicyError(
            f"cache: {method.name} compares the input of block(s) {sorted(plan.watch_inputs)} with the output of "
            f"block(s) {sorted(plan.watch_outputs)}, but the {adapter.family} transformer joins its text and image "
            f"streams before block {at} ({adapter.join_group}.0); keep the probe blocks among the first {at} "
            "(e.g. a smaller fn_compute)")
    if adapter.text_position == "joint_last":
        return lambda hidden, encoder: torch.cat([hidden, encoder], dim=1)
    return lambda hidden, encoder: torch.cat([encoder, hidden], dim=1)


@dataclass(frozen=True)
class _Role:
    range_id: int | None
    is_start: bool
    is_end: bool
    watch_in: bool
    watch_out: bool

    @property
    def multi(self) -> bool:
        return self.range_id is not None and not (self.is_start and self.is_end)


class CacheFeature(Feature):
    """Caching through one method (see the module docstring)."""

    name = "cache"

    def __init__(self, method: CacheMethod, guard: Guard | None = None) -> None:
        self.method = method
        self.guard = guard  # the policy's guardrails (runtime/guardrails.py), or None
        self.host: Host | None = None
        plan = method.plan
        roles: dict[int, _Role] = {}
        for rid, (start, end) in enumerate(plan.ranges):
            for i in range(start, end):
                roles[i] = _Role(rid, i == start, i == end - 1, i in plan.watch_inputs, i in plan.watch_outputs)
        for i in plan.watch_inputs | plan.watch_outputs:
            roles.setdefault(i, _Role(None, False, False, i in plan.watch_inputs, i in plan.watch_outputs))
        if guard is not None:  # the guard reads the first block's input on every call
            roles.setdefault(0, _Role(None, False, False, False, False))
        units = method.adapter.sub_blocks(method.blocks) if plan.sub_blocks else []
        self.units = [units[u] for u in plan.sub_blocks]
        self._units_of: dict[int, list[int]] = {}
        for k, (u, unit) in enumerate(zip(plan.sub_blocks, self.units)):
            if roles.get(unit.block, _Role(None, False, False, False, False)).range_id is not None:
                raise PolicyError(f"cache: {method.name} caches sub-block {u} of block {unit.block}, which is also "
                                  "in a cacheable block range")
            roles.setdefault(unit.block, _Role(None, False, False, False, False))
            self._units_of.setdefault(unit.block, []).append(k)  # positions in self.units
        self._overridden: list[torch.nn.Module] = []
        self.roles = roles
        self._forced = False  # a guarded recompute in progress: every range computes
        self._warned: set[str] = set()
        self.join = _join_of(method)
        self.new_generation()

    # ---- lifecycle ----------------------------------------------------------------------------
    def attach(self, host: Host) -> None:
        self.host = host
        if self.guard is not None:
            self.guard.attach(host)
        try:
            for unit in self.units:
                override_forward(unit.module, SUB_KEY, sub_block_forward, self)
                self._overridden.append(unit.module)
                setattr(unit.module, _CACHED, None)
                setattr(unit.module, _FRESH, None)
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for module in reversed(self._overridden):
            restore_forward(module, SUB_KEY)
            for name in (_CACHED, _FRESH):
                module.__dict__.pop(name, None)
        self._overridden = []

    def _clear_sub_blocks(self) -> None:
        for module in self._overridden:
            setattr(module, _CACHED, None)
            setattr(module, _FRESH, None)

    def gated_blocks(self) -> set[int]:
        return set(self.roles)

    def new_generation(self) -> None:
        self.range_reused = [0] * len(self.method.plan.ranges)
        self.sub_reused = [0] * len(self.units)
        self.sub_computed = [0] * len(self.units)
        self.mixed_batch = 0
        self.held_bytes = 0
        self.released_bytes = 0
        self.states: list[CacheState] = []
        self._inputs: dict[int, tuple[Kept | None, Kept | None]] = {}
        self._links: dict[int, RangeLinks] = {}
        self._reused_now: list[int] = []
        self._guarded = False
        if self.guard is not None:
            self.guard.new_generation()

    def release(self) -> None:
        if self.states:
            self.released_bytes = sum(tensor_bytes(s) for s in self.states)
            self.mixed_batch += sum(s.mixed_batch for s in self.states)
        self.states = []
        self._inputs, self._links = {}, {}
        self._clear_sub_blocks()
        if self.guard is not None:
            self.guard.release()

    def new_state(self, ctx: StepContext) -> CacheState:
        state = self.method.State(ctx=ctx)
        self.states.append(state)
        return state

    # ---- per call -----------------------------------------------------------------------------
    def before_call(self, call: Call) -> None:
        state: CacheState = call.slots[self.name]
        state.ctx = call.ctx
        self._inputs, self._links = {}, {}
        self._reused_now, self._guarded = [], False
        if self.guard is not None:
            self.guard.before_call(call)

    def after_call(self, call: Call, output: Any) -> Any | None:
        self._clear_sub_blocks()
        state: CacheState | None = call.slots.get(self.name)
        if state is None:
            return None
        adjusted = self.method.adjust_output(output, state) if output is not None else None
        if state.modified_inplace:
            state.modified_inplace = False
            call.inputs_modified_in_place()
        if self.guard is not None:
            if self._guarded:
                self.guard.count_fallback(call)
            if self._reused_now and self.guard.needs_recompute(adjusted if adjusted is not None else output):
                return self._recompute(call)
        return adjusted

    def _recompute(self, call: Call) -> Any:
        """Guardrails: run the call again with every range computed (its reused work gave NaN / inf)."""
        self._forced = True
        try:
            fresh = self.host.transformer.forward(*call.args, **call.kwargs)
        finally:
            self._forced = False
        for rid in self._reused_now:
            self.range_reused[rid] -= 1
        self._reused_now = []
        self.guard.count_recompute()
        return fresh

    def enter_block(self, index: int, args: tuple, kwargs: dict, call: Call) -> Any:
        state: CacheState | None = call.slots.get(self.name)
        if state is None:
            return COMPUTE
        role = self.roles[index]
        block = self.host.blocks[index]
        method = self.method
        rid = role.range_id
        if index == 0 and self.guard is not None and not self._forced:
            self.guard.observe_input(block_inputs(block, args, kwargs)[0], call)
        if role.watch_in:
            method.on_input(BlockCall(block, args, kwargs), state)
        for k in self._units_of.get(index, ()):
            module = self.units[k].module
            cached = None if self._forced else method.should_reuse_sub(method.plan.sub_blocks[k], state)
            setattr(module, _CACHED, cached)
            setattr(module, _FRESH, None)
            if cached is not None:
                self.sub_reused[k] += 1
        if rid is None:
            return COMPUTE
        if role.is_start:
            reuse = False if self._forced else method.should_reuse(rid, state)
            # ---- guardrails: the one place they act (dit_accel.runtime.guardrails) ----
            if reuse and self.guard is not None and not self.guard.allow_reuse():
                reuse, self._guarded = False, True
            # ----------------------------------------------------------------------------
            state.reuse[rid] = reuse
            if reuse:
                self.range_reused[rid] += 1
                self._reused_now.append(rid)
            else:
                hidden, encoder = block_inputs(block, args, kwargs)
                self._inputs[rid] = (keep(state, hidden), keep(state, encoder))
        if state.reuse.get(rid, False):
            hidden, encoder = block_inputs(block, args, kwargs)
            if role.is_end:
                hidden, encoder = method.reused_output(rid, hidden, encoder, state)
            return pack_outputs(block, hidden, encoder)
        if role.multi:
            if role.is_start:
                self._links[rid] = RangeLinks(self.join)
            elif rid in self._links:
                self._links[rid].block_called(*block_inputs(block, args, kwargs))
        return COMPUTE

    def exit_block(self, index: int, output: Any, call: Call) -> Any:
        state: CacheState | None = call.slots.get(self.name)
        if state is None:
            return output
        role = self.roles[index]
        block = self.host.blocks[index]
        rid = role.range_id
        for k in self._units_of.get(index, ()):
            module = self.units[k].module
            fresh = getattr(module, _FRESH)
            if fresh is not None:
                self.sub_computed[k] += 1
                self.method.on_sub_computed(self.method.plan.sub_blocks[k], fresh, state)
            setattr(module, _CACHED, None)
            setattr(module, _FRESH, None)
        if role.multi and not role.is_end and rid in self._links:
            self._links[rid].block_returned(*block_outputs(block, output))
        if role.is_end or role.watch_out:
            out_h, out_e = block_outputs(block, output)
            if role.is_end:
                self._range_computed(rid, out_h, out_e, state, call)
            if role.watch_out:
                self.method.on_output(index, out_h, out_e, state)
        return output

    def _range_computed(self, rid: int, out_h, out_e, state: CacheState, call: Call) -> None:
        kept_h, kept_e = self._inputs.pop(rid, (None, None))
        in_h, in_e = take(state, kept_h), take(state, kept_e)
        links = self._links.pop(rid, None)
        if in_h is None or (links is not None and links.broken):
            # modified in place, or changed between blocks other than by an addition: no trustworthy
            # residual this step
            state.residuals.pop(rid, None)
            if links is not None and links.broken:
                self._warn_once("links", "dit_accel: the transformer changes the hidden states between cached blocks "
                                "other than by an addition; that range is computed on every step")
            return
        if self.join is not None and out_e is None and in_e is not None and out_h.shape != in_h.shape:
            in_h, in_e = self.join(in_h, in_e), None  # the range spans the join: a residual in the joined layout
        res_h = out_h - in_h
        res_e = out_e - in_e if (out_e is not None and in_e is not None) else None
        if links is not None and links.hidden is not None:
            res_h = res_h - links.hidden
        if links is not None and links.encoder is not None and res_e is not None:
            res_e = res_e - links.encoder
        self.method.on_range_computed(rid, Residual(res_h, res_e, out_e is None), state)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ---- statistics ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        blocks = len(self.host.blocks) if self.host is not None else 0
        reused = [0] * blocks
        for (start, end), n in zip(self.method.plan.ranges, self.range_reused):
            for i in range(start, end):
                reused[i] += n
        live = sum(tensor_bytes(s) for s in self.states)
        out = {"method": self.method.describe(), "reused": reused,
               "mixed_batch_decisions": self.mixed_batch + sum(s.mixed_batch for s in self.states),
               "cache_bytes": live if self.states else self.released_bytes, "held_bytes": live}
        if self.guard is not None:
            out["guardrails"] = self.guard.stats()  # Stats.extra["guardrails"]
        if self.units:  # Stats.extra["sub_blocks"]: per cached sub-block, in plan order
            out["sub_blocks"] = {"blocks": [u.block for u in self.units], "kinds": [u.kind for u in self.units],
                                 "computed": list(self.sub_computed), "reused": list(self.sub_reused)}
        return out
