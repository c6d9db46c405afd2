"""BAC — block-wise adaptive caching (Ji et al., 2025, "Block-wise Adaptive Caching for Accelerating
Diffusion Policy"). The paper accelerates diffusion *policies*; applying its scheduler to diffusion
transformers is our transfer (what is reconstructed: ``docs/methods.md``).

The paper observes that how much a block's features change between steps differs from block to
block and from step to step, so one fixed interval for every block (FORA) wastes computation.
It calibrates per-block feature similarities offline and derives a static per-block schedule:

* **Adaptive Caching Scheduler (ACS)**: for each block, pick the steps at which it is recomputed
  so that the total similarity of the features it reuses is maximal for a given number of
  updates. Here: calibration (``dit_accel.calibrate``) records, for every block ``i`` and every
  pair of steps ``a < t``, ``D_i[t, a]`` = ‖r_t − r_a‖₁ / ‖out_t‖₁, the relative L1 error of the
  block's output if its residual from step ``a`` is reused on step ``t``'s fresh input (1 − D is
  the similarity). With update steps ``u_1 = 0 < u_2 < … < u_k`` the block's cost is
  Σ_t D_i[t, last update ≤ t] (0 on update steps); :func:`acs` minimises it exactly by dynamic
  programming over segments (O(k·T²)).
* **Bubbling Union**: a refreshed block must not consume stale upstream features, so whenever a
  block is recomputed at step t every block above it (closer to the input) is recomputed at t
  too: U_i ← U_i ∪ ⋃_{j>i} U_j. The union bubbles all the way up the stack, so on every step
  the computed blocks form a prefix 0..k_t−1 of the stack. **Departure that matters**: the paper
  caches attention and FFN *sub-blocks* separately and its Bubbling Union updates only the few
  upstream blocks whose caching error is significant, triggered from downstream FFN blocks; here
  every whole block triggers it, so every schedule degenerates into "compute the first k_t blocks"
  (sub-block BAC is not implemented). ``bubbling: false`` turns the rule off.
* **Budget**: ``budget`` is the share of block evaluations computed; the schedule computes
  exactly N = round(budget · blocks · steps) block evaluations per branch. The union makes the
  per-block counts interdependent, so :func:`schedule` takes the largest uniform per-block
  update count k whose ACS schedules, after the union, fit in N, then spends the remainder
  greedily: each addition recomputes one (block, step) together with the upstream blocks the
  union then requires, choosing the largest error reduction per added evaluation among the
  additions that still fit. (Our construction; the paper's way of meeting a budget under the
  union is not reproduced.)

The schedule is static (stored in the policy as ``schedule: {branch: [[compute steps of block
0], [block 1], …]}``) and applied like FORA with one cacheable range per block: a reused block
returns its fresh input + its cached residual. The first ``warmup_steps`` steps compute every
block. The decision reads only the table, so it needs no host sync. A call with another step
count than the calibration maps each step to the calibrated step at the same relative position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import MAX_STEPS, PolicyError, option
from .base import (CacheConfig, CacheMethod, CachePlan, CacheState, branch_table, register_cache_method,
                   replace_config, require_calibrated)
from .records import Records

logger = logging.getLogger("dit_accel")


@dataclass(frozen=True)
class BACConfig(CacheConfig):
    """BAC: a calibrated per-block update schedule under a budget of block evaluations."""

    budget: float = option(0.4, gt=0.0, le=1.0, doc="share of block evaluations computed (exact, per branch)")
    warmup_steps: int = option(1, ge=1, doc="leading steps on which every block is computed")
    bubbling: bool = option(True, doc="Bubbling Union: a recomputed block forces every upstream block to recompute")
    schedule: dict | None = option(None, doc="calibrated compute steps per branch and block "
                                             "{branch: [[steps of block 0], [steps of block 1], ...]}")
    calibrated_steps: int | None = option(None, ge=1, doc="the step count the schedule was calibrated for")

    def validate(self) -> None:
        if self.schedule is not None:
            if not isinstance(self.schedule, dict) or not self.schedule:
                raise PolicyError("cache.schedule: expected a mapping {branch: [[steps], ...]} "
                                  "(run dit_accel.calibrate)")
            for branch, blocks in self.schedule.items():
                if not isinstance(blocks, list) or not blocks or not all(
                        isinstance(steps, list) and steps and all(
                            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps)
                        for steps in blocks):
                    raise PolicyError(f"cache.schedule[{branch!r}]: expected one non-empty list of step indices "
                                      "per block")
        super().validate()
        if self.schedule is not None:  # the schedule becomes a (blocks, steps) table: bound its size
            limit = self.calibrated_steps if self.calibrated_steps is not None else MAX_STEPS
            for branch, blocks in self.schedule.items():
                last = max(max(steps) for steps in blocks)
                if last >= limit:
                    raise PolicyError(f"cache.schedule[{branch!r}]: step {last} is out of range; "
                                      + (f"cache.calibrated_steps is {limit}" if self.calibrated_steps is not None
                                         else f"steps must be < {MAX_STEPS}"))


def segment_costs(table: np.ndarray) -> np.ndarray:
    """``C[a, b]`` = Σ_{a<t<b} table[t, a]: the error of reusing step a's residual until step b (b ≤ T)."""
    steps = table.shape[0]
    d = np.nan_to_num(np.asarray(table, dtype=np.float64), nan=0.0)
    costs = np.zeros((steps + 1, steps + 1))
    for a in range(steps):
        run = np.concatenate([[0.0, 0.0], np.cumsum(d[a + 1:, a])])  # run[b - a] = Σ_{a<t<b}
        costs[a, a + 1:] = run[1:steps - a + 1]
    return costs


