"""``dit_accel.calibrate``: run a few generations, record what a caching method needs, return a
policy that carries it (and saves to YAML like any other).

A hidden recording method computes every block and records, per CFG branch and step: the
relative L1 change of the first block's modulated input and of its timestep-embedding
argument (TeaCache's inputs), and the relative L1 change and token-wise magnitude ratio of the
block-stack residual (TeaCache's target, MagCache's γ). Each method that needs calibration
implements ``calibrated(config, records, family) -> config``.

Per-block and pairwise statistics (BAC, ERTACache) are recorded when ``RecordConfig(per_block=True)``
(a method asks for it with a class attribute ``record_options = {"per_block": True}``). Every
block's input and output are then watched (the single whole-stack range is unchanged, so the
whole-stack statistics are exactly those of the default recorder) and each step's row gains:

* ``block_dist[i][a]`` for every earlier step ``a`` of the branch: the relative L1 error of
  block ``i``'s output if its residual from step ``a`` were reused on this step's input,
  ‖r_t − r_a‖₁ / ‖out_t‖₁ — the quantity BAC's scheduler trades off;
* ``stack_dist[a]`` (‖R_t − R_a‖₁ / ‖R_t‖₁ for the whole-stack residual R) and ``stack_fit[a]``
  = (α, β, error after fit): the least-squares R_t ≈ α·R_a + β and its relative L1 error
  (ERTACache's residual rectification).

All of these are computed on a fixed random sketch of ``sketch_size`` elements of each tensor
(the same elements at every step, per branch and shape), so the pairwise tables cost memory
proportional to steps × blocks × sketch_size, not to the activations.

Attention statistics (ProfilingDiT) are recorded when ``RecordConfig(attention_stats=True)``:
a temporary forward pre-hook on every block's attention module (``adapter.attention_module``)
recomputes, from the module's ``to_q``/``to_k`` (and ``norm_q``/``norm_k``, ``heads``), the
self-attention rows softmax(q·Kᵀ/√d) of ``attention_queries`` random query tokens against all
keys of the attention's ``hidden_states`` argument (the visual tokens; joint text tokens are not
included), and each step's row gains ``attn_entropy[i]``: block ``i``'s attention entropy divided
by log(number of keys), averaged over the sampled queries, heads and batch (1 = uniform, 0 = one
key), and ``attn_topk[i]``: the attention mass on the top ``attention_topk`` share of keys. The
hooks exist only while ``calibrate`` runs (``Recorder.close``); the blocks' outputs are unchanged.
"""

from __future__ import annotations

import dataclasses

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .adapters.base import call_argument
from .api import _runtimes, accelerated
from .calibrated_for import CalibratedFor
from .config import ConfigBase, PolicyError, option
from .policies import get_method
from .policies.base import BlockCall, BranchState, CacheMethod, CachePlan
from .policies.dbcache import relative_l1
from .quant import quantized
from .policy import Policy, PolicyLike, load_policy


@dataclass(frozen=True)
class RecordConfig(ConfigBase):
    section: ClassVar[str] = "cache"
    method: str = option("_record", choices=("_record",))
    per_block: bool = option(False, doc="also record per-block and pairwise residual statistics (BAC, ERTACache)")
    sketch_size: int = option(16384, ge=16, doc="elements sampled per tensor for the pairwise statistics")
    attention_stats: bool = option(False, doc="also record per-block self-attention entropy / top-k mass "
                                              "(ProfilingDiT)")
    attention_queries: int = option(64, ge=1, doc="query tokens sampled per attention call")
    attention_topk: float = option(0.1, gt=0.0, le=1.0, doc="share of keys whose attention mass is recorded")


def _rel(current: torch.Tensor | None, previous: torch.Tensor | None) -> float:
    if current is None or previous is None or current.shape != previous.shape:
        return math.nan
    return float(relative_l1(current.float(), previous.float(), per_sample=False))


