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
  the computed blocks form a prefix 0..k_t−1 of the stack. **Departure that matters** (``granularity:
  block``, the default): the paper caches attention and FFN *sub-blocks* separately and its Bubbling
  Union updates only the few upstream blocks whose caching error is significant, triggered from
  downstream FFN blocks; at block granularity every whole block triggers it, so every schedule
  degenerates into "compute the first k_t blocks". ``bubbling: false`` turns the rule off.
* **Sub-block BAC** (``granularity: sub_block``, the paper's granularity): the units are each block's
  self-attention and FFN sub-modules, in execution order (the adapter's ``attention_module`` /
  ``ffn_module``: ``ModelAdapter.sub_blocks``). Calibration records ``D_u[t, a]`` = ‖o_t − o_a‖₁ / ‖out_t‖₁
  per sub-block u (its module output's change, relative to its block's output: the stream it is added
  to; ``dit_accel.calibration.sub_blocks``), ACS runs per sub-block, and the union is the paper's rule:
  whenever an FFN sub-block computes at step t, the upstream sub-blocks whose caching error at t is
  significant compute at t too (:func:`sub_block_union`). A reused sub-block returns its cached module
  output while the rest of its block (norms, timestep modulation, gates, cross-attention) computes on the
  fresh stream (:mod:`dit_accel.runtime.cache`); ``budget`` counts sub-block evaluations. Where we depart:
  *significant* is our definition — the sub-block's one-step error ``D_u[t, t−1]`` is at least
  ``union_threshold`` × the median one-step error of all sub-blocks and steps (default 1: above the median;
  0: every upstream sub-block joins) — the paper's threshold is not reproduced; the cached quantity is the
  module's output, re-gated by the fresh modulation (the paper's policy network has no adaLN gates);
  cross-attention (PixArt, Wan) is not a unit and always computes; a block whose MLP runs in parallel with
  attention (FLUX's single-stream blocks) has only its attention unit; the budget counts attention and FFN
  evaluations alike (their FLOPs differ: ``benchmarks/bac_variants_zoo.py`` compares the variants on
  measured FLOPs).
* **Budget**: ``budget`` is the share of block evaluations computed; the schedule computes
  exactly N = round(budget · blocks · steps) block evaluations per branch. The union makes the
  per-block counts interdependent, so :func:`schedule` takes the largest uniform per-block
  update count k whose ACS schedules, after the union, fit in N, then spends the remainder
  greedily: each addition recomputes one (block, step) together with the upstream blocks the
  union then requires, choosing the largest error reduction per added evaluation among the
  additions that still fit. (Our construction; the paper's way of meeting a budget under the
  union is not reproduced.)

The schedule is static (stored in the policy as ``schedule: {branch: [[compute steps of block
0], [block 1], …]}``, one list per sub-block at sub-block granularity) and applied like FORA with one
cacheable range per block: a reused block returns its fresh input + its cached residual. The first
``warmup_steps`` steps compute every block. The decision reads only the table, so it needs no host
sync. A call with another step count than the calibration maps each step to the calibrated step at the
same relative position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import MAX_STEPS, PolicyError, option
from .base import (CacheConfig, CacheMethod, CachePlan, CacheState, Kept, branch_table, keep, register_alias,
                   StepMapping, register_cache_method, replace_config, require_calibrated, take)
from .records import Records

BAC_GRANULARITIES = ("block", "sub_block")



@dataclass(frozen=True)
class BACConfig(CacheConfig):
    """BAC: a calibrated per-block update schedule under a budget of block evaluations."""

    budget: float = option(0.4, gt=0.0, le=1.0, doc="share of block evaluations computed (exact, per branch)")
    warmup_steps: int = option(1, ge=1, doc="leading steps on which every block is computed")
    bubbling: bool = option(True, doc="Bubbling Union: a recomputed block forces every upstream block to recompute "
                                      "(sub_block: a recomputed FFN forces the upstream sub-blocks with a significant "
                                      "caching error at that step to recompute)")
    granularity: str = option("block", choices=BAC_GRANULARITIES,
                              doc="block: one schedule per block (a reused block adds its cached residual); sub_block: "
                                  "one per attention and per FFN sub-module (the adapter's attention_module / "
                                  "ffn_module; a reused sub-module returns its cached output, the rest of the block "
                                  "computes); budget then counts sub-block evaluations")
    union_threshold: float = option(1.0, ge=0.0,
                                    doc="sub_block: an upstream sub-block's caching error at a step is significant "
                                        "when its one-step reuse error there is at least union_threshold x the median "
                                        "one-step error of all sub-blocks (0: every upstream sub-block joins)")
    schedule: dict | None = option(None, doc="calibrated compute steps per branch and block (sub_block: per "
                                             "sub-block, in execution order) "
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


def significant_errors(tables: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """``sig[u, t]``: sub-block u's one-step reuse error at step t, ``tables[u][t, t-1]``, is at least
    ``threshold`` × the median one-step error of all sub-blocks and steps (step 0: False)."""
    steps = tables[0].shape[0]
    one_step = np.zeros((len(tables), steps))
    for u, table in enumerate(tables):
        one_step[u, 1:] = np.nan_to_num(np.diagonal(np.asarray(table, dtype=np.float64), offset=-1), nan=0.0)
    median = float(np.median(one_step[:, 1:])) if steps > 1 else 0.0
    sig = one_step >= threshold * median
    sig[:, 0] = False
    return sig


def sub_block_union(sets: Sequence[Sequence[int]], kinds: Sequence[str], significant: np.ndarray) -> list[list[int]]:
    """Sub-block Bubbling Union: whenever an FFN sub-block computes at step t, every sub-block upstream of it
    (earlier in execution order) whose caching error at t is significant (``significant[u, t]``) computes at t."""
    out = [set(s) for s in sets]
    ffn = [u for u, kind in enumerate(kinds) if kind == "ffn"]
    steps = significant.shape[1]
    for t in range(steps):
        last = max((f for f in ffn if t in out[f]), default=None)
        if last is None:
            continue
        for u in range(last):
            if significant[u, t]:
                out[u].add(t)
    return [sorted(s) for s in out]


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
             bubbling: bool = True, kinds: Sequence[str] | None = None,
             union_threshold: float = 1.0, common_base: bool = True) -> list[list[int]]:
    """Per-block compute steps: ACS + (optional) Bubbling Union with exactly ``total`` block evaluations.

    ``tables[i][t, a]`` is block i's error of reusing step a at step t (a < t; NaN = unknown = 0). With
    ``kinds`` (one "attention" / "ffn" per table) the tables are sub-blocks in execution order and the union
    is :func:`sub_block_union` with :func:`significant_errors` at ``union_threshold``. ``common_base``: also try
    one common ACS schedule for every unit as the starting point (kept when its reuse error is lower; a common
    schedule satisfies either union as it is); False: only the units' own ACS schedules, united.
    """
    blocks, steps = len(tables), tables[0].shape[0]
    union: _Union | None = None
    if bubbling:
        union = _Union.whole_blocks(blocks) if kinds is None else \
            _Union.sub_blocks(kinds, significant_errors(tables, union_threshold))
    tables = [np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0) for t in tables]
    forced = list(range(min(warmup_steps, steps)))
    minimum = blocks * max(len(forced), 1)
    if not minimum <= total <= blocks * steps:
        raise PolicyError(f"cache.budget: {total} block evaluations is outside [{minimum}, {blocks * steps}] "
                          f"for {blocks} blocks × {steps} steps with warmup_steps={warmup_steps}")
    options = [acs_all(t, forced) for t in tables]
    bases = [_largest_fitting(lambda k: [o[k] for o in options], blocks, steps, forced, total, union)]
    if bubbling and common_base:  # the union of independent schedules grows fast: also try one common schedule
        joint = acs_all(sum(tables), forced)
        bases.append(_largest_fitting(lambda k: [joint[k]] * blocks, blocks, steps, forced, total, union))
    best, best_cost = None, np.inf
    for base in bases:
        member = _fill(tables, base, total, union)
        cost = sum(reuse_cost(t, np.flatnonzero(member[i])) for i, t in enumerate(tables))
        if cost < best_cost:
            best, best_cost = member, cost
    return [[int(s) for s in np.flatnonzero(row)] for row in best]


@dataclass(frozen=True)
class _Union:
    """Which upstream units an added (unit j, step t) evaluation brings along: ``joins[j, i, t]`` (i < j)."""

    apply: Callable[[Sequence[Sequence[int]]], list[list[int]]]
    triggers: np.ndarray  # (units,): unit j triggers the union when it computes
    joins: np.ndarray  # (units, steps): unit i joins a trigger downstream of it at step t

    @classmethod
    def whole_blocks(cls, blocks: int) -> "_Union":
        return cls(bubbling_union, np.ones(blocks, dtype=bool), np.ones((blocks, 1), dtype=bool))

    @classmethod
    def sub_blocks(cls, kinds: Sequence[str], significant: np.ndarray) -> "_Union":
        return cls(lambda sets: sub_block_union(sets, kinds, significant),
                   np.array([k == "ffn" for k in kinds]), significant)

    def closure(self, member: np.ndarray, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(size, gain) of adding each (j, t) together with the units the union then requires."""
        free = ~member
        joins = np.broadcast_to(self.joins, member.shape) & free
        below = np.cumsum(joins, axis=0) - joins  # joining units i < j
        below_gain = np.cumsum(np.where(joins, gains, 0.0), axis=0) - np.where(joins, gains, 0.0)
        # a trigger brings the joining units above it not computed yet (none when a trigger further downstream
        # already computes at t: the union holds for the members)
        trig = self.triggers[:, None] & free
        size = free.astype(np.int64) + np.where(trig, below, 0)
        gain = np.where(free, gains, 0.0) + np.where(trig, below_gain, 0.0)
        return size, gain

    def added(self, j: int, t: int, member: np.ndarray) -> list[int]:
        if not self.triggers[j]:
            return [j]
        joins = np.broadcast_to(self.joins, member.shape)
        return [i for i in range(j) if joins[i, t] and not member[i, t]] + [j]


def _largest_fitting(sets_for, blocks: int, steps: int, forced: list[int], total: int,
                     union: "_Union | None") -> list[list[int]]:
    """The per-block sets for the largest update count k whose (united) total fits in ``total``."""
    chosen = [[0] + forced[1:]] * blocks
    for k in range(max(len(forced), 1), steps + 1):
        sets = sets_for(k)
        if any(s is None for s in sets):
            continue
        if union is not None:
            sets = union.apply(sets)
        if sum(map(len, sets)) > total:
            break
        chosen = sets
    return chosen


def _fill(tables: list[np.ndarray], base: list[list[int]], total: int, union: "_Union | None") -> np.ndarray:
    """Greedily add (block, step) evaluations, with the upstream units the union requires, until ``total``."""
    blocks, steps = len(tables), tables[0].shape[0]
    member = np.zeros((blocks, steps), dtype=bool)
    for i, ups in enumerate(base):
        member[i, ups] = True
    gains = np.stack([_gains(t, set(np.flatnonzero(member[i]))) for i, t in enumerate(tables)])
    remaining = total - int(member.sum())
    while remaining > 0:
        free = ~member
        if union is not None:
            size, gain = union.closure(member, gains)
        else:
            size, gain = free.astype(np.int64), np.where(free, gains, 0.0)
        score = np.where(free & (size <= remaining), gain / np.maximum(size, 1), -np.inf)
        if not np.isfinite(score.max()):
            raise PolicyError(f"cache.budget: no addition of at most {remaining} evaluations keeps the union rule; "
                              "choose another budget")
        j, t = np.unravel_index(int(np.argmax(score)), score.shape)
        added = union.added(j, t, member) if union is not None else [j]
        for i in added:
            member[i, t] = True
            gains[i] = _gains(tables[i], set(np.flatnonzero(member[i])))
        remaining -= len(added)
    return member


@dataclass(eq=False)
class BACState(CacheState):
    """Args:
        sub_outputs: each sub-block's last computed output (sub_block granularity), kept with its version counters.
    """

    sub_outputs: dict[int, Any] = field(default_factory=dict)


def _keep_output(state: CacheState, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return keep(state, output)
    if isinstance(output, (tuple, list)):
        return type(output)(_keep_output(state, o) for o in output)
    return output


def _take_output(state: CacheState, kept: Any) -> tuple[Any, bool]:
    """(the kept output, True) or (None, False) if a block modified part of it in place since."""
    if isinstance(kept, Kept):
        value = take(state, kept)
        return value, value is not None
    if isinstance(kept, (tuple, list)):
        parts = [_take_output(state, k) for k in kept]
        return type(kept)(v for v, _ in parts), all(ok for _, ok in parts)
    return kept, True


@register_cache_method("bac", BACConfig)
class BAC(CacheMethod):
    State = BACState
    record_options = {"per_block": True, "sub_blocks": True}
    exact = {"budget": 1.0}
    reusing = {"budget": 0.5}

    def __init__(self, config: BACConfig, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        require_calibrated(config, "schedule")
        sub = config.granularity == "sub_block"
        units = len(self.plan.sub_blocks) if sub else self.num_blocks
        what = "sub-blocks" if sub else "blocks"
        self.compute: dict[str, np.ndarray] = {}
        for branch, per_block in config.schedule.items():
            if len(per_block) != units:
                raise PolicyError(f"cache.schedule[{branch!r}] has {len(per_block)} {what}; the model has "
                                  f"{units} {what} at granularity {config.granularity!r} (calibrate on this model "
                                  "with this granularity)")
            steps = max(config.calibrated_steps or 0, max(max(s) for s in per_block) + 1)
            table = np.zeros((units, steps), dtype=bool)
            for i, s in enumerate(per_block):
                table[i, s] = True
            self.compute[branch] = table
        self._steps = StepMapping("dit_accel: BAC schedule calibrated for %d steps, used for %d: steps are mapped by "
                                  "relative position (recalibrate for an exact budget)")

    def make_plan(self, num_blocks: int) -> CachePlan:
        if self.config.granularity == "sub_block":
            units = self.adapter.sub_blocks(self.blocks)
            if not units:
                raise PolicyError(f"cache.granularity: 'sub_block' needs the blocks' attention / FFN sub-modules; the "
                                  f"{self.adapter.family} adapter names {self.adapter.attention_module!r} / "
                                  f"{self.adapter.ffn_module!r}, which its blocks do not have")
            return CachePlan(ranges=(), sub_blocks=tuple(u.index for u in units))
        return CachePlan(ranges=tuple((i, i + 1) for i in range(num_blocks)))

    def calibrated_steps(self) -> int:
        return max(t.shape[1] for t in self.compute.values())

    def is_compute(self, block: int, state: CacheState) -> bool:
        """Whether unit ``block`` (a block, or a sub-block at sub_block granularity) computes on this call."""
        table = branch_table(self.compute, state, "schedule")
        if state.step < self.config.warmup_steps:
            return True
        t, _ = self._steps(state, self.calibrated_steps())
        return t >= table.shape[1] or bool(table[block, t])

    def should_reuse(self, range_id: int, state: CacheState) -> bool:
        return not self.is_compute(range_id, state) and range_id in state.residuals

    def should_reuse_sub(self, unit: int, state: BACState) -> Any | None:
        if unit not in state.sub_outputs or self.is_compute(unit, state):
            return None
        output, intact = _take_output(state, state.sub_outputs[unit])
        if not intact:
            del state.sub_outputs[unit]
            return None
        return output

    def on_sub_computed(self, unit: int, output: Any, state: BACState) -> None:
        state.sub_outputs[unit] = _keep_output(state, output)

    @staticmethod
    def calibrated(config: BACConfig, records: Records, family: str) -> BACConfig:
        """ACS (+ Bubbling Union) on the recorded per-block (or per-sub-block) pairwise reuse errors, per branch."""
        sub = config.granularity == "sub_block"
        key = "sub_dist" if sub else "block_dist"
        records.require(key, "bac", "record with RecordConfig(per_block=True" + (", sub_blocks=True)" if sub else ")"))
        units = len(records[0][key])
        kinds = records[0]["sub_kinds"] if sub else None
        if sub and not units:
            raise PolicyError("cache.granularity: 'sub_block': the calibration recorded no attention / FFN sub-blocks "
                              "(the adapter's attention_module / ffn_module)")
        per_unit = [records.pairwise(lambda row, i=i: row[key][i]) for i in range(units)]
        result = {}
        for branch in per_unit[0]:
            tables = [p[branch] for p in per_unit]
            steps = tables[0].shape[0]
            total = int(round(config.budget * units * steps))
            total = max(total, units * min(config.warmup_steps, steps))
            result[branch] = schedule(tables, total, config.warmup_steps, config.bubbling, kinds,
                                      config.union_threshold)
        return replace_config(config, schedule=result, calibrated_steps=steps)


register_alias("bac_sub_block", "bac", granularity="sub_block")
