"""What calibration hands a method: the recorded per-step rows, with the reductions methods fit from.

:mod:`dit_accel.calibration` runs the recording and builds :class:`Records`; a method's
``calibrated(config, records)`` is a pure function of them. One row per transformer call of one CFG
branch (``branch``, ``step`` = the call's index in its branch), with what the recorder measured
(see :mod:`dit_accel.calibration.recorder`): ``modulated_change``, ``temb_change``,
``residual_change``, ``mag_ratio`` / ``mag_std``; with per-block recording ``block_dist``,
``stack_dist``, ``stack_fit``; with attention statistics ``attn_entropy``, ``attn_topk``, ``fg_attention``
(per-block foreground lift) and ``output_similarity``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from ..config import PolicyError


class Records(list):
    """The rows of a calibration run (a list of dicts); :attr:`calibrated_for` says what they were recorded on.

    ``quantized``: the ``quant.linear`` mode the rows were recorded under (None: full precision);
    ``reference``: for a method that asks for it (``reference_pass``), the rows of the same generations on the
    full-precision model when ``quantized`` is set (None otherwise: these rows are the full-precision ones).
    """

    calibrated_for: Any = None
    quantized: str | None = None
    reference: "Records | None" = None

    def per_branch_mean(self, key: str) -> dict[str, list[float]]:
        """Mean of ``key`` over generations, per branch and step (steps with no value are dropped at the start)."""
        table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in self:
            if math.isfinite(row[key]):
                table[row["branch"]][row["step"]].append(row[key])
        return {branch: [float(np.mean(steps[s])) for s in sorted(steps)] for branch, steps in table.items()}

    def pairwise(self, extract: Callable[[dict], Sequence[float | None] | None]) -> dict[str, np.ndarray]:
        """Mean pairwise table per branch: ``table[t, a]`` (a < t) = mean over generations of
        ``extract(row)[a]`` for the rows of step t; NaN elsewhere."""
        sums: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
        steps: dict[str, int] = defaultdict(int)
        for row in self:
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

    def fit_polynomial(self, x_key: str, y_key: str, degree: int = 4) -> tuple[float, ...]:
        """Least-squares polynomial ``y ≈ P(x)`` over the rows, highest power first (numpy.polyfit)."""
        return fit_polynomial([r[x_key] for r in self], [r[y_key] for r in self], degree)

    def require(self, key: str, what: str, hint: str) -> None:
        """A PolicyError unless the rows carry ``key`` (recorded with the options ``hint`` names)."""
        if not self or key not in self[0]:
            raise PolicyError(f"{what}: calibration records carry no {key!r} ({hint})")


def fit_polynomial(x: Sequence[float], y: Sequence[float], degree: int = 4) -> tuple[float, ...]:
    """Least-squares polynomial y ≈ P(x), highest power first (numpy.polyfit), over the finite pairs."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() <= degree:
        raise PolicyError(f"calibration recorded {int(keep.sum())} usable steps; need more than {degree} "
                          "(more prompts or steps)")
    return tuple(float(c) for c in np.polyfit(x[keep], y[keep], degree))
