"""What every caching method is: a config, a typed per-branch state and a :class:`CacheMethod`, registered once.

A caching method never sees a model class or the runtime: the runtime's cache feature
(:mod:`dit_accel.runtime.cache`) hands it the flat list of transformer blocks as indices, the
hidden / encoder-hidden states at the block inputs and outputs it asked to watch, and asks it, at
the start of each cacheable block range, whether to reuse the range's cached residual for this
step. Everything a method remembers lives in its ``State`` (a dataclass, one per generation, CFG
branch and input shape), which carries the read-only :class:`~dit_accel.runtime.context.StepContext`
of the call in progress.

A new method is one module in this package::

    @dataclass(frozen=True)
    class MyConfig(CacheConfig):
        threshold: float = option(0.1, ge=0.0, doc="...")

    @dataclass(eq=False)
    class MyState(CacheState):
        reference: torch.Tensor | None = None

    @register_cache_method("mine", MyConfig)
    class Mine(CacheMethod):
        State = MyState
        def make_plan(self, num_blocks): ...
        def should_reuse(self, range_id, state): ...

plus a preset YAML and a test; the built-in modules of this package are found without a list, and a
third-party method registers the same way when its module is imported.
"""

from __future__ import annotations

import logging

import dataclasses
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, NamedTuple

import torch

from ..adapters.base import BlockInfo, ModelAdapter, call_argument
from ..config import ConfigBase, PolicyError, describe_value, document_options, option
from ..context import StepContext

# ---------------------------------------------------------------------------------------------------
# Config, plan, calls, residuals
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheConfig(ConfigBase):
    """Base of every method's ``cache:`` section; ``method`` is the registered name (filled in)."""

    section: ClassVar[str] = "cache"
    method_name: ClassVar[str] = ""
    method: str = option("", doc="the caching method")

    def validate(self) -> None:
        name = type(self).method_name
        if not self.method:
            object.__setattr__(self, "method", name)
        elif name and self.method != name:
            raise PolicyError(f"cache.method: {self.method!r} does not match {type(self).__name__} ({name!r})")
        super().validate()

    def check_sections(self, quant: Any) -> None:
        """Checked by :class:`~dit_accel.policy.Policy` against its other sections (``quant``: its ``quant:``
        section or None); raise a PolicyError on a combination the method cannot serve. Default: any."""


@dataclass(frozen=True)
class CachePlan:
    """Which block ranges are cacheable and which block inputs/outputs the method watches.

    ``ranges`` are half-open ``(start, end)`` index pairs into the flat block list; when a range
    is reused every block in it is skipped and its cached residual (output − input) is added to
    the range's input at the last block. ``sub_blocks`` (indices into ``adapter.sub_blocks(blocks)``)
    are attention / FFN sub-modules whose output the method may reuse on its own while the rest of
    their block computes (:meth:`CacheMethod.should_reuse_sub`); their blocks must not be in a range.
    """

    ranges: tuple[tuple[int, int], ...]
    watch_inputs: frozenset[int] = frozenset()
    watch_outputs: frozenset[int] = frozenset()
    sub_blocks: tuple[int, ...] = ()


@dataclass
class BlockCall:
    """One call of a watched block: the block, its arguments, and its hidden/encoder inputs."""

    block: BlockInfo
    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        meta = self.block.meta
        return call_argument(meta, meta.hidden_states_argument_name, self.args, self.kwargs)

    @property
    def encoder(self) -> torch.Tensor | None:
        meta = self.block.meta
        if meta.return_encoder_hidden_states_index is None:
            return None
        return call_argument(meta, meta.encoder_hidden_states_argument_name, self.args, self.kwargs)


class Residual(NamedTuple):
    """A range's residual (its output − its input, without what the transformer adds between its blocks).

    ``encoder_is_none``: the range's last block returns no encoder stream (SD3's last block)."""

    hidden: torch.Tensor
    encoder: torch.Tensor | None = None
    encoder_is_none: bool = False