class Recorder(CacheMethod):
    """Computes everything, records per-step statistics (see module docstring)."""

    name = "_record"
    config_cls = RecordConfig

    def __init__(self, config, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        self.records: list[dict[str, Any]] = []
        self._attention: dict[int, tuple[float, float]] = {}
        self._handles: list = []
        if self.config.attention_stats:
            for block in blocks:
                attn = getattr(block.module, adapter.attention_module, None)
                if attn is None or not all(hasattr(attn, a) for a in ("to_q", "to_k", "heads")):
                    raise PolicyError(f"attention statistics: block {block.name} has no attention module "
                                      f"{adapter.attention_module!r} with to_q/to_k/heads")
                self._handles.append(attn.register_forward_pre_hook(
                    lambda module, args, kwargs, i=block.index: self._attention_hook(i, module, args, kwargs),
                    with_kwargs=True))

    def close(self) -> None:
        """Remove the temporary attention hooks (calibration done)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _attention_hook(self, index: int, attn: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None
        self._attention[index] = attention_statistics(attn, hidden, self.config.attention_queries,
                                                      self.config.attention_topk)
        return None

    def make_plan(self, num_blocks: int) -> CachePlan:
        if self.config.per_block:
            every = frozenset(range(num_blocks))
            return CachePlan(ranges=((0, num_blocks),), watch_inputs=every, watch_outputs=every)
        return CachePlan(ranges=((0, num_blocks),), watch_inputs=frozenset({0}))

    def _sketch(self, state: BranchState, tensor: torch.Tensor) -> torch.Tensor:
        """The fixed random sample of ``tensor``'s elements for this branch (float32 copy)."""
        flat = tensor.reshape(-1)
        idx = state.method.get("sketch_idx")
        if idx is None or idx.device != flat.device or int(idx.max()) >= flat.numel():
            g = torch.Generator().manual_seed(0)
            n = min(self.config.sketch_size, flat.numel())
            idx = torch.randperm(flat.numel(), generator=g)[:n] if flat.numel() <= 1 << 22 else \
                torch.randint(flat.numel(), (n,), generator=g)
            idx = state.method["sketch_idx"] = idx.to(flat.device)
        return flat.index_select(0, idx).float()

    def on_input(self, call: BlockCall, state: BranchState) -> None:
        m = state.method
        if self.config.per_block:
            m[f"block_in:{call.block.index}"] = self._sketch(state, call.hidden)
            if call.block.index != 0:
                return
        modulated = self.adapter.modulated_input(call.block, call.args, call.kwargs) \
            if self.adapter.modulated_input_fn is not None else None
        temb = call_argument(call.block.meta, "temb", call.args, call.kwargs)
        m["row"] = {"branch": state.key[0], "step": state.step,
                    "modulated_change": _rel(modulated, m.get("modulated")),
                    "temb_change": _rel(temb, m.get("temb"))}
        m["modulated"], m["temb"] = modulated, temb
        if self.config.per_block:
            m["row"]["block_dist"] = [None] * self.num_blocks
            m["open_row"] = m["row"]  # on_output of the blocks (the last one after on_range_computed) fills it

    def should_reuse(self, range_id: int, state: BranchState) -> bool:
        return False

    def on_range_computed(self, range_id, residual, encoder_residual, encoder_out_is_none, state) -> None:
        m = state.method
        previous = m.get("residual")
        row = m.pop("row")
        row["residual_change"] = _rel(residual, previous)
        if previous is not None and previous.shape == residual.shape:
            ratio = residual.float().norm(dim=-1) / previous.float().norm(dim=-1).clamp_min(1e-12)
            row["mag_ratio"], row["mag_std"] = float(ratio.mean()), float(ratio.std())
        else:
            row["mag_ratio"], row["mag_std"] = math.nan, math.nan
        m["residual"] = residual
        if self.config.per_block:
            self._record_stack(row, residual, state)
        if self.config.attention_stats:
            stats = [self._attention.get(i, (math.nan, math.nan)) for i in range(self.num_blocks)]
            row["attn_entropy"] = [e for e, _ in stats]
            row["attn_topk"] = [k for _, k in stats]
            self._attention = {}
        self.records.append(row)  # a per-block run completes the row in on_output of the last block

    def _record_stack(self, row: dict, residual: torch.Tensor, state: BranchState) -> None:
        current = self._sketch(state, residual)
        history = state.method.setdefault("stack_history", [])
        norm = float(current.abs().sum().clamp_min(1e-12))
        row["stack_dist"], row["stack_fit"] = [], []
        for previous in history:
            row["stack_dist"].append(float((current - previous).abs().sum()) / norm)
            centred = previous - previous.mean()
            alpha = float((centred * (current - current.mean())).sum() / (centred * centred).sum().clamp_min(1e-30))
            beta = float(current.mean() - alpha * previous.mean())
            row["stack_fit"].append((alpha, beta, float((current - alpha * previous - beta).abs().sum()) / norm))
        history.append(current)

    def on_output(self, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None, state: BranchState) -> None:
        m = state.method
        row = m.get("open_row")
        block_in = m.pop(f"block_in:{index}", None)
        if row is None or block_in is None or row["step"] != state.step:
            return
        out = self._sketch(state, hidden)
        residual = out - block_in
        history = m.setdefault(f"block_history:{index}", [])
        norm = float(out.abs().sum().clamp_min(1e-12))
        row["block_dist"][index] = [float((residual - previous).abs().sum()) / norm for previous in history]
        history.append(residual)


def _heads(norm: torch.nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H·D) projections → (B, H, S, D), with the attention's q/k norm (per head or across heads)."""
    per_head = x.unflatten(-1, (heads, -1))
    if norm is not None:
        try:
            per_head = norm(per_head)
        except RuntimeError:  # a norm over all heads' channels (e.g. "layer_norm_across_heads")
            per_head = norm(x).unflatten(-1, (heads, -1))
    return per_head.transpose(1, 2)


@torch.no_grad()
def attention_statistics(attn: torch.nn.Module, hidden: torch.Tensor, queries: int = 64,
                         topk: float = 0.1, seed: int = 0) -> tuple[float, float]:
    """(normalised entropy, top-``topk`` key mass) of ``attn``'s self-attention on ``hidden`` (B, S, C),
    from ``queries`` random query tokens (a fixed sample): see the module docstring."""
    heads = int(attn.heads)
    tokens = hidden.shape[1]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(tokens, generator=g)[:min(queries, tokens)].to(hidden.device)
    q = _heads(getattr(attn, "norm_q", None), attn.to_q(hidden.index_select(1, rows)), heads).float()
    k = _heads(getattr(attn, "norm_k", None), attn.to_k(hidden), heads).float()
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, queries, S)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(max(tokens, 2))
    top = max(1, int(math.ceil(topk * tokens)))
    mass = probs.topk(top, dim=-1).values.sum(-1)
    return float(entropy.mean()), float(mass.mean())


