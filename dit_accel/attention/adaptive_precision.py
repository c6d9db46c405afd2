"""Adaptive attention precision: a calibrated per-(layer, step) choice among bf16, INT8 and FP8 attention.

``attention: {sparse: null, quant: auto}`` generalises the manual knobs ``warmup_steps`` and
``dense_layers`` (which keep whole steps or whole layers in 16-bit) into a calibrated plan. The idea
follows mixed-precision quantization of diffusion models by measured sensitivity (e.g. PTQ4DiT, Wu et
al. 2024; ViDiT-Q, Zhao et al. 2025, which pick bit-widths per layer and timestep from a calibration
error), applied here to the attention kernel alone: ``dit_accel.calibrate`` runs the calibration
prompts with every attention call in 16-bit and, for each call, runs the same call through each
quantized kernel (:func:`~dit_accel.attention.sparse.quant_dense_attention`, with the PARO
permutation when ``reorder: paro``) and measures the mean relative L1 of its output against the
16-bit SDPA output the model itself computed. Per (layer, step) it keeps the worst error over
prompts, CFG branches and batch, and the plan takes the cheapest precision whose error is below
``quant_tolerance`` (FP8 before INT8 before bf16); a tolerance of 0 keeps everything in 16-bit.

The plan is stored compactly in ``attention.quant_plan``: one string per layer, one character per
step (:data:`CODES`: ``b`` bf16, ``i`` int8, ``f`` fp8), e.g. ``["bbiiii", "bfffff"]``; a list per
layer of precision names is accepted and normalised. Steps are transformer calls of a CFG branch
(``StepContext.step``), as everywhere in the project.

Other step counts follow the project's convention for calibrated schedules
(:class:`~dit_accel.caching.base.StepMapping`): each step uses the plan of the calibrated step at the
same relative position of the schedule, with one warning. ``warmup_steps`` and ``dense_layers`` still
apply on top of the plan (they force bf16); with ``quant: auto`` set ``warmup_steps: 0`` to let the
plan decide the early steps too.

Where we depart from the papers: they choose bit-widths of linear layers (and attention maps) from
their effect on the model output, searched jointly; we choose each attention call's kernel
independently from that call's own output error (cheap, one pass, but blind to how errors compound
across layers and steps), and only among the kernels this project has.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import PolicyError

#: precisions, cheapest first (the order the plan tries them in); bf16 = the model's own 16-bit attention.
PRECISIONS: tuple[str, ...] = ("fp8", "int8", "bf16")
CODES: dict[str, str] = {"bf16": "b", "int8": "i", "fp8": "f"}
NAMES: dict[str, str] = {c: p for p, c in CODES.items()}


def normalise_plan(plan: Any, where: str = "attention.quant_plan") -> tuple[str, ...]:
    """A plan as one code string per layer (all of one length), from strings or lists of precision names."""
    if isinstance(plan, Mapping) and all(str(k).isdigit() for k in plan):
        plan = [plan[k] for k in sorted(plan, key=int)]
    if isinstance(plan, (str, bytes)) or not isinstance(plan, (list, tuple)) or not plan:
        raise PolicyError(f"{where}: expected one entry per layer (a string of step codes {sorted(NAMES)} or a list "
                          f"of {list(CODES)}), got {plan!r:.80}")
    rows = []
    for i, row in enumerate(plan):
        if isinstance(row, (list, tuple)):
            bad = [p for p in row if p not in CODES]
            if bad:
                raise PolicyError(f"{where}[{i}]: unknown precision {bad[0]!r}; choose from {list(CODES)}")
            row = "".join(CODES[p] for p in row)
        if not isinstance(row, str) or not row or any(c not in NAMES for c in row):
            raise PolicyError(f"{where}[{i}]: expected a non-empty string of step codes (b bf16, i int8, "
                              f"f fp8), got {row!r:.80}")
        rows.append(row)
    if len({len(r) for r in rows}) != 1:
        raise PolicyError(f"{where}: every layer needs one code per calibrated step; got lengths "
                          f"{sorted({len(r) for r in rows})}")
    return tuple(rows)


def relative_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean relative L1 ``sum|out - ref| / sum|ref|`` (float32)."""
    ref = ref.float()
    return float((out.float() - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30))


def plan_from_errors(errors: Mapping[str, Mapping[tuple[int, int], float]], num_layers: int, steps: int,
                     tolerance: float, modes: Sequence[str] = ("fp8", "int8")) -> tuple[str, ...]:
    """The plan: per (layer, step) the cheapest of ``modes`` (in :data:`PRECISIONS` order) whose measured
    error (``errors[mode][(layer, step)]``) is below ``tolerance``; bf16 where none is, or nothing was
    measured (calls with a mask, cross-attention...)."""
    rows = []
    for layer in range(num_layers):
        row = []
        for step in range(steps):
            pick = "bf16"
            for mode in PRECISIONS:
                err = errors.get(mode, {}).get((layer, step)) if mode in modes else None
                if err is not None and err < tolerance:
                    pick = mode
                    break
            row.append(CODES[pick])
        rows.append("".join(row))
    return tuple(rows)


def plan_precision(plan: Sequence[str], layer: int, step: int) -> str:
    """The precision of ``layer`` at calibrated ``step`` (the step already mapped to the plan's length)."""
    row = plan[layer]
    return NAMES[row[min(step, len(row) - 1)]]


class PrecisionRecorder:
    """Calibration: receives each dense attention call's 16-bit output and the same call's quantized outputs
    (``observe``), keeps the worst error per (mode, layer, step)."""

    full_calls = True  # the runtime hands over whole calls (text included), not the visual tokens' q/k

    def __init__(self, modes: Sequence[str]) -> None:
        self.modes = tuple(modes)
        self.errors: dict[str, dict[tuple[int, int], float]] = defaultdict(dict)
        self.steps = 0
        self.step_of: Callable[[], int] = lambda: 0

    def observe_outputs(self, layer: int, step: int, ref: torch.Tensor, outs: Mapping[str, torch.Tensor]) -> None:
        self.steps = max(self.steps, step + 1)
        for mode, out in outs.items():
            err = relative_l1(out, ref)
            if not math.isfinite(err):
                err = math.inf
            table = self.errors[mode]
            table[(layer, step)] = max(err, table.get((layer, step), 0.0))

    def plan(self, num_layers: int, tolerance: float) -> tuple[str, ...]:
        if not self.steps:
            raise PolicyError("calibrate: attention.quant auto saw no self-attention call it could quantize "
                              "(every call masked, cross-attention, or not routed through SDPA)")
        return plan_from_errors(self.errors, num_layers, self.steps, tolerance, self.modes)

    def summary(self) -> dict[str, float]:
        """Largest measured error per mode (for logs)."""
        return {m: max(t.values()) for m, t in self.errors.items() if t}