def acs_all(table: np.ndarray, forced: Sequence[int] = ()) -> list[list[int] | None]:
    """ACS for every update count: ``result[k]`` = the k update steps (step 0 and ``forced``
    included) minimising the block's total reuse error, or None when k is infeasible."""
    steps = table.shape[0]
    forced = sorted({0, *forced} & set(range(steps)))
    costs = segment_costs(table)
    allowed = np.ones((steps + 1, steps + 1), dtype=bool)  # segment [a, b) may not skip a forced step
    for f in forced:
        allowed[:f, f + 1:] = False
    costs = np.where(allowed, costs, np.inf)
    costs[np.tril_indices(steps + 1)] = np.inf  # b > a
    # F[j][u]: least cost of steps [0, u) with j updates there, the first at 0, the next update at u
    best = np.full((steps + 1, steps + 1), np.inf)
    back = np.zeros((steps + 1, steps + 1), dtype=np.int64)
    best[1] = costs[0]
    for j in range(2, steps + 1):
        total = best[j - 1][:, None] + costs  # [a, u]
        back[j] = np.argmin(total, axis=0)
        best[j] = total[back[j], np.arange(steps + 1)]
    result: list[list[int] | None] = [None]
    for k in range(1, steps + 1):
        if not np.isfinite(best[k, steps]):
            result.append(None)
            continue
        updates, u = [], steps
        for j in range(k, 1, -1):
            u = int(back[j, u])
            updates.append(u)
        result.append(sorted([0, *updates]))
    return result


def acs(table: np.ndarray, k: int, forced: Sequence[int] = ()) -> list[int]:
    """The k update steps (including step 0 and ``forced``) with the least total reuse error of one block."""
    options = acs_all(table, forced)
    if not 1 <= k < len(options) or options[k] is None:
        raise PolicyError(f"cache.budget: {k} updates of {table.shape[0]} steps cannot include the forced steps "
                          f"{sorted({0, *forced})}")
    return options[k]


def bubbling_union(sets: Sequence[Sequence[int]]) -> list[list[int]]:
    """Bubbling Union: block i computes at every step at which any block below it (i < j) computes."""
    out: list[list[int]] = [[] for _ in sets]
    below: set[int] = set()
    for i in range(len(sets) - 1, -1, -1):
        below |= set(sets[i])
        out[i] = sorted(below)
    return out


def reuse_cost(table: np.ndarray, updates: Sequence[int]) -> float:
    """Σ_t table[t, last update ≤ t]: the block's total reuse error under ``updates``."""
    table = np.nan_to_num(table, nan=0.0)
    last, total, ups = 0, 0.0, set(updates)
    for t in range(table.shape[0]):
        if t in ups:
            last = t
        else:
            total += table[t, last]
    return total


def _gains(table: np.ndarray, updates: set[int]) -> np.ndarray:
    """Reduction of the block's reuse error from adding each step to its updates (-inf if already one)."""
    steps = table.shape[0]
    gains = np.full(steps, -np.inf)
    ordered = sorted(updates)
    for t in range(steps):
        if t in updates:
            continue
        a = max(u for u in ordered if u < t)
        b = min([u for u in ordered if u > t], default=steps)
        gains[t] = table[t:b, a].sum() - table[t + 1:b, t].sum()
    return gains


def schedule(tables: Sequence[np.ndarray], total: int, warmup_steps: int = 1,
             bubbling: bool = True) -> list[list[int]]:
    """Per-block compute steps: ACS + (optional) Bubbling Union with exactly ``total`` block evaluations.

    ``tables[i][t, a]`` is block i's error of reusing step a at step t (a < t; NaN = unknown = 0).
    """
    blocks, steps = len(tables), tables[0].shape[0]
    tables = [np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0) for t in tables]
    forced = list(range(min(warmup_steps, steps)))
    minimum = blocks * max(len(forced), 1)
    if not minimum <= total <= blocks * steps:
        raise PolicyError(f"cache.budget: {total} block evaluations is outside [{minimum}, {blocks * steps}] "
                          f"for {blocks} blocks × {steps} steps with warmup_steps={warmup_steps}")
    options = [acs_all(t, forced) for t in tables]
    bases = [_largest_fitting(lambda k: [o[k] for o in options], blocks, steps, forced, total, bubbling)]
    if bubbling:  # the union of independent schedules grows fast: also try one common schedule for all blocks
        joint = acs_all(sum(tables), forced)
        bases.append(_largest_fitting(lambda k: [joint[k]] * blocks, blocks, steps, forced, total, bubbling))
    best, best_cost = None, np.inf
    for base in bases:
        member = _fill(tables, base, total, bubbling)
        cost = sum(reuse_cost(t, np.flatnonzero(member[i])) for i, t in enumerate(tables))
        if cost < best_cost:
            best, best_cost = member, cost
    return [[int(s) for s in np.flatnonzero(row)] for row in best]


