"""The sparse-attention feature: it routes a model's self-attention calls through the sparse path.

:class:`AttentionFeature` owns the routed processors of one transformer
(:class:`~dit_accel.runtime.attention_route.RoutedProcessor`: the model's own processor code, its
SDPA call replaced by one ``dit_accel::routed_attention`` op, traceable by ``torch.compile`` with no
graph break). Every routed call comes back to :meth:`AttentionFeature.attend`, at run time and in
eager Python: it knows the layer (the block gate records each block's entry before its compiled
code runs), reads the denoising step and CFG branch from the call's step context and the token
layout from the adapter (computed once per transformer call), keeps per-branch state (SVG2
centroids, reused selections) in its :class:`AttentionState` (made per generation, CFG branch and
input shape), and counts the attention density actually used.

Calls the sparse path does not handle run dense and are counted: attention over keys that are not
the layer's own tokens (cross-attention, Wan I2V image context), masks other than a key-padding
mask of the text tokens, and attention backends that do not go through SDPA (e.g. flash-attn: a
computed block whose attention never reached the op).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.base import TokenLayout
from ..attention.config import AttentionConfig
from ..attention.adaptive_precision import plan_precision
from ..attention.reorder_paro import head_permutations, sequence_permutation
from ..attention.select import decode_mask
from ..attention.sparse import SparseRequest, joint_attention, quant_dense_attention
from ..kernels.quant_attention import fp8_supported
from ..caching.base import StepMapping
from ..config import PolicyError
from ..context import StepContext
from .attention_route import SDPA, add_route, drop_route, routed
from .feature import Call, Feature, Host
from .parallel import ShardGroup, splits_text

logger = logging.getLogger("dit_accel")


@dataclass(eq=False)
class AttentionState:
    """Per (generation, CFG branch, input shape).

    Args:
        ctx: the step context of the call in progress.
        svg2: each layer's SVG2 centroids (warm start of the next step's k-means).
        selections: each layer's (step selected, selection), reused for ``refresh_interval`` steps.
    """

    ctx: StepContext
    svg2: dict[int, Any] = field(default_factory=dict)
    selections: dict[int, tuple[int, Any]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return self.ctx.step


def local_heads(table: list, heads: int, shards: ShardGroup | None) -> list:
    """This rank's entries of a per-head table (``heads`` = the heads this rank attends with): under Ulysses
    each rank attends with its own slice of the model's heads; otherwise the whole table."""
    if shards is not None and shards.ulysses_degree > 1 and len(table) == heads * shards.ulysses_degree:
        return table[shards.head_slice(heads)]
    return table


