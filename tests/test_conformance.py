"""Conformance suite: what every acceleration feature guarantees on every pipeline family.

This is the safety net of the runtime (step / CFG-branch tracking, generation boundaries, block hooks,
statistics) and of the glue in ``dit_accel/api.py``. It tests *behaviour* through the public API only —
``dit_accel.accelerate / remove / accelerated / stats / reset / calibrate``, ``Policy`` dicts — and
through state anyone can observe on the modules (diffusers' ``_diffusers_hook`` registries, torch's
forward-hook dicts, attention ``processor`` objects, instance ``__dict__`` keys, the scheduler's
``__dict__``). It never reads a private attribute of dit_accel (no ``pipe._dit_accel``, no runtime
objects): a rewrite of the runtime that keeps the behaviour must keep this suite green.

What each (feature, family) case guarantees, where it applies:

1. **Off is exact** — a configuration of the feature that never reuses / never drops a branch /
   never sparsifies (threshold 0, interval 1, budget 1.0, guidance threshold > 1, attention warm-up
   covering every step, ...) gives outputs bit-identical (``torch.equal``) to the untouched
   pipeline; so does the ``none`` preset.
2. **remove leaves no footprint** — after ``accelerate`` + a call + ``remove`` every module of every
   pipeline component has the same hook registries, torch hook dicts, instance ``forward``,
   attention processor objects, parameters and instance ``__dict__`` keys as before; the
   scheduler has no instance ``set_timesteps``; the pipeline has no new attribute; no torch
   function mode is left active; the output is bit-identical to the untouched pipeline again.
   A refused ``accelerate`` (uncalibrated method) and an exception inside ``accelerated(...)``
   leave nothing behind either.
3. **State resets** — two identical calls give identical outputs (also after ``dit_accel.reset``);
   a call after a call with other ``num_inference_steps`` / resolution / batch (two prompts, or
   several images per prompt) equals that call on a freshly accelerated pipeline, and
   ``stats()`` after it equals the fresh call's statistics (it describes that call only). The same
   after ``pipe.scheduler = X.from_config(...)`` between calls, and for a second pipeline built
   from the same components (its own scheduler) calling the accelerated transformer.
4. **CFG branches isolated** — with a fixed schedule (FORA, interval 2) each CFG branch follows
   its own schedule: separate CFG (Wan) reports ``{"cond": N, "uncond": N}`` and every block
   computes on steps 0, 2 of *each* branch (watched through forward hooks); batched CFG and
   guidance-distilled models have one branch.
5. **torch.compile compiles once per code path** — blocks compiled (regional, like diffusers'
   ``compile_repeated_blocks``; a counting eager backend), then accelerated: the second call
   compiles no new frame, and the compiled model's output and stats equal the eager ones. A static
   (FORA) and a gated (FBCache) method per family by default; hooks only, TaylorSeer and Adaptive
   Guidance (a batch that halves mid-call) with ``-m slow``.
6. **Stats consistent** — for every block, computed + reused == transformer calls that ran;
   ``computed`` equals what forward hooks on the block's own layers saw; ``calls_per_branch``
   equals the transformer calls seen per branch (minus calls Adaptive Guidance skipped);
   ``saved_share`` in [0, 1]; a never-reuse configuration reports 0 reused; FORA interval 2 over
   4 steps reports exactly 2 reused evaluations per block and branch.

Besides, every cache method composed with Adaptive Guidance on the CFG families runs, is
deterministic across calls, resets between calls and keeps consistent statistics.

**Light set** (end of the file): on every other registered family (tier-1 records with ``conformance=False``,
the coverage families of tier 2) the ``none`` preset and ``remove`` are bit-exact with no footprint, a call after
a call with other steps equals a fresh call, every caching method runs once (reusing, stats consistent) and
sparse attention reaches the sparse path where the adapter says it applies (~35 s for 20 families).

How to extend:

* **a new caching method** — nothing to edit here: it is picked up from the library's registry
  (``dit_accel.caching``: ``method_names()`` and the aliases), with the settings it declares itself —
  ``exact`` (never reuses: bit-exact) and ``reusing`` (reuses on the tiny 4-step pipelines) — and is
  calibrated first when it has ``calibrated`` (required when it refuses to run uncalibrated; calibrated
  policies are built once per family, on a twin pipeline with the same weights).
* **a new family** — nothing to edit here: its ``TinyFamily`` record in ``dit_accel/testing/families.py``
  (calibration prompts, the call changes it supports, a size for sparse attention; ``conformance=False``
  keeps it out) and its adapter (block lists, self-attention submodule) are read into ``FAMILIES``.
* **a new guidance / attention variant** — one entry in ``GUIDANCE`` / ``ATTENTION``.

Known library bugs go to ``KNOWN_BUGS`` as ``xfail(strict=True)`` (a fix makes the case XPASS: then
delete the entry). It is empty: the bugs known when this suite was written (state or stats carried
over a scheduler swap or into a second pipeline; Adaptive Guidance + TaylorSeer / CG-Taylor crashing
on batched CFG) were fixed in commit 9ea43c8 — on its parent dce154e 96 cases of this file fail.

Cost: pipelines, baselines, calibrations and fresh-call references are built once per session; the
default selection runs in about 2.5 minutes on one CPU thread (``-m "not slow"``: skip the extras).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import dit_accel
from dit_accel.adapters import ADAPTERS
from dit_accel.testing import FAMILIES as ALL_FAMILIES
from dit_accel.testing import family_names, get_family, tiny_call_kwargs, tiny_pipeline, tiny_transformer

STEPS = 4  # tiny_call_kwargs' default step count; every schedule below is written for it


# ---------------------------------------------------------------------------------------------------
# Tables: families and features (one entry each)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    blocks: tuple[str, ...]  # the transformer's block lists, in execution order
    attention: str  # the blocks' self-attention submodule (runs only when the block computes)
    prompts: tuple  # calibration prompts (strings or dicts of call arguments)
    changes: dict[str, dict]  # call changes this family supports: name -> call overrides
    attention_size: dict = field(default_factory=dict)  # call overrides giving several 16-token blocks


def family_entry(name: str) -> Family:
    """A family's entry: block lists and self-attention submodule from its adapter, the rest from its
    tiny-family record (``dit_accel/testing/families.py``)."""
    record = get_family(name)
    adapter = ADAPTERS[record.transformer_class]
    return Family(blocks=adapter.block_groups, attention=adapter.attention_module,
                  prompts=record.calibration_inputs(), changes=record.changes(steps=STEPS + 2),
                  attention_size=dict(record.attention_size))


# One per CFG layout and conditioning: guidance-distilled (Flux), batched CFG [uncond, cond] (SD3),
# class labels with batched CFG [cond, uncond] and a fixed resolution (DiT), separate CFG calls (Wan);
# the other families' records opt out with ``conformance=False``.
FAMILIES: dict[str, Family] = {name: family_entry(name) for name in ALL_FAMILIES if get_family(name).conformance}
# The light set (end of this file) runs on every other registered family: the tier-1 records with
# ``conformance=False`` and the coverage families (tier 2, ``dit_accel/testing/{image,video}_families.py``).
LIGHT: dict[str, Family] = {name: family_entry(name) for name in family_names(tier=None) if name not in FAMILIES}
ENTRIES: dict[str, Family] = {**FAMILIES, **LIGHT}
CFG_LAYOUT: dict[str, str] = {name: get_family(name).cfg_layout for name in ENTRIES}


@dataclass(frozen=True)
class Entry:
    never: dict  # fields that make the feature a no-op (must be bit-exact)
    active: dict  # fields that make it act on the tiny 4-step pipelines
    calibrate: str | None = None  # None | "optional" | "required"
    never_after_calibration: bool = False  # never = calibrated active + never fields (else: calibrate never)
    calibration_prompts: int = 1  # generations calibrate runs (of the family's prompts)


def _refuses_uncalibrated(name: str) -> bool:
    transformer = tiny_transformer("dit")
    try:
        dit_accel.accelerate(transformer, {"cache": {"method": name}})
    except dit_accel.PolicyError:
        return True
    dit_accel.remove(transformer)
    return False


@functools.lru_cache(maxsize=None)
def cache_entry(name: str) -> Entry:
    """A registered caching method's entry, from what the method declares: ``exact`` (never reuses) and
    ``reusing`` (reuses on the tiny pipelines); calibrated when it has ``calibrated`` (required when it
    refuses to run uncalibrated; three generations, enough for TeaCache's degree-4 fit)."""
    from dit_accel.caching import alias_names, get_method

    method, _ = alias_names().get(name, (name, {}))
    cls = get_method(method)
    if cls.exact is None or cls.reusing is None:
        raise AssertionError(f"caching method {name!r} must declare `exact` and `reusing` settings "
                             "(see dit_accel.caching.base.CacheMethod)")
    calibrate = None
    if hasattr(cls, "calibrated"):
        calibrate = "required" if _refuses_uncalibrated(name) else "optional"
    return Entry(never=dict(cls.exact), active=dict(cls.reusing), calibrate=calibrate,
                 calibration_prompts=3 if calibrate else 1)


GUIDANCE: dict[str, Entry] = {
    # threshold -1: cos >= -1 always, so the unconditional branch is dropped right after min_steps
    "adaptive_guidance": Entry(never={"threshold": 2.0}, active={"threshold": -1.0}),
}

_SPARSE = {"block_size": 16, "warmup_steps": 1}
ATTENTION: dict[str, Entry] = {
    "xattention": Entry(never={"warmup_steps": 100},  # refresh_interval 2: selections kept across steps
                        active={"sparse": {"method": "xattention", "threshold": 0.5, "refresh_interval": 2},
                                **_SPARSE}),
    "topp": Entry(never={"warmup_steps": 100}, active={"sparse": {"method": "topp", "top_p": 0.5}, **_SPARSE}),
    "svg2": Entry(never={"warmup_steps": 100},  # k-means centroids kept per branch across steps
                  active={"sparse": {"method": "topp", "density": 0.5}, "reorder": "svg2",
                          "svg2": {"q_clusters": 4, "k_clusters": 4}, **_SPARSE}),
    "int8": Entry(never={"warmup_steps": 100}, active={"sparse": None, "quant": "int8", "warmup_steps": 1}),
    "static_paro": Entry(never={"warmup_steps": 100},
                         active={"sparse": {"method": "static", "threshold": 0.5}, "reorder": "paro", **_SPARSE},
                         calibrate="required", never_after_calibration=True),
    # proxy_heads 1: both heads of the tiny models pooled into one proxy
    "proxy": Entry(never={"warmup_steps": 100},
                   active={"sparse": {"method": "proxy", "proxy_heads": 1, "threshold": 0.5}, **_SPARSE}),
    # refresh_interval 2: a dense search step, then a sparse step reusing its selection
    "adaspa": Entry(never={"warmup_steps": 100},
                    active={"sparse": {"method": "adaspa", "recall": 0.5, "refresh_interval": 2}, **_SPARSE}),
    # refresh_interval 2: the level map and its pyramid tables kept across steps
    "psa": Entry(never={"warmup_steps": 100},
                 active={"sparse": {"method": "psa", "refresh_interval": 2},
                         "psa": {"full": 0.2, "pool2": 0.4, "pool4": 0.6, "pool8": 0.8}, **_SPARSE}),
    "route_error": Entry(never={"warmup_steps": 100},
                         active={"sparse": {"method": "topp", "density": 0.5, "route": "error"},
                                 "compensate": "centroid", **_SPARSE}),
    "pisa": Entry(never={"warmup_steps": 100},
                  active={"sparse": {"method": "topp", "top_p": 0.5}, "compensate": "pisa", **_SPARSE}),
    "pbs": Entry(never={"warmup_steps": 100},  # refresh_interval 2: the key permutation kept across steps
                 active={"sparse": {"method": "xattention", "threshold": 0.5, "refresh_interval": 2},
                         "reorder": "pbs", **_SPARSE}),
    # early_stop 1: the tiny models' attention is nearly uniform, a smaller bound never stops the walk;
    # refresh_interval 2: the score-sorted table of a reused selection
    "early_stop": Entry(never={"warmup_steps": 100},
                        active={"sparse": {"method": "topp", "top_p": 0.9, "early_stop": 1.0, "refresh_interval": 2},
                                **_SPARSE}),
}


def registered_cache_methods() -> list[str]:
    """Every user-facing caching method and alias in the library's registry (``dit_accel.caching``)."""
    from dit_accel.caching import alias_names, method_names

    return [*method_names(), *sorted(alias_names())]


CACHE_FEATURES = registered_cache_methods()
FEATURES = {**{name: "cache" for name in CACHE_FEATURES}, **{name: "guidance" for name in GUIDANCE},
            **{name: "attention" for name in ATTENTION}}


def entry(feature: str) -> Entry:
    kind = FEATURES[feature]
    if kind == "cache":
        return cache_entry(feature)
    table = {"guidance": GUIDANCE, "attention": ATTENTION}[kind]
    if feature not in table:
        pytest.fail(f"{kind} feature {feature!r} has no entry in {'CACHE_METHODS' if kind == 'cache' else kind.upper()}"
                    " of tests/test_conformance.py: add its never-reuse and active settings")
    return table[feature]


def section(feature: str, fields: dict) -> dict:
    kind = FEATURES[feature]
    if kind == "cache":
        return {"cache": {"method": feature, **fields}}
    if kind == "guidance":
        return {"guidance": {"method": "adaptive", **fields}}
    return {"attention": fields}


# Library bugs known at the time of writing: (test, feature, family, variant) -> one-line reason; "*"
# matches anything. strict xfail, so a fix shows up as XPASS: then delete the line.
KNOWN_BUGS: dict[tuple[str, str, str, str], str] = {
    ("light_cache", "profiling_dit", "flux2", "*"): "ProfilingDiT's calibration reads q/k through the attention's "
    "to_q/to_k; FLUX.2's single-stream blocks fuse them into to_qkv_mlp_proj",
}


def known_bug(test: str, feature: str, family: str, variant: str = "") -> list:
    for (t, fe, fa, va), reason in KNOWN_BUGS.items():
        if t == test and fe in (feature, "*") and fa in (family, "*") and va in (variant, "*"):
            return [pytest.mark.xfail(strict=True, reason=reason)]
    return []


def cases(test: str, features, families=tuple(FAMILIES), variants=None) -> list:
    """pytest params (feature, family[, variant]) with the known-bug marks; ``variants(feature, family)``
    lists the variants of a (feature, family) case."""
    out = []
    for feature in features:
        for family in families:
            for variant in (variants(feature, family) if variants else [""]):
                values = (feature, family, variant) if variants else (feature, family)
                out.append(pytest.param(*values, marks=known_bug(test, feature, family, variant),
                                        id="-".join(values)))
    return out


# ---------------------------------------------------------------------------------------------------
# Shared pipelines, baselines, calibrated policies (built once per session)
# ---------------------------------------------------------------------------------------------------


def base_overrides(feature: str | None, family: str) -> dict:
    return dict(ENTRIES[family].attention_size) if feature and FEATURES[feature] == "attention" else {}


def call_kwargs(family: str, **overrides: Any) -> dict:
    return tiny_call_kwargs(family, **overrides)


def generate(pipe, family: str, **overrides: Any) -> torch.Tensor:
    out = pipe(**call_kwargs(family, **overrides))
    return (out.frames if hasattr(out, "frames") else out.images).float()


def _key(family: str, overrides: dict) -> tuple:
    return family, repr(sorted(overrides.items()))


class Session:
    """One shared pipeline per family, its untouched outputs and calibrated policies (lazily, memoised)."""

    def __init__(self) -> None:
        self._pipes: dict[str, Any] = {}
        self._cal_pipes: dict[str, Any] = {}
        self._baselines: dict[tuple, torch.Tensor] = {}
        self._policies: dict[tuple, Any] = {}
        self._fresh: dict[tuple, tuple] = {}

    def pipe(self, family: str):
        if family not in self._pipes:
            pipe = tiny_pipeline(family)
            generate(pipe, family)  # diffusers leaves an empty registry behind on a first call: be past it
            self._pipes[family] = pipe
        assert not dit_accel.is_accelerated(self._pipes[family]), "a previous test left the pipeline accelerated"
        return self._pipes[family]

    def baseline(self, family: str, **overrides: Any) -> torch.Tensor:
        key = _key(family, overrides)
        if key not in self._baselines:
            pipe = self.pipe(family)
            self._baselines[key] = generate(pipe, family, **overrides)
        return self._baselines[key]

    def fresh(self, feature: str, family: str, **overrides: Any) -> tuple[torch.Tensor, dict]:
        """Output and ``stats().to_dict()`` of one call on a freshly accelerated pipeline (active settings)."""
        key = (feature, *_key(family, overrides))
        if key not in self._fresh:
            pipe = self.pipe(family)
            with dit_accel.accelerated(pipe, self.policy(feature, family, "active")):
                out = generate(pipe, family, **overrides)
                self._fresh[key] = out, dit_accel.stats(pipe).to_dict()
        return self._fresh[key]

    def policy(self, feature: str, family: str, variant: str):
        """The feature's ``never`` / ``active`` policy, calibrated on an identical twin pipeline if needed."""
        key = (feature, family, variant)
        if key in self._policies:
            return self._policies[key]
        e = entry(feature)
        fields = e.active if variant == "active" else {**e.active, **e.never}
        spec = {"name": f"{feature}-{variant}", **section(feature, fields)}
        if e.calibrate is not None:
            if variant == "never" and e.never_after_calibration:
                active = self.policy(feature, family, "active")
                if FEATURES[feature] == "attention":
                    spec = dataclasses.replace(active, name=spec["name"], attention=active.attention.replace(**e.never))
                else:
                    spec = dataclasses.replace(active.replace(**e.never), name=spec["name"])
            else:
                spec = self._calibrate(feature, family, spec)
        self._policies[key] = spec
        return spec

    def _calibrate(self, feature: str, family: str, spec: dict):
        if family not in self._cal_pipes:  # a twin (same seed, same weights): the shared pipe stays untouched
            self._cal_pipes[family] = tiny_pipeline(family)
        pipe = self._cal_pipes[family]
        kwargs = call_kwargs(family, **base_overrides(feature, family))
        kwargs.pop("prompt", None)
        kwargs.pop("class_labels", None)
        prompts = list(ENTRIES[family].prompts)[:entry(feature).calibration_prompts]
        return dit_accel.calibrate(pipe, prompts, spec, **kwargs)


@pytest.fixture(scope="session")
def session() -> Session:
    return Session()


# ---------------------------------------------------------------------------------------------------
# Observation through public module state
# ---------------------------------------------------------------------------------------------------


def block_modules(pipe, family: str) -> list[torch.nn.Module]:
    return [block for name in ENTRIES[family].blocks for block in getattr(pipe.transformer, name)]


def block_names(family: str, pipe) -> list[str]:
    return [f"{name}.{i}" for name in ENTRIES[family].blocks for i in range(len(getattr(pipe.transformer, name)))]


def _module_state(module: torch.nn.Module) -> tuple:
    registry = module.__dict__.get("_diffusers_hook")
    processor = getattr(module, "processor", None)
    return (
        tuple(sorted(module.__dict__)),
        None if registry is None else tuple(registry.hooks),
        id(module.__dict__["forward"]) if "forward" in module.__dict__ else None,
        tuple(module._forward_pre_hooks), tuple(module._forward_hooks),
        tuple(module._forward_pre_hooks_with_kwargs), tuple(module._forward_hooks_with_kwargs),
        tuple(module._forward_hooks_always_called), tuple(module._backward_hooks),
        tuple(module._backward_pre_hooks),
        None if processor is None else (type(processor).__name__, id(processor)),
        tuple((name, id(p)) for name, p in module._parameters.items()),
        tuple((name, id(b)) for name, b in module._buffers.items()),
        tuple((name, id(m)) for name, m in module._modules.items()),
    )


def footprint(pipe) -> dict:
    """Everything ``accelerate`` could leave behind, as comparable values."""
    snap: dict[Any, Any] = {"pipeline.__dict__": tuple(sorted(pipe.__dict__)),
                            "torch function modes": torch._C._len_torch_function_stack(),
                            "scheduler.set_timesteps": "set_timesteps" in pipe.scheduler.__dict__}
    for cname, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for mname, module in component.named_modules():
                snap[(cname, mname)] = _module_state(module)
        elif hasattr(component, "__dict__"):
            snap[cname] = tuple(sorted(vars(component)))
    return snap


def footprint_diff(before: dict, after: dict) -> list:
    return [(key, before.get(key), after.get(key)) for key in {*before, *after} if before.get(key) != after.get(key)]


class Observed:
    """What really ran, seen through torch forward pre-hooks registered *after* ``accelerate``: every
    transformer call (with its CFG branch for separate-CFG pipelines, told by its text embeddings)
    and, per block, the calls in which the block's self-attention ran (a reused block only passes
    through; its norm layers may still run: TeaCache computes block 0's modulated input with them)."""

    def __init__(self, pipe, family: str) -> None:
        self.transformer = pipe.transformer
        self.blocks = block_modules(pipe, family)
        self.attention = ENTRIES[family].attention
        self.separate = CFG_LAYOUT[family] == "separate"
        self.calls: list[dict] = []
        self._cond: torch.Tensor | None = None
        self.handles: list = []

    def __enter__(self) -> "Observed":
        self.handles.append(self.transformer.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for i, block in enumerate(self.blocks):
            attention = getattr(block, self.attention)
            self.handles.append(attention.register_forward_pre_hook(lambda module, args, i=i: self._on_block(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _on_call(self, module, args, kwargs) -> None:
        branch = "default"
        if self.separate:
            text = kwargs.get("encoder_hidden_states")
            if self._cond is None:
                self._cond = text  # WanPipeline runs the conditional call of each step first
            same = text is self._cond or (text.shape == self._cond.shape and torch.equal(text, self._cond))
            branch = "cond" if same else "uncond"
        self.calls.append({"branch": branch, "ran": set()})

    def _on_block(self, index: int) -> None:
        self.calls[-1]["ran"].add(index)

    def computed(self, index: int) -> int:
        return sum(index in call["ran"] for call in self.calls)

    def per_branch(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for call in self.calls:
            counts[call["branch"]] = counts.get(call["branch"], 0) + 1
        return counts

    def schedule(self, branch: str, index: int) -> list[bool]:
        """Per call of ``branch``: did block ``index`` compute?"""
        return [index in call["ran"] for call in self.calls if call["branch"] == branch]


# diffusers' guiders (e.g. MotifVideoPipeline's ClassifierFreeGuidance) name the CFG branches' cache contexts so
GUIDER_BRANCHES = {"pred_cond": "cond", "pred_uncond": "uncond"}


def check_stats(stats: dit_accel.Stats, seen: Observed, family: str, pipe, steps: int = STEPS) -> None:
    """Stats of one call agree with themselves and with what the forward hooks saw."""
    n = len(seen.blocks)
    assert stats.block_names == block_names(family, pipe)
    assert len(stats.computed) == len(stats.reused) == n
    assert stats.num_inference_steps == steps
    skipped = stats.guidance_skipped_calls
    observed = seen.per_branch()
    if seen.separate:
        # a call Adaptive Guidance skips still enters the transformer (as a passthrough) but is no step
        expected = {"cond": observed.get("cond", 0), "uncond": observed.get("uncond", 0) - skipped}
        branches = {GUIDER_BRANCHES.get(k, k): v for k, v in stats.calls_per_branch.items() if v}
        assert branches == {k: v for k, v in expected.items() if v}
        assert stats.transformer_calls == len(seen.calls) - skipped
    else:
        assert len(stats.calls_per_branch) == 1, stats.calls_per_branch
        assert stats.transformer_calls == len(seen.calls)
    for i in range(n):
        assert stats.computed[i] + stats.reused[i] == stats.transformer_calls, (i, stats.computed, stats.reused)
        assert stats.computed[i] == seen.computed(i), (i, stats.computed, [seen.computed(j) for j in range(n)])
    assert 0.0 <= stats.saved_share <= 1.0
    total = stats.blocks_computed + stats.blocks_reused
    assert stats.saved_share == (stats.blocks_reused / total if total else 0.0)


def with_guidance(policy, fields: dict):
    """``policy`` (a dict or a calibrated Policy) with an Adaptive Guidance section added."""
    guidance = {"method": "adaptive", **fields}
    if isinstance(policy, dit_accel.Policy):
        return dataclasses.replace(policy, name=f"{policy.name}+guidance", guidance=guidance)
    return {**policy, "name": f"{policy['name']}+guidance", "guidance": guidance}


def run_observed(pipe, family: str, stats_of=None, **overrides: Any) -> tuple[torch.Tensor, dit_accel.Stats,
                                                                             Observed]:
    """One call of ``pipe`` watched by :class:`Observed`; ``stats_of``: the accelerated pipeline (default: ``pipe``)."""
    with Observed(pipe, family) as seen:
        out = generate(pipe, family, **overrides)
    return out, dit_accel.stats(pipe if stats_of is None else stats_of), seen


def reused_work(stats: dit_accel.Stats) -> bool:
    """The call reused cached work: whole blocks, or (sub-block caching: every block runs) attention / FFN
    sub-modules, ``stats.extra["sub_blocks"]``."""
    sub = stats.extra.get("sub_blocks")
    if sub is not None:
        return sum(sub["reused"]) > 0 and sum(sub["computed"]) > 0
    return stats.blocks_reused > 0 and 0 < stats.saved_share < 1


def feature_did_nothing(feature: str, stats: dit_accel.Stats) -> None:
    assert stats.blocks_reused == 0, stats.reused
    assert sum(stats.extra.get("sub_blocks", {}).get("reused", [])) == 0, stats.extra["sub_blocks"]
    assert stats.guidance_skipped_calls == 0 and not stats.guidance_switch_step
    if FEATURES[feature] == "attention":
        calls = stats.extra["attention"]["calls"]
        assert calls["sparse"] == 0 and calls.get("quant_dense", 0) == 0, calls


# The batch changes twice: as two prompts for every feature, and as several images per prompt for these.
PER_PROMPT_FEATURES = ("fora", "fbcache", "taylorseer", "adaptive_guidance", "xattention")
# Generation boundaries are the runtime's business, not a method's: a representative subset suffices here.
RUNTIME_FEATURES = ("fora", "fbcache", "taylorseer", "magcache", "adaptive_guidance", "xattention")


def changes(feature: str, family: str) -> list[str]:
    return [c for c in FAMILIES[family].changes if c != "per_prompt" or feature in PER_PROMPT_FEATURES]


# ---------------------------------------------------------------------------------------------------
# The tables themselves
# ---------------------------------------------------------------------------------------------------


def test_every_registered_method_declares_its_exact_and_reusing_settings():
    """A caching method added to the registry is in this suite through what it declares (no table to edit)."""
    for name in CACHE_FEATURES:
        e = cache_entry(name)
        assert e.never and e.active, name


# ---------------------------------------------------------------------------------------------------
# 1. Off is exact
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_none_preset_is_exact(session, family):
    pipe, base = session.pipe(family), session.baseline(family)
    with dit_accel.accelerated(pipe, "none"):
        out, stats, seen = run_observed(pipe, family)
    assert torch.equal(out, base)
    assert stats.method == "none" and stats.blocks_reused == 0
    check_stats(stats, seen, family, pipe)


@pytest.mark.parametrize(("feature", "family"), cases("off_is_exact", FEATURES))
def test_off_is_exact(session, feature, family):
    pipe, over = session.pipe(family), base_overrides(feature, family)
    base = session.baseline(family, **over)
    policy = session.policy(feature, family, "never")
    with dit_accel.accelerated(pipe, policy):
        out, stats, seen = run_observed(pipe, family, **over)
    assert torch.equal(out, base), "a configuration that never reuses must be bit-exact"
    feature_did_nothing(feature, stats)
    check_stats(stats, seen, family, pipe)


@pytest.mark.parametrize(("feature", "family"), cases("active_acts", FEATURES))
def test_active_setting_acts(session, feature, family):
    """The ``active`` settings really reuse / drop / sparsify, so the state tests below test something."""
    pipe, over = session.pipe(family), base_overrides(feature, family)
    base = session.baseline(family, **over)
    with dit_accel.accelerated(pipe, session.policy(feature, family, "active")):
        out, stats, seen = run_observed(pipe, family, **over)
    assert torch.isfinite(out).all()
    check_stats(stats, seen, family, pipe)
    kind = FEATURES[feature]
    if kind == "cache":
        assert reused_work(stats), (stats.reused, stats.extra.get("sub_blocks"))
    elif kind == "guidance":
        if CFG_LAYOUT[family] == "none":  # nothing to drop: exact
            assert stats.guidance_skipped_calls == 0 and torch.equal(out, base)
        else:
            assert stats.guidance_skipped_calls == STEPS - 1 and stats.guidance_switch_step
    else:
        calls = stats.extra["attention"]["calls"]
        assert calls["sparse"] + calls.get("quant_dense", 0) > 0 and calls["dense_unhandled"] == 0, calls


# ---------------------------------------------------------------------------------------------------
# 2. remove leaves no footprint
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("feature", "family"), cases("remove", FEATURES))
def test_remove_leaves_no_footprint(session, feature, family):
    pipe, over = session.pipe(family), base_overrides(feature, family)
    base = session.baseline(family, **over)
    policy = session.policy(feature, family, "active")
    before = footprint(pipe)
    dit_accel.accelerate(pipe, policy)
    try:
        attached = footprint(pipe)
        generate(pipe, family, **over)
        assert footprint(pipe)["torch function modes"] == before["torch function modes"]
    finally:
        dit_accel.remove(pipe)
    assert attached != before
    assert footprint_diff(before, footprint(pipe)) == []
    assert "set_timesteps" not in pipe.scheduler.__dict__
    assert not dit_accel.is_accelerated(pipe)
    assert torch.equal(generate(pipe, family, **over), base)


@pytest.mark.parametrize(("feature", "family"),
                         cases("refused", [f for f in FEATURES if entry(f).calibrate == "required"]))
def test_refused_accelerate_leaves_no_footprint(session, feature, family):
    """An uncalibrated method is refused (PolicyError naming calibrate) before anything is attached."""
    pipe = session.pipe(family)
    before = footprint(pipe)
    with pytest.raises(dit_accel.PolicyError, match="calibrat"):
        dit_accel.accelerate(pipe, section(feature, entry(feature).active))
    assert not dit_accel.is_accelerated(pipe)
    assert footprint_diff(before, footprint(pipe)) == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_accelerated_context_cleans_up_after_an_error(session, family):
    pipe, base = session.pipe(family), session.baseline(family)
    before = footprint(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with dit_accel.accelerated(pipe, session.policy("fora", family, "active")):
            generate(pipe, family)
            raise RuntimeError("boom")
    assert not dit_accel.is_accelerated(pipe)
    assert footprint_diff(before, footprint(pipe)) == []
    assert torch.equal(generate(pipe, family), base)


# ---------------------------------------------------------------------------------------------------
# 3. State resets between calls
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("feature", "family"), cases("identical_calls", FEATURES))
def test_identical_calls_give_identical_outputs(session, feature, family):
    pipe, over = session.pipe(family), base_overrides(feature, family)
    with dit_accel.accelerated(pipe, session.policy(feature, family, "active")):
        first, stats1, _ = run_observed(pipe, family, **over)
        second, stats2, seen = run_observed(pipe, family, **over)
        dit_accel.reset(pipe)  # a hand-made generation boundary changes nothing for a pipeline call
        third, stats3, _ = run_observed(pipe, family, **over)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert stats1.to_dict() == stats2.to_dict() == stats3.to_dict()
    check_stats(stats2, seen, family, pipe)


@pytest.mark.parametrize(("feature", "family", "change"), cases("state_reset", FEATURES, variants=changes))
def test_call_after_another_call_equals_a_fresh_call(session, feature, family, change):
    """Call B after call A (other steps / resolution / batch) == call B freshly accelerated; then A
    again == A freshly accelerated; stats after each call describe that call only."""
    pipe, over = session.pipe(family), base_overrides(feature, family)
    other = {**over, **FAMILIES[family].changes[change]}
    steps = other.get("num_inference_steps", STEPS)
    policy = session.policy(feature, family, "active")
    fresh_b, fresh_b_stats = session.fresh(feature, family, **other)
    fresh_a, fresh_a_stats = session.fresh(feature, family, **over)
    with dit_accel.accelerated(pipe, policy):
        generate(pipe, family, **over)
        got_b, b_stats, seen_b = run_observed(pipe, family, **other)
        got_a, a_stats, seen_a = run_observed(pipe, family, **over)
    assert torch.equal(got_b, fresh_b), "call B saw state of call A"
    assert b_stats.to_dict() == fresh_b_stats
    check_stats(b_stats, seen_b, family, pipe, steps=steps)
    assert torch.equal(got_a, fresh_a), "call A saw state of call B"
    assert a_stats.to_dict() == fresh_a_stats
    check_stats(a_stats, seen_a, family, pipe)


def fresh_scheduler(pipe):
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


@pytest.mark.parametrize(("feature", "family"), cases("scheduler_swap", FEATURES))
def test_scheduler_swap_starts_a_new_generation(session, feature, family):
    """``pipe.scheduler = X.from_config(pipe.scheduler.config)`` between calls (a common diffusers
    idiom): the next call is still a new generation, with stats of its own."""
    pipe, over = session.pipe(family), base_overrides(feature, family)
    policy = session.policy(feature, family, "active")
    fresh, fresh_stats = session.fresh(feature, family, seed=1, **over)
    original = pipe.scheduler
    try:
        with dit_accel.accelerated(pipe, policy):
            generate(pipe, family, **over)
            pipe.scheduler = fresh_scheduler(pipe)
            got, stats, seen = run_observed(pipe, family, seed=1, **over)
        assert "set_timesteps" not in pipe.scheduler.__dict__
    finally:
        pipe.scheduler = original
    assert torch.equal(got, fresh), "the call after the swap saw state of the call before it"
    assert stats.to_dict() == fresh_stats
    check_stats(stats, seen, family, pipe)


@pytest.mark.parametrize(("feature", "family"), cases("shared_transformer", RUNTIME_FEATURES))
def test_second_pipeline_sharing_the_transformer(session, feature, family):
    """A second pipeline built from the same components (own scheduler) runs the accelerated
    transformer: its call is a new generation too, and ``stats`` describe it."""
    pipe, over = session.pipe(family), base_overrides(feature, family)
    policy = session.policy(feature, family, "active")
    twin = type(pipe)(**{**pipe.components, "scheduler": fresh_scheduler(pipe)})
    twin.set_progress_bar_config(disable=True)
    fresh, fresh_stats = session.fresh(feature, family, seed=1, **over)
    with dit_accel.accelerated(pipe, policy):
        generate(pipe, family, **over)
        got, stats, seen = run_observed(twin, family, stats_of=pipe, seed=1, **over)
        again, again_stats, _ = run_observed(pipe, family, seed=1, **over)
    assert not dit_accel.is_accelerated(twin)
    assert torch.equal(got, fresh) and torch.equal(again, fresh)
    assert stats.to_dict() == fresh_stats == again_stats.to_dict()
    check_stats(stats, seen, family, pipe)


# ---------------------------------------------------------------------------------------------------
# 4. CFG branches isolated; 6. exact counts of a fixed schedule
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("feature", "family"), cases("branches", ["fora"]))
def test_each_cfg_branch_follows_its_own_schedule(session, feature, family):
    """FORA interval 2 over 4 steps: every block computes on steps 0 and 2 of every branch."""
    pipe = session.pipe(family)
    with dit_accel.accelerated(pipe, {"name": "fora2", "cache": {"method": "fora", "interval": 2}}):
        _, stats, seen = run_observed(pipe, family)
    check_stats(stats, seen, family, pipe)
    if CFG_LAYOUT[family] == "separate":
        assert stats.calls_per_branch == {"cond": STEPS, "uncond": STEPS}
        branches = ["cond", "uncond"]
    else:  # batched CFG (one call holds both halves) or guidance-distilled: one branch
        assert list(stats.calls_per_branch.values()) == [STEPS]
        branches = ["default"]
    for i in range(len(seen.blocks)):
        for branch in branches:
            assert seen.schedule(branch, i) == [True, False, True, False], (branch, i)
    assert stats.reused == [2 * len(branches)] * len(seen.blocks)
    assert stats.computed == [2 * len(branches)] * len(seen.blocks)
    assert stats.saved_share == 0.5


# ---------------------------------------------------------------------------------------------------
# Adaptive Guidance composed with every caching method
# ---------------------------------------------------------------------------------------------------

CFG_FAMILIES = [f for f in FAMILIES if CFG_LAYOUT[f] != "none"]


@pytest.mark.parametrize(("feature", "family"), cases("guidance_cache", CACHE_FEATURES, CFG_FAMILIES))
def test_guidance_composes_with_cache_method(session, feature, family):
    pipe = session.pipe(family)
    policy = with_guidance(session.policy(feature, family, "active"), GUIDANCE["adaptive_guidance"].active)
    with dit_accel.accelerated(pipe, policy):
        first, stats1, seen1 = run_observed(pipe, family)
        run_observed(pipe, family, **FAMILIES[family].changes["steps"])
        second, stats2, seen2 = run_observed(pipe, family)
    assert torch.isfinite(first).all()
    assert stats1.guidance_skipped_calls == STEPS - 1
    check_stats(stats1, seen1, family, pipe)
    assert torch.equal(first, second)
    assert stats1.to_dict() == stats2.to_dict()


# ---------------------------------------------------------------------------------------------------
# 5. torch.compile compiles once per code path
# ---------------------------------------------------------------------------------------------------

COMPILE_POLICIES: dict[str, Any] = {
    "fora": {"name": "fora2", "cache": {"method": "fora", "interval": 2}},  # static schedule
    "fbcache": {"name": "fb", "cache": {"method": "fbcache", "threshold": 10.0}},  # gated (one host sync per step)
    # slower extras (pytest -m slow): hooks only, a forecasting schedule, a batch that halves mid-call
    "none": "none",
    "taylorseer": {"name": "ts", "cache": {"method": "taylorseer", "interval": 2, "warmup_steps": 1}},
    "adaptive_guidance": {"name": "ag", "guidance": {"method": "adaptive", "threshold": -1.0}},
}
SLOW_COMPILE = ("none", "taylorseer", "adaptive_guidance")  # 2-11 s each: compile time dominates


def compile_cases() -> list:
    out = []
    for param in cases("compile", COMPILE_POLICIES):
        feature = param.values[0]
        marks = [*param.marks, *([pytest.mark.slow] if feature in SLOW_COMPILE else [])]
        out.append(pytest.param(*param.values, marks=marks, id=param.id))
    return out


@pytest.mark.parametrize(("feature", "family"), compile_cases())
def test_compiled_blocks_compile_once_per_code_path(session, feature, family):
    """Blocks compiled first (regional compilation, as ``compile_repeated_blocks``), then accelerated:
    the first call compiles every code path it meets, the second call compiles nothing new, and the
    compiled model computes exactly what the eager accelerated one does (no decision baked into a graph).
    (No forward hooks inside the compiled blocks here: they would change dynamo's guards themselves.)"""
    policy = COMPILE_POLICIES[feature]
    pipe = session.pipe(family)
    with dit_accel.accelerated(pipe, policy):
        eager = generate(pipe, family)
        eager_stats = dit_accel.stats(pipe)
    torch._dynamo.reset()
    compiled = tiny_pipeline(family)  # its own pipeline: compiled blocks carry compile state
    counter = CompileCounter()
    for block in block_modules(compiled, family):
        block.compile(backend=counter)
    dit_accel.accelerate(compiled, policy)
    try:
        first = generate(compiled, family)
        frames = counter.frame_count
        second = generate(compiled, family)
        stats = dit_accel.stats(compiled)
    finally:
        dit_accel.remove(compiled)
        torch._dynamo.reset()
    assert frames > 0, "nothing was compiled"
    assert counter.frame_count == frames, f"the second call compiled {counter.frame_count - frames} new frames"
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert stats.to_dict() == eager_stats.to_dict()
    if feature in ("fora", "fbcache", "taylorseer"):
        assert stats.blocks_reused > 0


# ---------------------------------------------------------------------------------------------------
# Light set: every other registered family (tier-1 records with conformance=False, coverage families)
# ---------------------------------------------------------------------------------------------------
# What each family must guarantee at least, at a fraction of the full matrix's cost: off (the ``none``
# preset) and ``remove`` are bit-exact and leave no footprint, a call after a call with other steps equals
# a fresh call, every registered caching method runs once and reuses with consistent statistics, and
# sparse attention reaches the sparse path with no dense fallback where the adapter says it applies.


def _sparse_applies(family: str) -> bool:
    return ADAPTERS[get_family(family).transformer_class].sparse_unsupported is None


@pytest.mark.parametrize("family", list(LIGHT))
def test_light_off_and_remove_are_exact(session, family):
    pipe, base = session.pipe(family), session.baseline(family)
    with dit_accel.accelerated(pipe, "none"):
        out, stats, seen = run_observed(pipe, family)
    assert torch.equal(out, base)
    assert stats.blocks_reused == 0
    check_stats(stats, seen, family, pipe)
    before = footprint(pipe)
    dit_accel.accelerate(pipe, session.policy("fora", family, "active"))
    try:
        attached = footprint(pipe)
        generate(pipe, family)
    finally:
        dit_accel.remove(pipe)
    assert attached != before
    assert footprint_diff(before, footprint(pipe)) == []
    assert torch.equal(generate(pipe, family), base)


@pytest.mark.parametrize(("feature", "family"), cases("light_cache", CACHE_FEATURES, tuple(LIGHT)))
def test_light_cache_method_runs(session, feature, family):
    pipe = session.pipe(family)
    with dit_accel.accelerated(pipe, session.policy(feature, family, "active")):
        out, stats, seen = run_observed(pipe, family)
    assert torch.isfinite(out).all()
    check_stats(stats, seen, family, pipe)
    assert reused_work(stats), (stats.reused, stats.extra.get("sub_blocks"))


@pytest.mark.parametrize(("feature", "family"), cases("light_reset", ["fbcache"], tuple(LIGHT)))
def test_light_call_after_other_steps_equals_a_fresh_call(session, feature, family):
    pipe = session.pipe(family)
    other = LIGHT[family].changes["steps"]
    fresh, fresh_stats = session.fresh(feature, family, **other)
    with dit_accel.accelerated(pipe, session.policy(feature, family, "active")):
        generate(pipe, family)
        got, stats, seen = run_observed(pipe, family, **other)
    assert torch.equal(got, fresh), "the call saw state of the call before it"
    assert stats.to_dict() == fresh_stats
    check_stats(stats, seen, family, pipe, steps=other["num_inference_steps"])


@pytest.mark.parametrize(("feature", "family"),
                         cases("light_sparse", ["topp"], tuple(f for f in LIGHT if _sparse_applies(f))))
def test_light_sparse_attention_reaches_the_sparse_path(session, feature, family):
    pipe, over = session.pipe(family), base_overrides(feature, family)
    with dit_accel.accelerated(pipe, session.policy(feature, family, "active")):
        out, stats, seen = run_observed(pipe, family, **over)
    assert torch.isfinite(out).all()
    check_stats(stats, seen, family, pipe)
    calls = stats.extra["attention"]["calls"]
    assert calls["sparse"] > 0 and calls["dense_unhandled"] == 0, calls