class Kept(NamedTuple):
    """A tensor kept for a later difference, with its in-place version counter (None: not verifiable)."""

    tensor: torch.Tensor
    version: int | None


# ---------------------------------------------------------------------------------------------------
# Typed per-branch state
# ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CacheState:
    """Everything a method caches for one (generation, CFG branch, input shape); subclasses add fields.

    Args:
        ctx: the step context of the call in progress (replaced by the runtime at every call).
        residuals: the cached residual of each range id.
        reuse: each range's decision on the call in progress.
        mixed_batch: gate decisions where the samples of a batch disagreed (reported by ``stats``).
        modified_inplace: a block modified a kept input in place on this call (the runtime clones
            inputs from then on).
    """

    ctx: StepContext
    residuals: dict[int, Residual] = field(default_factory=dict)
    reuse: dict[int, bool] = field(default_factory=dict)
    mixed_batch: int = 0
    modified_inplace: bool = False

    @property
    def step(self) -> int:
        return self.ctx.step

    @property
    def num_steps(self) -> int | None:
        return self.ctx.num_steps

    @property
    def key(self) -> tuple:
        return self.ctx.key

    @property
    def branch(self) -> str:
        return self.ctx.branch

    def schedule_position(self) -> tuple[int, int | None]:
        return self.ctx.schedule_position()


def keep(state: CacheState, tensor: torch.Tensor | None) -> Kept | None:
    """``tensor`` to be kept for a later residual, with its in-place version counter.

    Blocks that modify their input in place would otherwise turn ``output − input`` into zero;
    :func:`take` notices through the version counter, and the runtime clones inputs from then on.
    Tensors made under ``torch.inference_mode`` have no version counter: they are cloned when the
    blocks are not known to be in-place safe (``ctx.clone_unverifiable``, the generic adapter).
    """
    if tensor is None:
        return None
    ctx = state.ctx
    if tensor.is_inference():
        return Kept(tensor.clone() if ctx.clone_inputs or ctx.clone_unverifiable else tensor, None)
    kept = tensor.clone() if ctx.clone_inputs else tensor
    return Kept(kept, kept._version)


def take(state: CacheState, kept: Kept | None) -> torch.Tensor | None:
    """The tensor :func:`keep` kept, or None (and flag the state) if a block modified it in place since."""
    if kept is None:
        return None
    if kept.version is not None and kept.tensor._version != kept.version:
        state.modified_inplace = True
        return None
    return kept.tensor


# ---------------------------------------------------------------------------------------------------
# The method interface
# ---------------------------------------------------------------------------------------------------

_HOOK_POINTS = ("should_reuse", "on_input", "on_output", "on_range_computed", "reused_output", "adjust_output",
                "should_reuse_sub", "on_sub_computed")


