"""Offline calibration of the attention section: PARO orders, static block masks, the precision plan.

``dit_accel.calibrate(pipe, prompts, policy)`` calls :func:`calibrate_attention` when the policy's
``attention`` section needs it (``reorder: paro`` without ``paro_orders``, ``sparse.method: static``
without ``masks``, ``quant: auto`` without ``quant_plan``). It runs one dense generation per prompt
while a recorder sees the post-RoPE queries and keys of every self-attention call from ``warmup_steps``
on (the steps that will be sparse), and:

* PARO (PAROAttention, Zhao et al. 2025): for every layer, head and candidate order
  (:func:`~dit_accel.attention.reorder_paro.candidate_orders`), the exact attention rows of
  ``sample_blocks`` evenly spaced q-blocks of the permuted sequence are pooled into kv-blocks and the
  share of kv-blocks needed to hold ``threshold`` of each row's mass is averaged over calls; each head
  gets the order with the lowest such density. With ``sparse: null`` and ``quant: int8|fp8|auto`` (dense
  quantized attention, where no block is skipped) the score is instead the quantized kernel's output error
  on those rows in that order (K's per-block scales are what the order changes). PAROAttention ranks
  orders by a combined sparsity and quantization metric of the attention map's blocks (P is what it
  quantizes); our kernels keep P in 16-bit (INT8) or scale it by a constant (FP8), so we measure the
  error of the per-block K quantization they do apply, on the output.
* static masks (PAROAttention's static sparse masks): the exact block-mass map of every layer and head
  (in the chosen order), averaged over calls, keeps per q-block the best blocks up to ``threshold`` of
  the mass, plus the diagonal. Masks are tied to the calibration's token grid and block size (a call
  with another grid falls back to XAttention scoring, with a warning).
* precision plan (``quant: auto``, :mod:`~dit_accel.attention.adaptive_precision`): every call of every
  step, text included, also runs through the INT8 and FP8 kernels; the worst error per (layer, step) over
  prompts and branches against the model's own 16-bit output picks the cheapest precision below
  ``quant_tolerance``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence

import torch

from ..api import accelerated, runtimes_of
from ..attention.config import AttentionConfig
from ..attention.reorder_paro import candidate_orders, head_permutations, order_permutation
from ..attention.select import encode_mask, select_blocks
from ..kernels.quant_attention import quantize_per_block
from ..config import PolicyError
from ..policy import Policy


def _block_rows(p: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """Pool attention rows ``[B, H, R, N]`` (R a multiple of block_size) into ``[B, H, R/bs, nk]``."""
    pad = (-n) % block_size
    p = torch.nn.functional.pad(p, (0, pad))
    b, h, r, _ = p.shape
    return p.view(b, h, r // block_size, block_size, -1, block_size).sum(-1).mean(-2)


def _density_at(mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """Share of blocks needed per row of ``mass`` ``[..., nk]`` (rows sum to 1) to reach ``threshold``."""
    srt = mass.sort(dim=-1, descending=True).values
    before = srt.cumsum(-1) - srt
    return (before < threshold).float().sum(-1) / mass.shape[-1]


def _kept_error(p: torch.Tensor, mass: torch.Tensor, v: torch.Tensor, n: int, block_size: int,
                density: float) -> torch.Tensor:
    """Relative L2 error per head of keeping, for each sampled query block, its ``density`` share of
    kv-blocks with the most mass (plus nothing else), vs exact attention: ``p`` ``[B, H, R, N]`` exact
    rows, ``mass`` ``[B, H, R/bs, nk]``, ``v`` ``[B, H, N, D]`` in the same token order."""
    nk = mass.shape[-1]
    keep = max(1, math.ceil(density * nk))
    top = mass.topk(keep, dim=-1).indices
    block_keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)          # [B, H, nqs, nk]
    token_keep = block_keep.repeat_interleave(block_size, dim=-1)[..., :n]                  # [B, H, nqs, N]
    token_keep = token_keep.repeat_interleave(block_size, dim=-2)[..., :p.shape[-2], :]      # [B, H, R, N]
    kept = p * token_keep
    kept = kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)
    exact, approx = p @ v, kept @ v
    return ((approx - exact).flatten(2).norm(dim=-1) / exact.flatten(2).norm(dim=-1).clamp_min(1e-30)).mean(0)


#: K block of the dense quantized kernel (its default ``block_n``): the granularity of K's INT8 / FP8 scales.
QUANT_K_BLOCK = 64


def _quant_error(p: torch.Tensor, q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 mode: str, block: int = QUANT_K_BLOCK) -> torch.Tensor:
    """Relative L1 error per head of the quantized kernel's arithmetic on sampled rows, in the given token
    order: Q per token and mean-smoothed K per ``block`` tokens in ``mode`` (as
    :func:`~dit_accel.kernels.quant_attention.quant_attention_reference`), V exact, vs the exact rows ``p``
    ``[B, H, R, N]``. Only K's per-block scales depend on the order (Q's are per token, the smoothing mean is
    over all tokens), so this ranks orders by how homogeneous their K blocks are where it matters: in the output."""
    n = k.shape[2]
    kq, k_scale = quantize_per_block(k - k.mean(2, keepdim=True), block, mode)
    k_deq = kq.float() * k_scale.repeat_interleave(block, dim=-1)[..., :n, None]
    qq, q_scale = quantize_per_block(q_rows, 1, mode)
    pq = torch.softmax((qq.float() * q_scale[..., None]) @ k_deq.transpose(-1, -2) * scale, dim=-1)
    exact = p @ v
    return (pq @ v - exact).abs().sum(dim=(0, 2, 3)) / exact.abs().sum(dim=(0, 2, 3)).clamp_min(1e-30)


class AttentionRecorder:
    """Receives (layer, q, k, v) of dense calls and accumulates PARO scores or static block maps.

    PARO order score per (layer, head): with values available (the default), the relative output error
    of keeping ``error_density`` of the kv-blocks per query block in that order — what the sparse path
    will actually do; otherwise the block density needed to keep ``threshold`` of the attention mass
    (PAROAttention's concentration criterion). A reordering replaces the natural order only when it
    beats it by ``margin`` (relative): on near-uniform heads the orders differ by noise, and a wrong
    order costs more than it saves.

    ``quant`` ("int8" / "fp8"; dense quantized attention, ``sparse: null``): the score is instead the
    quantized kernel's output error in that order (:func:`_quant_error`).
    """

    def __init__(self, config: AttentionConfig, threshold: float, sample_blocks: int = 16,
                 orders: tuple | None = None, record_maps: bool = False, error_density: float = 0.25,
                 margin: float = 0.05, quant: str | None = None) -> None:
        self.config = config
        self.quant = quant
        self.threshold = threshold
        self.error_density = error_density
        self.margin = margin
        self.sample_blocks = sample_blocks
        self.orders = orders              # chosen PARO orders (static-mask pass), or None
        self.record_maps = record_maps
        self.grid: tuple[int, int, int] | None = None
        self.density: dict[int, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        self.maps: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.step_of = lambda: 0

    @torch.no_grad()
    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int],
                scale: float | None, v: torch.Tensor | None = None) -> None:
        if self.step_of() < self.config.warmup_steps:
            return
        if self.grid is not None and self.grid != tuple(grid):
            raise PolicyError(f"calibrate: calls with different token grids ({self.grid} and {tuple(grid)}); "
                              "calibrate attention at one resolution")
        self.grid = tuple(grid)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if self.record_maps:
            self._record_map(layer, q, k, scale)
        else:
            self._record_orders(layer, q, k, scale, v)

    def _record_orders(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                       v: torch.Tensor | None = None) -> None:
        bs = self.config.block_size
        n = q.shape[2]
        nq = -(-n // bs)
        picks = torch.linspace(0, nq - 1, min(self.sample_blocks, nq)).round().long().unique()
        for order in candidate_orders(self.grid):
            perm = order_permutation(self.grid, order, bs, q.device)
            qp, kp = q.float()[:, :, perm], k.float()[:, :, perm]
            rows = (picks.view(-1, 1) * bs + torch.arange(bs)).flatten()
            rows = rows[rows < n].to(q.device)
            p = torch.softmax(qp[:, :, rows] @ kp.transpose(-1, -2) * scale, dim=-1)
            extra = picks.numel() * bs - rows.numel()  # a partial last q-block: pad its rows with zeros
            p = torch.nn.functional.pad(p, (0, 0, 0, extra))
            mass = _block_rows(p, n, bs)
            if self.quant is not None and v is not None:
                score = _quant_error(p[:, :, :rows.numel()], qp[:, :, rows], kp, v.float()[:, :, perm], scale,
                                     self.quant)
            elif v is None:
                score = _density_at(mass, self.threshold).mean(dim=(0, 2))
            else:
                score = _kept_error(p[:, :, :rows.numel()], mass, v.float()[:, :, perm], n, bs, self.error_density)
            self.density[layer][order].append(score.cpu())

    def _record_map(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        bs = self.config.block_size
        n = q.shape[2]
        if self.orders is not None:
            perm = head_permutations(self.grid, self.orders[layer], bs, q.device).unsqueeze(0).unsqueeze(-1)
            q = torch.gather(q, 2, perm.expand(q.shape[0], -1, -1, q.shape[-1]))
            k = torch.gather(k, 2, perm.expand(k.shape[0], -1, -1, k.shape[-1]))
        qf, kf = q.float(), k.float()
        maps = []
        for r0 in range(0, n, bs * 8):
            r1 = min(n, r0 + bs * 8)
            p = torch.softmax(qf[:, :, r0:r1] @ kf.transpose(-1, -2) * scale, dim=-1)
            p = torch.nn.functional.pad(p, (0, 0, 0, (-(r1 - r0)) % bs))
            maps.append(_block_rows(p, n, bs))
        self.maps[layer].append(torch.cat(maps, dim=2).mean(0).cpu())  # [H, nq, nk]

    def paro_orders(self, num_layers: int, heads_of: dict[int, int]) -> tuple[tuple[str, ...], ...]:
        result = []
        for layer in range(num_layers):
            table = self.density.get(layer)
            if not table:
                result.append(tuple(["fhw"] * heads_of.get(layer, 1)))
                continue
            names = list(table)
            scores = torch.stack([torch.stack(table[o]).mean(0) for o in names])  # [orders, H]
            best = scores.argmin(0)
            natural = scores[names.index("fhw")] if "fhw" in names else None
            chosen = []
            for head, i in enumerate(best.tolist()):
                if natural is not None and scores[i, head] > (1 - self.margin) * natural[head]:
                    chosen.append("fhw")  # not clearly better than the natural order
                else:
                    chosen.append(names[i])
            result.append(tuple(chosen))
        return tuple(result)

    def static_masks(self, threshold: float) -> dict[str, Any]:
        layers = {}
        for layer, maps in self.maps.items():
            mean = torch.stack(maps).mean(0)                                             # [H, nq, nk]
            eye = torch.eye(mean.shape[-1], dtype=torch.bool).expand_as(mean)
            mask = select_blocks(mean / mean.sum(-1, keepdim=True), threshold=threshold, always=eye)
            layers[int(layer)] = [encode_mask(m) for m in mask]
        return {"grid": list(self.grid), "block_size": self.config.block_size, "layers": layers}


def _record(pipe: Any, prompts: Sequence[str | dict], recorder: Any, config: AttentionConfig,
            call_kwargs: dict, probe: AttentionConfig | None = None) -> dict[int, int]:
    probe = probe or AttentionConfig(sparse=None, block_size=config.block_size, warmup_steps=config.warmup_steps)
    with accelerated(pipe, Policy(name="attention-calibration", attention=probe)):
        runtimes = list(runtimes_of(pipe).values())
        if len(runtimes) != 1:
            raise PolicyError("calibrate: attention calibration supports pipelines with one transformer")
        feature = runtimes[0].feature("attention")
        feature.recorder = recorder
        recorder.step_of = feature.current_step
        for prompt in prompts:
            kwargs = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
            pipe(**{**call_kwargs, **kwargs})
        heads = {i: int(getattr(getattr(b.module, runtimes[0].adapter.attention_module), "heads", 1))
                 for i, b in enumerate(runtimes[0].blocks)}
        return heads


@contextlib.contextmanager
def observe_attention(pipe: Any, observe: Callable[..., None], *, block_size: int = 64,
                      warmup_steps: int = 0) -> Iterator[Any]:
    """Inside the block every self-attention call of ``pipe`` runs dense and ``observe(layer, step, q, k, v,
    grid, scale)`` sees its post-RoPE queries, keys and values over the visual tokens (from ``warmup_steps``
    on). For notebooks and accuracy benchmarks that study real attention maps."""
    probe = AttentionConfig(sparse=None, block_size=block_size, warmup_steps=warmup_steps)
    with accelerated(pipe, Policy(name="attention-probe", attention=probe)):
        runtimes = list(runtimes_of(pipe).values())
        feature = runtimes[0].feature("attention")

        class Observer:
            def observe(self, layer, q, k, grid, scale, v=None):
                observe(layer, feature.current_step(), q, k, v, grid, scale)

        feature.recorder = Observer()
        yield pipe


def _precision_plan(pipe: Any, prompts: Sequence[str | dict], config: AttentionConfig,
                    call_kwargs: dict) -> tuple[str, ...]:
    """``quant: auto``: every attention call in 16-bit, each also run through the quantized kernels (with the
    calibrated PARO orders when ``reorder: paro``); the plan keeps per (layer, step) the cheapest precision
    below ``quant_tolerance`` (:mod:`dit_accel.attention.adaptive_precision`)."""
    from ..attention.adaptive_precision import PrecisionRecorder

    recorder = PrecisionRecorder(("fp8", "int8"))  # the runtime skips FP8 on GPUs without it
    probe = AttentionConfig(sparse=None, reorder=config.reorder, paro_orders=config.paro_orders,
                            block_size=config.block_size, warmup_steps=0)
    heads = _record(pipe, prompts, recorder, config, call_kwargs, probe)
    return recorder.plan(len(heads), config.quant_tolerance)


def calibrate_attention(pipe: Any, prompts: Sequence[str | dict], policy: Policy, *, sample_blocks: int = 16,
                        **call_kwargs: Any) -> Policy:
    """``policy`` with its attention section's ``paro_orders`` and/or ``sparse.masks`` filled."""
    config = policy.attention
    if config is None:
        raise PolicyError("policy has no attention section to calibrate")
    if not prompts:
        raise PolicyError("calibrate needs at least one prompt")
    threshold = config.sparse.threshold if config.sparse is not None else 0.9
    orders = config.paro_orders
    if config.reorder == "paro" and orders is None:
        density = config.sparse.density if config.sparse is not None and config.sparse.density else 0.25
        quant = None  # dense quantized attention: orders by quantization error (auto: INT8's)
        if config.sparse is None and config.quant != "none":
            quant = "int8" if config.quant == "auto" else config.quant
        recorder = AttentionRecorder(config, threshold, sample_blocks, error_density=density, quant=quant)
        heads = _record(pipe, prompts, recorder, config, call_kwargs)
        if recorder.grid is None:
            raise PolicyError(f"calibrate: no self-attention call after the {config.warmup_steps} warm-up steps")
        orders = recorder.paro_orders(len(heads), heads)
        config = config.replace(paro_orders=[list(o) for o in orders])
    if config.sparse is not None and config.sparse.method == "static" and config.sparse.masks is None:
        recorder = AttentionRecorder(config, threshold, orders=orders if config.reorder == "paro" else None,
                                     record_maps=True)
        _record(pipe, prompts, recorder, config, call_kwargs)
        if recorder.grid is None:
            raise PolicyError(f"calibrate: no self-attention call after the {config.warmup_steps} warm-up steps")
        sparse = {**config.sparse.to_dict(), "masks": recorder.static_masks(threshold)}
        config = config.replace(sparse=sparse)
    if config.quant == "auto" and config.quant_plan is None:
        config = config.replace(quant_plan=list(_precision_plan(pipe, prompts, config, call_kwargs)))
    return dataclasses.replace(policy, attention=config)  # every other section unchanged