class AttentionFeature(Feature):
    """Sparse attention of one transformer under one ``attention`` policy section."""

    name = "attention"

    def __init__(self, config: AttentionConfig, num_blocks: int) -> None:
        missing = config.needs_calibration
        if missing:
            raise PolicyError(f"attention: {', '.join(missing)} must be calibrated first: "
                              "policy = dit_accel.calibrate(pipe, prompts, policy)")
        self.config = config
        self.num_blocks = num_blocks
        self.route: int | None = None
        self.host: Host | None = None
        self.modules: dict[int, tuple[torch.nn.Module, Any]] = {}
        self.layout: TokenLayout | None = None
        self.recorder = None  # set by calibration: observes q/k of dense calls
        self._call: Call | None = None
        self._layout_key = None
        self._text_split = False
        self._warned: set[str] = set()
        self._perm_cache: dict = {}
        self._mask_cache: dict = {}
        if config.paro_orders is not None and len(config.paro_orders) != num_blocks:
            raise PolicyError(f"attention.paro_orders: calibrated for {len(config.paro_orders)} layers, the model has "
                              f"{num_blocks} blocks")
        if config.quant_plan is not None and len(config.quant_plan) != num_blocks:
            raise PolicyError(f"attention.quant_plan: calibrated for {len(config.quant_plan)} layers, the model has "
                              f"{num_blocks} blocks")
        self._plan_steps = StepMapping("dit_accel: attention.quant_plan was calibrated for %d steps, this call has "
                                       "%d: each step uses the plan of the calibrated step at the same relative "
                                       "position")
        bad = [i for i in config.dense_layers if i >= num_blocks]
        if bad:
            raise PolicyError(f"attention.dense_layers: {bad} out of range; the model has {num_blocks} blocks")
        self.new_generation()

    # ---- lifecycle ---------------------------------------------------------------------------
    def watched_blocks(self) -> set[int]:
        return set(range(self.num_blocks))  # attend() needs the layer of each call

    def attach(self, host: Host) -> None:
        self.host = host
        name = host.adapter.attention_module
        self.route = add_route(self)
        try:
            for block in host.blocks:
                attn = getattr(block.module, name, None)
                if attn is None or not hasattr(attn, "set_processor") or getattr(attn, "processor", None) is None:
                    raise PolicyError(f"attention: block {block.name} has no attention module {name!r} "
                                      "with a processor")
                original = attn.processor
                attn.set_processor(routed(original, self.route))
                self.modules[block.index] = (attn, original)
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for attn, original in self.modules.values():
            attn.set_processor(original)
        self.modules = {}
        if self.route is not None:
            drop_route(self.route)
            self.route = None

    def new_generation(self) -> None:
        self.counts = {"sparse": 0, "quant_dense": 0, "dense_warmup": 0, "dense_layer": 0, "dense_unhandled": 0}
        if self.config.quant == "auto":  # calls the calibrated plan keeps in 16-bit, and the quantized ones by mode
            self.counts["dense_plan"] = 0
            self.precisions = {"int8": 0, "fp8": 0}
        self.counts_selected = 0  # sparse calls that scored and selected blocks (the rest reused a selection)
        self._kept = None
        self._total = 0.0

    def release(self) -> None:
        self._call = None

    def new_state(self, ctx: StepContext) -> AttentionState:
        return AttentionState(ctx)

    def before_call(self, call: Call) -> None:
        state: AttentionState = call.slots[self.name]
        state.ctx = call.ctx
        self._call = call
        self._routed: set[int] = set()
        args, kwargs = call.args, call.kwargs
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states")
        key = (tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None,
               tuple(enc.shape) if isinstance(enc, torch.Tensor) else None)
        if key != self._layout_key:
            self.layout = self.host.adapter.token_layout(self.host.transformer, args, kwargs)
            self._layout_key = key
            self._text_split = call.ctx.shards is not None and splits_text(self.host.transformer)

    def after_call(self, call: Call, output: Any) -> Any | None:
        self._call = None
        missing = [i for i in call.computed if i in self.modules and i not in self._routed]
        if missing and call.ctx is not None:  # computed blocks whose attention never reached SDPA
            self._unhandled(len(missing))
        return None

    # ---- per call ----------------------------------------------------------------------------
    def current_step(self) -> int:
        """The step of the call in progress (0 outside a call)."""
        call = self._call
        return call.ctx.step if call is not None and call.ctx is not None else 0

    def _state(self) -> AttentionState | None:
        call = self._call
        return None if call is None else call.slots.get(self.name)

    def dense_reason(self, layer: int | None, state: AttentionState | None) -> str | None:
        """Why block ``layer`` runs dense attention in the call whose state is ``state`` (the ``counts`` key:
        ``dense_unhandled``, ``dense_layer``, ``dense_warmup``), or None: it runs sparse / quantized."""
        if state is None or self.layout is None or layer is None:
            return "dense_unhandled"
        shards = state.ctx.shards
        if shards is not None and shards.ring_degree > 1:
            self._warn_once("ring", "dit_accel: ring attention (context parallelism) passes K/V around in chunks; "
                            "sparse and quantized attention run dense under it (use Ulysses)")
            return "dense_unhandled"
        if self.config.sparse is None and self.config.quant == "none":
            return "dense_layer"
        if state.step < self.config.warmup_steps:
            return "dense_warmup"
        if layer in self.config.dense_layers:
            return "dense_layer"
        if self.config.quant == "auto" and self.planned(layer, state) == "bf16":
            return "dense_plan"
        return None

    def planned(self, layer: int, state: AttentionState) -> str:
        """``quant: auto``: the calibrated precision of ``layer`` at this call's step (other step counts: the
        calibrated step at the same relative position, :class:`~dit_accel.caching.base.StepMapping`)."""
        plan = self.config.quant_plan
        step, _ = self._plan_steps(state.ctx, len(plan[0]))
        return plan_precision(plan, layer, step)

    def attend(self, call: dict[str, Any]) -> torch.Tensor | None:
        """One routed SDPA call (its arguments by name): the sparse or quantized output, or None (it runs dense
        as the model called it). Runs at run time in eager Python, also under ``torch.compile``."""
        run = self._call
        layer = run.block if run is not None else None
        if layer is not None:
            self._routed.add(layer)
        if self.recorder is None:
            reason = self.dense_reason(layer, self._state())
            if reason is not None:
                self.counts[reason] += 1
                return None
        elif self.layout is None or layer is None:
            return None
        out = self._attend(layer, SDPA, call)
        if self.recorder is not None:  # calibration: every call runs dense, the recorder saw its q/k
            self.counts["dense_warmup"] += 1
        elif out is None:
            self._unhandled(1)
        return out

    def _visual_slice(self, seq: int) -> slice | None:
        layout = self.layout
        n = layout.visual_tokens
        joint = layout.text_position in ("joint_first", "joint_last")
        text = layout.text_tokens if joint else 0
        if seq != n + text:
            return None
        return slice(text, text + n) if layout.text_position == "joint_first" else slice(0, n)

    def _attend(self, layer: int, func, call: dict) -> torch.Tensor | None:
        q, k, v = call.get("query"), call.get("key"), call.get("value")
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            return None
        if q.shape != k.shape or k.shape != v.shape or call.get("is_causal") or call.get("enable_gqa") \
                or call.get("dropout_p", 0.0):
            return None
        if getattr(self.recorder, "full_calls", False):  # calibration of quant: auto: every mode's error
            if call.get("attn_mask") is None:
                with torch.no_grad():
                    ref = SDPA(q, k, v, scale=call.get("scale"))  # what the model computes in its own dtype
                    outs = {m: self._quant_dense(layer, q, k, v, call.get("scale"), m) for m in self.recorder.modes
                            if m != "fp8" or fp8_supported(q.device)}
                self.recorder.observe_outputs(layer, self.current_step(), ref, outs)
            return None
        if self.config.sparse is None and self.recorder is None:  # quantized dense attention, text included
            if call.get("attn_mask") is not None:
                return None
            mode = self.config.quant
            if mode == "auto":
                mode = self.planned(layer, self._state())
                if mode == "fp8" and not fp8_supported(q.device):
                    self._warn_once("fp8", "dit_accel: attention.quant_plan asks for FP8 attention, which this GPU "
                                    "lacks (compute capability < 8.9); those calls run INT8")
                    mode = "int8"
                self.precisions[mode] += 1
            with torch.no_grad():
                out = self._quant_dense(layer, q, k, v, call.get("scale"), mode)
            self.counts["quant_dense"] += 1
            return out
        order = self._shard_order(q.shape[2], q.device)
        if order is not None:  # the ranks' [text, visual] shards, one after the other: back to one layout
            out = self._attend_in_order(layer, func, {**call, "query": q[:, :, order], "key": k[:, :, order],
                                                      "value": v[:, :, order]}, order)
            if out is None:
                return None
            restored = torch.empty_like(out)
            restored[:, :, order] = out
            return restored
        return self._attend_in_order(layer, func, call, None)

    def _quant_dense(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                     mode: str) -> torch.Tensor:
        """The quantized kernel over the whole sequence; with ``reorder: paro`` the visual tokens of each head
        in the layer's calibrated order (text tokens in place), the output back in the call's order."""
        return quant_dense_attention(q, k, v, scale, mode, self._sequence_perm(layer, q))

    def _sequence_perm(self, layer: int, q: torch.Tensor) -> torch.Tensor | None:
        if self.config.reorder != "paro" or self.config.paro_orders is None or self.layout is None:
            return None
        seq, heads = q.shape[2], q.shape[1]
        order = self._shard_order(seq, q.device)
        visual = self._visual_slice(seq)
        if visual is None:
            return None
        key = ("seq", layer, self.layout.grid, seq, heads, str(q.device), order is not None)
        if key not in self._perm_cache:
            perm = sequence_permutation(self._paro_perm(layer, self.layout.grid, heads, q.device), visual, seq)
            self._perm_cache[key] = perm if order is None else order[perm]  # ranks' shard layout: compose
        return self._perm_cache[key]

    def _attend_in_order(self, layer: int, func, call: dict, order: torch.Tensor | None) -> torch.Tensor | None:
        q, k, v = call["query"], call["key"], call["value"]
        visual = self._visual_slice(q.shape[2])
        if visual is None:
            return None
        mask = call.get("attn_mask")
        if mask is not None and order is not None:
            mask = mask[..., order] if mask.shape[-1] == q.shape[2] else mask
        if mask is not None:
            if mask.dim() != 4 or mask.shape[-2] != 1 or mask.shape[-1] != q.shape[2]:
                return None
            vis = mask[..., visual]
            if not bool(vis.all() if vis.dtype == torch.bool else (vis == 0).all()):
                return None
        if self.recorder is not None:
            self.recorder.observe(layer, q[:, :, visual], k[:, :, visual], self.layout.grid, call.get("scale"),
                                  v=v[:, :, visual])
            return None
        return self._sparse(layer, func, q, k, v, visual, mask, call.get("scale"))

    def _sparse(self, layer, func, q, k, v, visual, mask, scale) -> torch.Tensor:
        cfg = self.config
        grid = self.layout.grid
        heads = q.shape[1]
        request = SparseRequest(config=cfg)
        if cfg.reorder == "paro":
            request.head_perm = self._paro_perm(layer, grid, heads, q.device)
        if cfg.sparse.method == "static":
            request.static_mask = self._static_mask(layer, grid, heads, q.device)
        state = self._state()
        svg2 = state.svg2 if cfg.reorder == "svg2" else None
        if svg2 is not None:
            request.svg2_init = svg2.get(layer)
            request.svg2_first = request.svg2_init is None
        kept = state.selections  # layer -> (step selected, Selection)
        interval = cfg.sparse.refresh_interval
        if interval > 1 and layer in kept and state.step - kept[layer][0] < interval:
            request.selection = kept[layer][1]
        reused = request.selection
        with torch.no_grad():
            out, result = joint_attention(q, k, v, visual, request, func, mask, scale)
        if request.selection is not reused:  # a new selection was made
            self.counts_selected += 1
            if interval > 1:
                kept[layer] = (state.step, request.selection)
        if svg2 is not None and "centroids" in request.svg2_out:
            svg2[layer] = request.svg2_out["centroids"]
        self.counts["sparse"] += 1
        self._kept = result.kept if self._kept is None else self._kept + result.kept
        self._total += result.total
        return out

    def _shard_order(self, seq: int, device: torch.device) -> torch.Tensor | None:
        """Under Ulysses, when diffusers splits the text tokens too (Flux's plan splits both streams at the
        transformer), the gathered joint sequence is each rank's [text, visual] shard in rank order; this index
        puts it back as one [text | visual] (``joint_last``: [visual | text]) sequence. None: nothing to do."""
        state = self._state()
        shards = state.ctx.shards if state is not None else None
        layout = self.layout
        if shards is None or shards.ulysses_degree <= 1 or not self._text_split or layout is None \
                or layout.text_position not in ("joint_first", "joint_last"):
            return None
        p, t, n = shards.ulysses_degree, layout.text_tokens, layout.visual_tokens
        if seq != t + n or t % p or n % p:
            return None
        key = (seq, p, layout.text_position, str(device))
        if key not in self._perm_cache:
            tc, nc = t // p, n // p
            starts = torch.arange(p)[:, None] * (tc + nc)
            first, second = (tc, nc) if layout.text_position == "joint_first" else (nc, tc)
            lead = (starts + torch.arange(first)).flatten()
            tail = (starts + first + torch.arange(second)).flatten()
            self._perm_cache[key] = torch.cat([lead, tail]).to(device)
        return self._perm_cache[key]

    def _local_heads(self, table: list, heads: int) -> list:
        state = self._state()
        return local_heads(table, heads, state.ctx.shards if state is not None else None)

    def _paro_perm(self, layer: int, grid, heads: int, device) -> torch.Tensor:
        orders = self._local_heads(self.config.paro_orders[layer], heads)
        if len(orders) != heads:
            raise PolicyError(f"attention.paro_orders[{layer}] has {len(orders)} heads, the layer has {heads}")
        key = (layer, grid, str(device))
        if key not in self._perm_cache:
            self._perm_cache[key] = head_permutations(grid, orders, self.config.block_size, device)
        return self._perm_cache[key]

    def _static_mask(self, layer: int, grid, heads: int, device) -> torch.Tensor | None:
        masks = self.config.sparse.masks
        key = (layer, grid, str(device))
        if key in self._mask_cache:
            return self._mask_cache[key]
        mask = None
        hexes = masks["layers"].get(layer, masks["layers"].get(str(layer)))
        hexes = None if hexes is None else self._local_heads(list(hexes), heads)
        if tuple(masks["grid"]) == tuple(grid) and masks["block_size"] == self.config.block_size and hexes:
            n = math.ceil(math.prod(grid) / self.config.block_size)
            mask = torch.stack([decode_mask(h, (n, n)) for h in hexes]).to(device)
        elif hexes is not None or tuple(masks["grid"]) != tuple(grid):
            self._warn_once(f"static{grid}", "dit_accel: static attention masks were calibrated for grid %s, this "
                            "call has %s: selecting blocks with XAttention scoring instead", tuple(masks["grid"]), grid)
        self._mask_cache[key] = mask
        return mask

    def _unhandled(self, calls: int) -> None:
        self.counts["dense_unhandled"] += calls
        self._warn_once("unhandled", "dit_accel: a self-attention call of %s did not reach the sparse path "
                        "(attention backend without SDPA, or an unsupported mask); it ran dense",
                        type(self.host.transformer).__name__)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    # ---- statistics --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"attention": self.summary()}

    def summary(self) -> dict[str, Any]:
        """Per generation: attention calls by path and the density of the sparse calls (share of the
        visual query-key pairs computed) and over all self-attention calls (dense calls count 1)."""
        kept = float(self._kept) if self._kept is not None else 0.0
        sparse_density = kept / self._total if self._total else None
        calls = sum(self.counts.values())
        dense_calls = calls - self.counts["sparse"]
        overall = None
        if calls:
            overall = ((sparse_density or 0.0) * self.counts["sparse"] + dense_calls) / calls
        out = {"method": self.describe(), "calls": dict(self.counts), "sparse_density": sparse_density,
               "density": overall, "selections": self.counts_selected}
        if self.config.quant == "auto":
            out["precisions"] = dict(self.precisions)
        return out

    def describe(self) -> str:
        c = self.config
        if c.sparse is None:
            if c.quant == "none":
                return "dense"
            return f"dense+{c.quant}" + ("+paro" if c.reorder == "paro" else "")
        return (f"{c.sparse.method}+{c.reorder}" + (f"+{c.compensate}" if c.compensate != "none" else "")
                + (f"+{c.quant}" if c.quant != "none" else ""))