class CacheMethod(ABC):
    """A caching algorithm bound to one transformer's blocks.

    The hook points run outside ``torch.compile`` (per-step Python decisions would otherwise become
    guards and recompile every step); the blocks' own forwards stay compiled.

    Class attributes a method may set: ``State`` (its state dataclass), ``record_options`` (what
    calibration must record for it: :class:`dit_accel.calibration.RecordConfig` fields), ``exact``
    (settings under which it computes every step, bit-exact with the untouched model) and ``reusing``
    (settings under which it reuses on any model within a few steps, even random-weight ones). The
    conformance suite (``tests/test_conformance.py``) runs every registered method with both.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[CacheConfig]]
    State: ClassVar[type[CacheState]] = CacheState
    record_options: ClassVar[dict[str, Any] | None] = None
    exact: ClassVar[dict[str, Any] | None] = None
    reusing: ClassVar[dict[str, Any] | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for point in _HOOK_POINTS:
            if point in cls.__dict__:
                setattr(cls, point, torch.compiler.disable(cls.__dict__[point]))

    def __init__(self, config: CacheConfig, blocks: list[BlockInfo], adapter: ModelAdapter) -> None:
        self.config = config
        self.blocks = blocks
        self.adapter = adapter
        self.num_blocks = num_blocks = len(blocks)
        self.plan = self.make_plan(num_blocks)
        for start, end in self.plan.ranges:
            if not 0 <= start < end <= num_blocks:
                raise PolicyError(f"cache: block range ({start}, {end}) is outside the model's {num_blocks} blocks")

    @abstractmethod
    def make_plan(self, num_blocks: int) -> CachePlan:
        """Return the cacheable ranges and watched points for a model with ``num_blocks`` blocks."""

    @abstractmethod
    def should_reuse(self, range_id: int, state: CacheState) -> bool:
        """Decide, at the start of range ``range_id``, whether to reuse its cached residual."""

    def on_input(self, call: BlockCall, state: CacheState) -> None:
        """Called before each block in ``plan.watch_inputs`` runs — at a range start, before ``should_reuse``."""

    def on_output(self, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None, state: CacheState) -> None:
        """Called with the outputs of each block in ``plan.watch_outputs`` (after it ran)."""

    def on_range_computed(self, range_id: int, residual: Residual, state: CacheState) -> None:
        """A range was computed: its residual. Default: cache it for reuse."""
        state.residuals[range_id] = residual

    def reused_output(self, range_id: int, hidden: torch.Tensor, encoder: torch.Tensor | None,
                      state: CacheState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The range's output when it is skipped, from its input. Default: input + cached residual."""
        res = state.residuals[range_id]
        if res.encoder_is_none:
            return hidden + res.hidden, None
        return hidden + res.hidden, (encoder + res.encoder if res.encoder is not None else encoder)

    def adjust_output(self, output: Any, state: CacheState) -> Any | None:
        """A correction of the transformer's output on this call (None: unchanged). Default: none."""
        return None

    def should_reuse_sub(self, unit: int, state: CacheState) -> Any | None:
        """Before the block of sub-block ``unit`` (one of ``plan.sub_blocks``) runs: the sub-module's cached
        output to return instead of running it, or None (it computes). Default: None."""
        return None

    def on_sub_computed(self, unit: int, output: Any, state: CacheState) -> None:
        """Sub-block ``unit`` computed ``output`` (the sub-module's return value) on this call. Default: nothing."""

    def describe(self) -> str:
        """One line: the method and its settings (calibrated tables summarised, not printed)."""
        settings = (f"{k}={describe_value(v)}" for k, v in self.config.to_dict().items() if k != "method")
        return f"{self.name}({', '.join(settings)})"


for _point in _HOOK_POINTS[1:]:  # the base class's own defaults (should_reuse is abstract)
    setattr(CacheMethod, _point, torch.compiler.disable(getattr(CacheMethod, _point)))


# ---------------------------------------------------------------------------------------------------
# Registry: one declaration per method
# ---------------------------------------------------------------------------------------------------

_METHODS: dict[str, type[CacheMethod]] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}
_BUILTINS_LOADED = False