def fit_polynomial(x: Sequence[float], y: Sequence[float], degree: int = 4) -> tuple[float, ...]:
    """Least-squares polynomial y ≈ P(x), highest power first (numpy.polyfit)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() <= degree:
        raise PolicyError(f"calibration recorded {int(keep.sum())} usable steps; need more than {degree} "
                          "(more prompts or steps)")
    return tuple(float(c) for c in np.polyfit(x[keep], y[keep], degree))


def per_branch_mean(records: list[dict], key: str) -> dict[str, list[float]]:
    """Mean of ``key`` over generations, per branch and step (steps with no value are dropped at the start)."""
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in records:
        if math.isfinite(row[key]):
            table[row["branch"]][row["step"]].append(row[key])
    return {branch: [float(np.mean(steps[s])) for s in sorted(steps)] for branch, steps in table.items()}


def pairwise_tables(records: list[dict], extract) -> dict[str, np.ndarray]:
    """Mean pairwise table per branch: ``table[t, a]`` (a < t) = mean over generations of
    ``extract(row)[a]`` for the rows of step t; NaN elsewhere. ``extract`` returns a list or None."""
    sums: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    steps: dict[str, int] = defaultdict(int)
    for row in records:
        values = extract(row)
        steps[row["branch"]] = max(steps[row["branch"]], row["step"] + 1)
        for a, v in enumerate(values or ()):
            if v is not None and math.isfinite(v):
                sums[row["branch"]][(row["step"], a)].append(float(v))
    tables = {}
    for branch, count in steps.items():
        table = np.full((count, count), np.nan)
        for (t, a), vs in sums[branch].items():
            table[t, a] = float(np.mean(vs))
        tables[branch] = table
    return tables


def require_per_block(records: list[dict], what: str) -> None:
    if not records or "stack_dist" not in records[0]:
        raise PolicyError(f"{what}: calibration records carry no per-block statistics "
                          "(record with RecordConfig(per_block=True))")


def call_arguments(prompt: str | dict, call_kwargs: dict) -> dict:
    """The pipeline arguments of one calibration generation: ``call_kwargs`` plus the prompt (a string
    becomes ``prompt=``; a dict of call arguments is merged as is)."""
    kwargs = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
    return {**call_kwargs, **kwargs}


class Recording(list):
    """The per-step records of a calibration run, and :attr:`calibrated_for`: what they were recorded on."""

    calibrated_for: CalibratedFor | None = None


def record(pipe: Any, prompts: Sequence[str | dict], options: dict | None = None,
           **call_kwargs: Any) -> tuple[Recording, str]:
    """Run one generation per prompt with the recording method (``RecordConfig(**options)``) attached;
    return the per-step records (with what they were recorded on) and the adapter family. The pipeline
    is left as it was.

    Step ``t`` of a record is the ``t``-th transformer call of its CFG branch (second-order samplers
    evaluate twice per step). A generation that does not start at the beginning of its schedule
    (img2img with ``strength < 1``) is refused: the tables are indexed over full schedules and serve
    partial ones at their schedule position."""
    records = Recording()
    with accelerated(pipe, Policy(name="calibration", cache=RecordConfig(**(options or {})))):
        runtime = next(iter(_runtimes(pipe).values()))
        family = runtime.adapter.family
        calls: set[int] = set()
        try:
            for prompt in prompts:
                pipe(**call_arguments(prompt, call_kwargs))
                if runtime.plan.offset:
                    raise PolicyError(
                        f"calibrate: the generation started at call {runtime.plan.offset} of its schedule (img2img "
                        "with strength < 1?); calibrate on full schedules (strength 1.0), the calibration then "
                        "serves partial ones at their schedule position")
                records.extend(runtime.method.records)
                runtime.method.records = []
                calls.update(runtime.calls.values())
        finally:
            runtime.method.close()
        pipeline = runtime.pipeline_ref() if runtime.pipeline_ref is not None else None
        scheduler = getattr(pipeline, "scheduler", None)
        records.calibrated_for = CalibratedFor(
            model=type(runtime.transformer).__name__, blocks=len(runtime.blocks),
            branches=tuple(sorted({row["branch"] for row in records})),
            calls=next(iter(calls)) if len(calls) == 1 else None,
            scheduler=type(scheduler).__name__ if scheduler is not None else None)
    return records, family


def calibrate(pipe: Any, prompts: Sequence[str | dict], policy: PolicyLike, **call_kwargs: Any) -> Policy:
    """Run one generation per prompt and return ``policy`` with the method's calibrated fields filled.

    ``prompts``: strings (passed as ``prompt=``) or dicts of call arguments (e.g.
    ``{"class_labels": [3]}``); ``call_kwargs`` go to every call (steps, size, seed...). Calibrate
    at the step count and resolution you will serve. A method whose calibration needs more than one
    recording pass (ERTACache's timestep adjustment) implements
    ``calibrate_pipeline(pipe, prompts, config, **call_kwargs) -> (config, calibrated_for)`` and runs its
    passes itself. The returned policy's ``calibrated_for`` says what it was calibrated on (model, blocks,
    CFG branches, calls per branch, scheduler); applying it to something else fails or warns
    (:mod:`dit_accel.calibrated_for`).

    A single string or dict is one prompt (not its characters or keys). Anything else than a non-empty
    sequence of strings / dicts is a PolicyError before any generation runs.
    """
    from collections.abc import Iterable, Mapping

    if isinstance(prompts, (str, Mapping)):
        prompts = [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Iterable):
        raise PolicyError(f"calibrate: prompts must be a prompt (a string, or a dict of call arguments such as "
                          f"{{'class_labels': [3]}}) or a list of them; got {type(prompts).__name__} {prompts!r:.80}")
    prompts = list(prompts)
    if not prompts:
        raise PolicyError("calibrate needs at least one prompt (a string or a dict of call arguments)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, Mapping)):
            raise PolicyError(f"calibrate: prompts[{i}] is {type(prompt).__name__} {prompt!r:.80}; each prompt must "
                              "be a string or a dict of call arguments")
    prompts = [dict(p) if isinstance(p, Mapping) else p for p in prompts]
    policy = load_policy(policy)
    if policy.attention is not None and policy.attention.needs_calibration:  # PARO orders / static masks
        from .attention.calibrate import calibrate_attention

        with quantized(pipe, policy.quant):
            policy = calibrate_attention(pipe, prompts, policy, **call_kwargs)
        if policy.cache is None or not hasattr(get_method(policy.cache.method), "calibrated"):
            return policy
    if policy.cache is None:
        raise PolicyError("policy has no cache section to calibrate")
    method = get_method(policy.cache.method)
    if not hasattr(method, "calibrated"):
        raise PolicyError(f"cache.method {policy.cache.method!r} needs no calibration")
    if not prompts:
        raise PolicyError("calibrate needs at least one prompt")
    custom = getattr(method, "calibrate_pipeline", None)
    # Cache and quantization errors compound (CacheQuant, Liu et al. 2025): calibrate the gate on the
    # quantized model it will serve, not on the full-precision one.
    with quantized(pipe, policy.quant):
        if custom is not None:
            cache, made_for = custom(pipe, prompts, policy.cache, **call_kwargs)
        else:
            records, family = record(pipe, prompts, getattr(method, "record_options", {}), **call_kwargs)
            cache, made_for = method.calibrated(policy.cache, records, family), records.calibrated_for
    # guidance, attention and quant sections kept
    return dataclasses.replace(policy, cache=cache, calibrated_for=made_for)
