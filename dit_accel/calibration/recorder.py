"""The recording method of calibration: computes every block and records, per CFG branch and step: the
relative L1 change of the first block's modulated input and of its timestep-embedding
argument (TeaCache's inputs), and the relative L1 change and token-wise magnitude ratio of the
block-stack residual (TeaCache's target, MagCache's γ). Each method that needs calibration
implements ``calibrated(config, records, family) -> config`` over the
:class:`~dit_accel.caching.records.Records` these rows become.

Per-block and pairwise statistics (BAC, ERTACache) are recorded when ``RecordConfig(per_block=True)``
(a method asks for it with a class attribute ``record_options = {"per_block": True}``). Every
block's input and output are then watched (the single whole-stack range is unchanged, so the
whole-stack statistics are exactly those of the default recorder) and each step's row gains:

* ``block_dist[i][a]`` for every earlier step ``a`` of the branch: the relative L1 error of
  block ``i``'s output if its residual from step ``a`` were reused on this step's input,
  ‖r_t − r_a‖₁ / ‖out_t‖₁ — the quantity BAC's scheduler trades off;
* ``stack_dist[a]`` (‖R_t − R_a‖₁ / ‖R_t‖₁ for the whole-stack residual R) and ``stack_fit[a]``
  = (α, β, error after fit): the least-squares R_t ≈ α·R_a + β and its relative L1 error
  (ERTACache's residual rectification), and ``stack_cos[a]``: the cosine similarity of R_t and R_a
  (Step Rehash). ``RecordConfig(stack_pairwise=True)`` records these three without watching every block.

``RecordConfig(stack_rows=n)`` keeps, per call, ``n`` fixed random token rows of the whole-stack residual
with all their channels (``row["stack_rows"]``: a float32 CPU tensor (n, C)), for per-channel fits
(CacheQuant's decoupled error correction).

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

With attention statistics the recorder also profiles where the attention goes (ProfilingDiT's
foreground/background profiling) and how the prediction changes from step to step:

* ``fg_attention[i]``: block ``i``'s *foreground lift* — the share of its attention mass (the same
  sampled query rows, averaged over heads) that lands on foreground keys, divided by the foreground's
  share of the keys (1 = attends to the foreground as much as uniform attention would; > 1:
  foreground-focused). The foreground is a per-sample token mask made at the end of each generation
  from the transformer's input latent of the branch's last call (the nearly clean sample):
  :func:`foreground_tokens` (deviation from the sample's median value, Otsu's threshold, pooled to
  the attention's tokens). ``record`` runs this through :meth:`Recorder.watch` and
  :meth:`Recorder.end_generation`; NaN where no mask could be made (an unknown latent layout).
* ``output_similarity``: cosine similarity of the transformer's output (the predicted noise /
  velocity) with the branch's previous call (NaN on the first call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.base import call_argument
from ..caching.base import BlockCall, CacheConfig, CacheMethod, CachePlan, CacheState, Residual, register_cache_method
from ..caching.dbcache import relative_l1
from ..config import PolicyError, option


@dataclass(frozen=True)
class RecordConfig(CacheConfig):
    """What calibration records (a hidden ``cache`` method that computes everything)."""

    per_block: bool = option(False, doc="also record per-block and pairwise residual statistics (BAC, ERTACache)")
    sub_blocks: bool = option(False, doc="with per_block: also record per-sub-block (attention, FFN) pairwise reuse "
                                         "errors (sub-block BAC; calibration.sub_blocks)")
    stack_pairwise: bool = option(False, doc="also record the pairwise whole-stack statistics (stack_dist, stack_fit, "
                                             "stack_cos) without watching every block (Step Rehash)")
    stack_rows: int = option(0, ge=0, doc="token rows (all channels) of the whole-stack residual kept per call, for "
                                          "per-channel fits (CacheQuant); 0: none")
    sketch_size: int = option(16384, ge=16, doc="elements sampled per tensor for the pairwise statistics")
    attention_stats: bool = option(False, doc="also record per-block self-attention entropy / top-k mass "
                                              "(ProfilingDiT)")
    attention_queries: int = option(64, ge=1, doc="query tokens sampled per attention call")
    attention_topk: float = option(0.1, gt=0.0, le=1.0, doc="share of keys whose attention mass is recorded")
    foreground_bins: int = option(64, ge=8, le=4096, doc="histogram bins of the Otsu threshold that splits each "
                                                         "sample's tokens into foreground and background")


@dataclass(eq=False)
class RecorderState(CacheState):
    """Args:
        sketch: the fixed random element indices of this branch's tensors.
        row: the record of the call in progress.
        modulated, temb: the first block's watched inputs of the previous call.
        residual: the previous call's whole-stack residual.
        block_in: this call's sketched block inputs.
        stack_history, block_history: sketched residuals of every earlier call (per-block recording).
        output: the previous call's flattened output (attention statistics).
        rows: the fixed token-row indices of ``stack_rows``.
    """

    sketch: torch.Tensor | None = None
    row: dict | None = None
    modulated: torch.Tensor | None = None
    temb: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    block_in: dict[int, torch.Tensor] = field(default_factory=dict)
    stack_history: list[torch.Tensor] = field(default_factory=list)
    block_history: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    output: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def _rel(current: torch.Tensor | None, previous: torch.Tensor | None) -> float:
    if current is None or previous is None or current.shape != previous.shape:
        return math.nan
    return float(relative_l1(current.float(), previous.float(), per_sample=False))


@register_cache_method("_record", RecordConfig)
class Recorder(CacheMethod):
    """Computes everything, records per-step statistics (see the module docstring)."""

    State = RecorderState

    def __init__(self, config, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        self.records: list[dict[str, Any]] = []
        self._attention: dict[int, tuple[float, float]] = {}
        self._keys: dict[int, torch.Tensor] = {}  # block -> (B, S) attention mass per key, this call
        self._profiles: list[tuple[str, dict, dict[int, torch.Tensor]]] = []  # (branch, row, keys), this generation
        self._latent_in: torch.Tensor | None = None  # the transformer call's latent input (set by its pre-hook)
        self._latents: dict[str, torch.Tensor] = {}  # branch -> latent input of its latest call
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
        self._sub = None
        if self.config.sub_blocks and self.config.per_block:
            from .sub_blocks import SubBlockTap

            self._sub = SubBlockTap(blocks, adapter, self.config.sketch_size)
            self._handles.extend(self._sub.handles)

    def close(self) -> None:
        """Remove the temporary attention and latent hooks (calibration done)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def watch(self, transformer: torch.nn.Module) -> None:
        """Keep the latent input of every call of ``transformer`` (the foreground masks are made from it)."""
        if not self.config.attention_stats:
            return

        def keep_latent(module, args, kwargs) -> None:
            latent = kwargs.get("hidden_states", args[0] if args else None)
            self._latent_in = latent if isinstance(latent, torch.Tensor) else None

        self._handles.append(transformer.register_forward_pre_hook(keep_latent, with_kwargs=True))

    @torch.no_grad()
    def end_generation(self) -> None:
        """A generation finished: fill ``fg_attention`` into its rows, from each branch's last latent input."""
        masks: dict[str, torch.Tensor | None] = {}
        for branch, row, keys in self._profiles:
            if branch not in masks:
                latent = self._latents.get(branch)
                tokens = next(iter(keys.values())).shape[-1] if keys else 0
                masks[branch] = None if latent is None or not tokens else \
                    foreground_tokens(latent, tokens, self.config.foreground_bins)
            row["fg_attention"] = [foreground_lift(keys.get(i), masks[branch]) for i in range(self.num_blocks)]
        self._profiles, self._latents = [], {}

    @torch.no_grad()
    def _attention_hook(self, index: int, attn: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None
        probs = attention_rows(attn, hidden, self.config.attention_queries)
        self._attention[index] = row_statistics(probs, self.config.attention_topk)
        self._keys[index] = probs.mean(dim=(1, 2))  # (B, S): mass per key, over heads and sampled queries
        return None

    def make_plan(self, num_blocks: int) -> CachePlan:
        if self.config.per_block:
            every = frozenset(range(num_blocks))
            return CachePlan(ranges=((0, num_blocks),), watch_inputs=every, watch_outputs=every)
        return CachePlan(ranges=((0, num_blocks),), watch_inputs=frozenset({0}))

    def _sketch(self, state: RecorderState, tensor: torch.Tensor) -> torch.Tensor:
        """The fixed random sample of ``tensor``'s elements for this branch (float32 copy)."""
        flat = tensor.reshape(-1)
        idx = state.sketch
        if idx is None or idx.device != flat.device or int(idx.max()) >= flat.numel():
            g = torch.Generator().manual_seed(0)
            n = min(self.config.sketch_size, flat.numel())
            idx = torch.randperm(flat.numel(), generator=g)[:n] if flat.numel() <= 1 << 22 else \
                torch.randint(flat.numel(), (n,), generator=g)
            idx = state.sketch = idx.to(flat.device)
        return flat.index_select(0, idx).float()

    def on_input(self, call: BlockCall, state: RecorderState) -> None:
        if self.config.per_block:
            state.block_in[call.block.index] = self._sketch(state, call.hidden)
            if call.block.index != 0:
                return
        modulated = self.adapter.modulated_input(call.block, call.args, call.kwargs) \
            if self.adapter.modulated_input_fn is not None else None
        temb = call_argument(call.block.meta, "temb", call.args, call.kwargs)
        if self.config.attention_stats and self._latent_in is not None:
            self._latents[state.branch] = self._latent_in
        state.row = {"branch": state.branch, "step": state.step,
                     "modulated_change": _rel(modulated, state.modulated), "temb_change": _rel(temb, state.temb)}
        state.modulated, state.temb = modulated, temb
        if self.config.per_block:
            state.row["block_dist"] = [None] * self.num_blocks

    def should_reuse(self, range_id: int, state: RecorderState) -> bool:
        return False

    def on_range_computed(self, range_id: int, residual: Residual, state: RecorderState) -> None:
        previous, current = state.residual, residual.hidden
        row = state.row
        row["residual_change"] = _rel(current, previous)
        if previous is not None and previous.shape == current.shape:
            ratio = current.float().norm(dim=-1) / previous.float().norm(dim=-1).clamp_min(1e-12)
            row["mag_ratio"], row["mag_std"] = float(ratio.mean()), float(ratio.std())
        else:
            row["mag_ratio"], row["mag_std"] = math.nan, math.nan
        state.residual = current
        if self.config.per_block or self.config.stack_pairwise:
            self._record_stack(row, current, state)
        if self.config.stack_rows:
            row["stack_rows"] = self._rows(state, current)
        if self.config.attention_stats:
            stats = [self._attention.get(i, (math.nan, math.nan)) for i in range(self.num_blocks)]
            row["attn_entropy"] = [e for e, _ in stats]
            row["attn_topk"] = [k for _, k in stats]
            row["fg_attention"] = [math.nan] * self.num_blocks  # filled in by end_generation
            self._profiles.append((state.branch, row, self._keys))
            self._attention, self._keys = {}, {}
        self.records.append(row)  # a per-block run completes the row in on_output of the last block

    @torch.no_grad()
    def adjust_output(self, output: Any, state: RecorderState) -> None:
        """Record ``output_similarity`` (attention statistics); the output itself is left unchanged."""
        if not self.config.attention_stats or state.row is None:
            return None
        sample = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if not isinstance(sample, torch.Tensor):
            return None
        current = sample.detach().reshape(-1).float()
        previous = state.output
        state.row["output_similarity"] = float(torch.nn.functional.cosine_similarity(current, previous, dim=0)) \
            if previous is not None and previous.shape == current.shape else math.nan
        state.output = current
        return None

    def _record_stack(self, row: dict, residual: torch.Tensor, state: RecorderState) -> None:
        current = self._sketch(state, residual)
        norm = float(current.abs().sum().clamp_min(1e-12))
        row["stack_dist"], row["stack_fit"], row["stack_cos"] = [], [], []
        for previous in state.stack_history:
            row["stack_dist"].append(float((current - previous).abs().sum()) / norm)
            cos = torch.nn.functional.cosine_similarity(current, previous, dim=0)
            row["stack_cos"].append(min(1.0, max(-1.0, float(cos))))
            centred = previous - previous.mean()
            alpha = float((centred * (current - current.mean())).sum() / (centred * centred).sum().clamp_min(1e-30))
            beta = float(current.mean() - alpha * previous.mean())
            row["stack_fit"].append((alpha, beta, float((current - alpha * previous - beta).abs().sum()) / norm))
        state.stack_history.append(current)

    def _rows(self, state: RecorderState, residual: torch.Tensor) -> torch.Tensor:
        """A fixed random sample of ``stack_rows`` token rows (every channel) of ``residual`` (..., C): a float32
        CPU tensor (rows, C), the same rows at every call of this branch and shape (and in every calibration pass)."""
        flat = residual.detach().reshape(-1, residual.shape[-1])
        idx = state.rows
        if idx is None or idx.device != flat.device or int(idx.max()) >= flat.shape[0]:
            g = torch.Generator().manual_seed(0)
            idx = torch.randperm(flat.shape[0], generator=g)[:min(self.config.stack_rows, flat.shape[0])]
            idx = state.rows = idx.to(flat.device)
        return flat.index_select(0, idx).float().cpu()

    def on_output(self, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None, state: RecorderState) -> None:
        row = state.row
        block_in = state.block_in.pop(index, None)
        if row is None or block_in is None or row["step"] != state.step:
            return
        out = self._sketch(state, hidden)
        residual = out - block_in
        history = state.block_history.setdefault(index, [])
        norm = float(out.abs().sum().clamp_min(1e-12))
        row["block_dist"][index] = [float((residual - previous).abs().sum()) / norm for previous in history]
        history.append(residual)
        if self._sub is not None:
            self._sub.block_done(index, state, row, norm)


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
def attention_rows(attn: torch.nn.Module, hidden: torch.Tensor, queries: int = 64, seed: int = 0) -> torch.Tensor:
    """softmax(q·Kᵀ/√d) of ``attn``'s self-attention on ``hidden`` (B, S, C) for ``queries`` random query
    tokens (a fixed sample) against all S keys: (B, heads, queries, S), float32."""
    heads = int(attn.heads)
    tokens = hidden.shape[1]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(tokens, generator=g)[:min(queries, tokens)].to(hidden.device)
    q = _heads(getattr(attn, "norm_q", None), attn.to_q(hidden.index_select(1, rows)), heads).float()
    k = _heads(getattr(attn, "norm_k", None), attn.to_k(hidden), heads).float()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def row_statistics(probs: torch.Tensor, topk: float = 0.1) -> tuple[float, float]:
    """(normalised entropy, top-``topk`` key mass) of attention rows (..., S), averaged over the rest."""
    tokens = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(max(tokens, 2))
    top = max(1, int(math.ceil(topk * tokens)))
    mass = probs.topk(top, dim=-1).values.sum(-1)
    return float(entropy.mean()), float(mass.mean())


@torch.no_grad()
def attention_statistics(attn: torch.nn.Module, hidden: torch.Tensor, queries: int = 64,
                         topk: float = 0.1, seed: int = 0) -> tuple[float, float]:
    """(normalised entropy, top-``topk`` key mass) of ``attn``'s self-attention on ``hidden`` (B, S, C),
    from ``queries`` random query tokens (a fixed sample): see the module docstring."""
    return row_statistics(attention_rows(attn, hidden, queries, seed), topk)


def _otsu(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Otsu's threshold of each row of ``values`` (B, N): the cut that maximises the between-class variance."""
    lo, hi = values.min(-1, keepdim=True).values, values.max(-1, keepdim=True).values
    scaled = ((values - lo) / (hi - lo).clamp_min(1e-12) * (bins - 1)).round().long()
    hist = torch.zeros(values.shape[0], bins, dtype=torch.float64, device=values.device)
    hist.scatter_add_(1, scaled, torch.ones_like(scaled, dtype=torch.float64))
    centres = torch.arange(bins, dtype=torch.float64, device=values.device)
    w0 = hist.cumsum(-1)
    m0 = (hist * centres).cumsum(-1)
    total, mean_total = w0[:, -1:], m0[:, -1:]
    w1 = total - w0
    between = (mean_total * w0 / total - m0) ** 2 * total / (w0 * w1).clamp_min(1e-12)
    between = torch.where((w0 > 0) & (w1 > 0), between, torch.zeros_like(between))
    cut = between.argmax(-1, keepdim=True).to(values.dtype)  # tokens in bins above the cut are foreground
    return lo + (cut + 0.5) / (bins - 1) * (hi - lo)


def _pooled_saliency(x: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """(B, n) saliency of a (B, C, H, W) or (B, C, F, H, W) latent: n = ``tokens`` if a 1×p×p patching gives
    that many; else (text tokens joined to the image tokens in the attention, Lumina 2) the first of the
    patchings p = 2, 1, 4 whose token count is below ``tokens``; None if none fits."""
    frames = x.shape[2] if x.dim() == 5 else 1
    h, w = x.shape[-2:]
    exact = _saliency_at(x, tokens)
    if exact is not None:
        return exact
    for p in (2, 1, 4):
        n = frames * (h // p) * (w // p)
        if h % p == 0 and w % p == 0 and n < tokens:
            return _saliency_at(x, n)
    return None


def _saliency_at(x: torch.Tensor, tokens: int) -> torch.Tensor | None:
    spatial = x.flatten(2)
    centred = x - spatial.median(dim=-1).values.reshape(*x.shape[:2], *([1] * (x.dim() - 2)))
    distance = centred.norm(dim=1)  # (B, H, W) or (B, F, H, W)
    frames = distance.shape[1] if x.dim() == 5 else 1
    h, w = distance.shape[-2:]
    per_frame, rem = divmod(tokens, frames)
    p = math.isqrt(max(h * w // max(per_frame, 1), 1))
    if rem or p < 1 or h % p or w % p or (h // p) * (w // p) != per_frame:
        return None
    pooled = torch.nn.functional.avg_pool2d(distance.reshape(-1, 1, h, w), p)
    return pooled.reshape(x.shape[0], -1)


@torch.no_grad()
def foreground_tokens(latent: torch.Tensor, tokens: int, bins: int = 64) -> torch.Tensor | None:
    """A (B, n ≤ tokens) foreground mask of a nearly clean latent, or None for a layout it cannot map.

    Saliency of each latent position: the distance (over channels) of its value from the sample's
    median value per channel — the dominant, flat background is close to it, the subject is not.
    Positions are pooled into the attention's tokens, whose order is the latent's row-major order: a
    packed latent (B, S, C) maps one to one; (B, C, H, W) by p×p patches; (B, C, F, H, W) by 1×p×p
    patches (CogVideoX's (B, F, C, H, W) is tried when that does not fit). Each sample's tokens are
    split by Otsu's threshold on the saliency."""
    x = latent.detach().float()
    if x.dim() == 3:  # packed (B, S, C): one token per position
        saliency = (x - x.median(dim=1, keepdim=True).values).norm(dim=-1)
    elif x.dim() == 4:
        saliency = _pooled_saliency(x, tokens)
    elif x.dim() == 5:
        saliency = _pooled_saliency(x, tokens)
        if saliency is None:
            saliency = _pooled_saliency(x.transpose(1, 2), tokens)
    else:
        return None
    if saliency is None or saliency.shape[-1] > tokens:
        return None
    return saliency > _otsu(saliency, bins)


def foreground_lift(keys: torch.Tensor | None, mask: torch.Tensor | None) -> float:
    """Share of the attention mass ``keys`` (B, S) on the foreground tokens of ``mask`` (B, n), divided by the
    foreground's share of the tokens, averaged over the samples with both classes (NaN if none).

    When the attention sees more tokens than the latent has (text tokens joined to the image tokens, FLUX's
    single-stream blocks), the image tokens are taken to be the last n."""
    if keys is None or mask is None or keys.shape[0] != mask.shape[0] or keys.shape[-1] < mask.shape[-1]:
        return math.nan
    image = keys[:, keys.shape[-1] - mask.shape[-1]:].float()
    area = mask.float().mean(-1)
    both = (area > 0) & (area < 1)
    if not bool(both.any()):
        return math.nan
    share = (image * mask).sum(-1) / image.sum(-1).clamp_min(1e-30)
    return float((share[both] / area[both]).mean())