def register_cache_method(name: str, config_cls: type[CacheConfig]):
    """Class decorator: ``@register_cache_method("fora", FORAConfig)`` makes ``cache: {method: fora}`` build
    ``FORAConfig`` and run the decorated :class:`CacheMethod` (public: third-party methods register the same
    way). The config's option docs become its ``Args:`` docstring."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"cache method name must be an identifier, got {name!r}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, CacheConfig)):
        raise TypeError(f"{config_cls!r} must be a CacheConfig subclass")

    def register(cls: type[CacheMethod]) -> type[CacheMethod]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"cache method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name, cls.config_cls = name, config_cls
        config_cls.method_name = name
        document_options(config_cls)
        _METHODS[name] = cls
        return cls

    return register


def register_alias(alias: str, method: str, **defaults: Any) -> None:
    """``cache: {method: alias}`` means ``method`` with ``defaults`` (e.g. fbcache = dbcache with one probe block)."""
    _ALIASES[alias] = (method, defaults)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name not in ("base", "records"):
            importlib.import_module(f"{__package__}.{info.name}")


def method_names() -> list[str]:
    """Names of the user-facing caching methods (registered; internal ones start with ``_``)."""
    _load_builtins()
    return sorted(name for name in _METHODS if not name.startswith("_"))


def alias_names() -> dict[str, tuple[str, dict[str, Any]]]:
    _load_builtins()
    return dict(_ALIASES)


def get_method(name: str) -> type[CacheMethod]:
    """The class implementing caching method ``name``."""
    _load_builtins()
    if name not in _METHODS:
        raise PolicyError(f"cache.method: {name!r} is not a known caching method; choose one of "
                          f"{sorted([*method_names(), *_ALIASES])}")
    return _METHODS[name]


def method_for(config: CacheConfig) -> type[CacheMethod]:
    """The method class registered for ``config``'s type."""
    return get_method(type(config).method_name)