def _largest_fitting(sets_for, blocks: int, steps: int, forced: list[int], total: int,
                     bubbling: bool) -> list[list[int]]:
    """The per-block sets for the largest update count k whose (bubbled) total fits in ``total``."""
    chosen = [[0] + forced[1:]] * blocks
    for k in range(max(len(forced), 1), steps + 1):
        sets = sets_for(k)
        if any(s is None for s in sets):
            continue
        if bubbling:
            sets = bubbling_union(sets)
        if sum(map(len, sets)) > total:
            break
        chosen = sets
    return chosen


def _fill(tables: list[np.ndarray], base: list[list[int]], total: int, bubbling: bool) -> np.ndarray:
    """Greedily add (block, step) evaluations, with the upstream closure under bubbling, until ``total``."""
    blocks, steps = len(tables), tables[0].shape[0]
    member = np.zeros((blocks, steps), dtype=bool)
    for i, ups in enumerate(base):
        member[i, ups] = True
    gains = np.stack([_gains(t, set(np.flatnonzero(member[i]))) for i, t in enumerate(tables)])
    remaining = total - int(member.sum())
    while remaining > 0:
        free = ~member
        if bubbling:
            size = np.cumsum(free, axis=0)  # (j, t): blocks ≤ j not yet computed at t
            gain = np.cumsum(np.where(free, gains, 0.0), axis=0)
        else:
            size, gain = free.astype(np.int64), np.where(free, gains, 0.0)
        score = np.where(free & (size <= remaining), gain / np.maximum(size, 1), -np.inf)
        j, t = np.unravel_index(int(np.argmax(score)), score.shape)
        added = [i for i in range(j + 1) if free[i, t]] if bubbling else [j]
        for i in added:
            member[i, t] = True
            gains[i] = _gains(tables[i], set(np.flatnonzero(member[i])))
        remaining -= len(added)
    return member


def position(step: int, steps: int, calibrated_steps: int) -> int:
    """The calibrated step at the same relative position as ``step`` of ``steps``."""
    if steps == calibrated_steps or steps <= 1:
        return min(step, calibrated_steps - 1)
    return min(int(round(step * (calibrated_steps - 1) / (steps - 1))), calibrated_steps - 1)


@register_cache_method("bac", BACConfig)
class BAC(CacheMethod):
    record_options = {"per_block": True}
    exact = {"budget": 1.0}
    reusing = {"budget": 0.5}

    def __init__(self, config: BACConfig, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        require_calibrated(config, "schedule")
        self.compute: dict[str, np.ndarray] = {}
        for branch, per_block in config.schedule.items():
            if len(per_block) != self.num_blocks:
                raise PolicyError(f"cache.schedule[{branch!r}] has {len(per_block)} blocks; the model has "
                                  f"{self.num_blocks} (calibrate on this model)")
            steps = max(config.calibrated_steps or 0, max(max(s) for s in per_block) + 1)
            table = np.zeros((self.num_blocks, steps), dtype=bool)
            for i, s in enumerate(per_block):
                table[i, s] = True
            self.compute[branch] = table
        self._warned = False

    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=tuple((i, i + 1) for i in range(num_blocks)))

    def calibrated_steps(self) -> int:
        return max(t.shape[1] for t in self.compute.values())

    def is_compute(self, block: int, state: CacheState) -> bool:
        table = branch_table(self.compute, state, "schedule")
        if state.step < self.config.warmup_steps:
            return True
        calibrated = self.calibrated_steps()
        index, length = state.schedule_position()
        steps = length or calibrated
        if steps != calibrated and not self._warned:
            logger.warning("dit_accel: BAC schedule calibrated for %d steps, used for %d: steps are mapped by "
                           "relative position (recalibrate for an exact budget)", calibrated, steps)
            self._warned = True
        t = position(index, steps, calibrated)
        return t >= table.shape[1] or bool(table[block, t])

    def should_reuse(self, range_id: int, state: CacheState) -> bool:
        return not self.is_compute(range_id, state) and range_id in state.residuals

    @staticmethod
    def calibrated(config: BACConfig, records: Records, family: str) -> BACConfig:
        """ACS (+ Bubbling Union) on the recorded per-block pairwise reuse errors, per branch."""
        records.require("block_dist", "bac", "record with RecordConfig(per_block=True)")
        blocks = len(records[0]["block_dist"])
        per_block = [records.pairwise(lambda row, i=i: row["block_dist"][i]) for i in range(blocks)]
        result = {}
        for branch in per_block[0]:
            tables = [p[branch] for p in per_block]
            steps = tables[0].shape[0]
            total = int(round(config.budget * blocks * steps))
            total = max(total, blocks * min(config.warmup_steps, steps))
            result[branch] = schedule(tables, total, config.warmup_steps, config.bubbling)
        return replace_config(config, schedule=result, calibrated_steps=steps)