def cache_config_from_dict(data: Any) -> CacheConfig:
    """A ``cache:`` section (a mapping with ``method``, aliases resolved) as its validated config."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"cache: expected a mapping with a 'method' key, got {data!r}")
    data = dict(data)
    method = data.pop("method", None)
    allowed = sorted([*method_names(), *_ALIASES])
    if method is None:
        raise PolicyError(f"cache.method is required; choose one of {allowed}")
    if not isinstance(method, str):
        raise PolicyError(f"cache.method: expected a string, got {method!r}; choose one of {allowed}")
    if method in _ALIASES:
        method, defaults = _ALIASES[method]
        data = {**defaults, **data}
    if method.startswith("_") and method in _METHODS:
        raise PolicyError(f"cache.method: {method!r} is internal; choose one of {allowed}")
    return get_method(method).config_cls.from_dict({"method": method, **data}, where="cache")


_GUIDANCE: dict[str, type[ConfigBase]] = {}


def register_guidance_method(name: str, config_cls: type[ConfigBase]) -> None:
    """``guidance: {method: name}`` builds ``config_cls`` (its ``method`` field is the name)."""
    document_options(config_cls)
    _GUIDANCE[name] = config_cls


def guidance_config_types() -> tuple[type[ConfigBase], ...]:
    _load_builtins()
    return tuple(_GUIDANCE.values())


def guidance_config_from_dict(data: Any) -> ConfigBase:
    """A ``guidance:`` section (a mapping with ``method``) as its validated config."""
    _load_builtins()
    if not isinstance(data, Mapping):
        raise PolicyError(f"guidance: expected a mapping with a 'method' key, got {data!r}")
    method = data.get("method")
    allowed = sorted(_GUIDANCE)
    if method is None:
        raise PolicyError(f"guidance.method is required; choose one of {allowed}")
    if not isinstance(method, str) or method not in _GUIDANCE:
        raise PolicyError(f"guidance.method: {method!r} is not a known guidance method; choose one of {allowed}")
    return _GUIDANCE[method].from_dict(data, where="guidance")


# ---------------------------------------------------------------------------------------------------
# Helpers shared by the methods
# ---------------------------------------------------------------------------------------------------


def require_calibrated(config: CacheConfig, field_name: str, hint: str = "") -> None:
    """Raise a PolicyError naming ``cache.<field>`` if calibration has not filled it in yet."""
    if getattr(config, field_name) is None:
        raise PolicyError(f"cache.{field_name} is required: run dit_accel.calibrate(pipe, prompts, policy) first{hint}")


def branch_table(table: dict, state: CacheState, field_name: str) -> Any:
    """The calibrated table of this call's CFG branch from ``{branch: table}``.

    A branch the calibration never saw is a PolicyError (a curve recorded on batched CFG says nothing
    about Wan's separate ``cond`` / ``uncond`` calls), not a silent fallback onto another branch's table."""
    branch = state.branch
    if branch in table:
        return table[branch]
    raise PolicyError(f"cache.{field_name} was calibrated for CFG branch(es) {sorted(table)}; this call runs branch "
                      f"{branch!r} (another CFG layout). Calibrate with the call arguments you serve")


def per_block_ranges(num_blocks: int, fn_compute: int, bn_compute: int) -> tuple[tuple[int, int], ...]:
    """One cacheable range per block, leaving the first ``fn_compute`` and last ``bn_compute`` blocks out."""
    if fn_compute + bn_compute >= num_blocks:
        raise PolicyError(f"cache.fn_compute ({fn_compute}) + cache.bn_compute ({bn_compute}) must be less than the "
                          f"model's number of blocks ({num_blocks})")
    return tuple((i, i + 1) for i in range(fn_compute, num_blocks - bn_compute))


GRANULARITIES = ("stack", "block")


def cache_ranges(num_blocks: int, fn_compute: int, bn_compute: int, granularity: str) -> tuple[tuple[int, int], ...]:
    """The cacheable ranges of a schedule-driven method: one range over all cached blocks (``"stack"``:
    one residual, one add on a reused step) or one per block (``"block"``). When every cached block is
    reused together the two are the same computation up to rounding (the block residuals telescope),
    and the stack costs less per step."""
    ranges = per_block_ranges(num_blocks, fn_compute, bn_compute)
    if granularity == "block":
        return ranges
    return ((ranges[0][0], ranges[-1][1]),)


def shard_sums(state: CacheState, *sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``sums`` added up over the context-parallel ranks (one all-reduce for all of them), as they are on one
    process. A gate's statistic must be reduced before the decision so that every rank decides alike — the
    sums it is made of (norms of the shard's tokens), not the ratio."""
    shards = state.ctx.shards
    if shards is None:
        return sums
    flat = shards.sum(torch.cat([s.reshape(-1).to(torch.float64) for s in sums]))
    out, at = [], 0
    for s in sums:
        out.append(flat[at:at + s.numel()].reshape(s.shape).to(s.dtype))
        at += s.numel()
    return tuple(out)


def batch_agrees(below: torch.Tensor, state: CacheState) -> bool:
    """True if every sample's gate says reuse (``below`` is a bool tensor, one per sample or pooled).

    The one host sync of a residual gate. A batch whose samples disagree is computed, and counted in
    ``state.mixed_batch`` (reported by ``dit_accel.stats``).
    """
    agree = int(below.sum())
    if 0 < agree < below.numel():
        state.mixed_batch += 1
    return agree == below.numel()


def replace_config(config: CacheConfig, **changes: Any) -> CacheConfig:
    """``config`` with ``changes``, validated again (what a method's ``calibrated`` returns)."""
    return dataclasses.replace(config, **changes)


def position(step: int, steps: int, calibrated_steps: int) -> int:
    """The calibrated step at the same relative position as ``step`` of ``steps``."""
    if steps == calibrated_steps or steps <= 1:
        return min(step, calibrated_steps - 1)
    return min(int(round(step * (calibrated_steps - 1) / (steps - 1))), calibrated_steps - 1)


class StepMapping:
    """A calibrated schedule served at another step count: each call's step maps to the calibrated step at the same
    relative position (:func:`position`), and the first mismatch logs ``message`` (``%d`` calibrated, ``%d``
    served) once per method instance."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.warned = False

    def __call__(self, state: CacheState, calibrated: int) -> tuple[int, bool]:
        """``(calibrated step of this call, whether the step counts match)``."""
        index, length = state.schedule_position()
        steps = length or calibrated
        if steps != calibrated and not self.warned:
            logging.getLogger("dit_accel").warning(self.message, calibrated, steps)
            self.warned = True
        return position(index, steps, calibrated), steps == calibrated
