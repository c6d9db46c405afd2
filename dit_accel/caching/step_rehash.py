"""Step Rehash — profiled step reuse by a similarity threshold (Zhan, Wu, Gong et al., 2024, "Fast and
Memory-Efficient Video Diffusion Using Streamlined Inference", NeurIPS 2024, arXiv:2411.01171).

The paper's Streamlined Inference has three parts: Feature Slicer and Operator Grouping (peak memory: the
``memory:`` section, not this module) and **Step Rehash**, which "exploits the similarity between adjacent steps
in diffusion, and accelerates inference through skipping unnecessary steps" (abstract): the features of
adjacent denoising steps are highly similar, so a step whose features are similar enough to those of the
last step that was computed reuses them instead of computing them again. Which steps reuse is decided once,
by profiling, not online. What is implemented here:

* **Profile (calibration).** ``dit_accel.calibrate`` runs the calibration generations with every step
  computed and records, per CFG branch and for every pair of steps a < t, the cosine similarity of the
  block stack's residual (output of the last block − input of the first) at step t with that at step a, on a
  fixed random sketch of its elements (``RecordConfig(stack_pairwise=True)``: ``stack_cos``), averaged over the
  generations. It is stored as ``similarity: {branch: [[sim(1, 0)], [sim(2, 0), sim(2, 1)], ...]}``.
* **Schedule (the rule).** Step 0 (and the first ``warmup_steps``) is computed. Walking forward, with ``a`` the
  last computed step, step t reuses when sim(t, a) > ``threshold`` — similar enough to the *previous computed*
  step's features, the ones a reused step really receives — and is computed otherwise (then a = t).
  ``max_reuse`` (optional, ours) caps the run of consecutive reused steps. The schedule is a pure function of
  the table and these settings (:func:`rehash_schedule`), so changing the threshold needs no new calibration.
* **Inference.** One cacheable range over the block stack (minus ``fn_compute`` first / ``bn_compute`` last
  blocks): a reused step skips those blocks and adds the residual of its last computed step to this step's
  fresh input. The decision reads only the static schedule: no host sync, no per-step statistic.

Where we depart (the paper's Step Rehash section was not available to us — only its abstract and summaries —
so the details are our reading, to be checked against the paper's text):

* **Which feature, which similarity.** The paper profiles the features of its U-Net video models (AnimateDiff,
  SVD); a DiT has no U-Net decoder, so we profile the block stack's residual, the tensor a reused step reuses,
  with the cosine similarity. The threshold is on that quantity.
* **What is reused.** The reused step adds the cached residual to its fresh block input and still runs the
  embedders and the final projection (``fn_compute``/``bn_compute`` keep more blocks fresh, DeepCache-style);
  skipping the step outright would reuse the previous noise prediction unchanged.
* **Defaults.** ``threshold`` 0.99 and ``warmup_steps`` 1 are ours (chosen on the reference models,
  ``docs/methods.md``). A threshold of 1 (cosine never exceeds it) reuses nothing: bit-exact.
* Schedules are kept per CFG branch (Wan's separate ``cond``/``uncond`` calls each get their own). A call with
  another step count than the calibration reads each step at the same relative position (one warning).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PolicyError, finite_numbers, option
from .base import (CacheConfig, CacheMethod, CachePlan, CacheState, branch_table, per_block_ranges,
                   StepMapping, register_cache_method, replace_config, require_calibrated)
from .records import Records



@dataclass(frozen=True)
class StepRehashConfig(CacheConfig):
    """Step Rehash: reuse the block stack on steps whose profiled features are similar enough to the last computed
    step's."""

    threshold: float = option(0.99, ge=-1.0, le=1.0,
                              doc="a step reuses when the cosine similarity of its profiled residual with the last "
                                  "computed step's exceeds this (1: never reuse)")
    warmup_steps: int = option(1, ge=1, doc="leading steps always computed")
    max_reuse: int | None = option(None, ge=1, doc="at most this many consecutive reused steps (null: no limit)")
    fn_compute: int = option(0, ge=0, doc="first blocks always computed (not reused)")
    bn_compute: int = option(0, ge=0, doc="last blocks always computed (not reused)")
    similarity: dict | None = option(None, doc="calibrated similarity per branch: {branch: [[sim(t, a) for a < t] "
                                               "for t = 1, 2, ...]} (run dit_accel.calibrate)")

    def validate(self) -> None:
        if self.similarity is not None:
            if not isinstance(self.similarity, dict) or not self.similarity:
                raise PolicyError("cache.similarity: expected a mapping {branch: [[similarities], ...]} (run "
                                  "dit_accel.calibrate)")
            for branch, rows in self.similarity.items():
                if not isinstance(rows, list) or not rows:
                    raise PolicyError(f"cache.similarity[{branch!r}]: expected a non-empty list of rows")
                for t, row in enumerate(rows, start=1):
                    if not isinstance(row, list) or len(row) != t:
                        raise PolicyError(f"cache.similarity[{branch!r}]: row {t - 1} (step {t}) must hold {t} "
                                          f"similarities (to steps 0..{t - 1}), got {row!r:.60}")
                    finite_numbers(f"cache.similarity[{branch!r}][{t - 1}]", row)
        super().validate()


def rehash_schedule(similarity: list[list[float]], threshold: float, warmup_steps: int = 1,
                    max_reuse: int | None = None) -> list[int]:
    """The computed steps of one branch: step 0 and the first ``warmup_steps``, then every step whose similarity to
    the last computed step is at most ``threshold`` (or that would exceed ``max_reuse`` consecutive reuses).

    ``similarity[t - 1][a]`` = sim(step t, step a) for a < t (the calibrated rows)."""
    steps = len(similarity) + 1
    computed, last, run = [0], 0, 0
    for t in range(1, steps):
        reuse = t >= warmup_steps and similarity[t - 1][last] > threshold and (max_reuse is None or run < max_reuse)
        if reuse:
            run += 1
        else:
            computed.append(t)
            last, run = t, 0
    return computed


@register_cache_method("step_rehash", StepRehashConfig)
class StepRehash(CacheMethod):
    record_options = {"stack_pairwise": True}
    exact = {"threshold": 1.0}
    reusing = {"threshold": -1.0}

    def __init__(self, config: StepRehashConfig, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        require_calibrated(config, "similarity")
        self.compute = {branch: frozenset(rehash_schedule(rows, config.threshold, config.warmup_steps,
                                                          config.max_reuse))
                        for branch, rows in config.similarity.items()}
        self.steps = {branch: len(rows) + 1 for branch, rows in config.similarity.items()}
        self._steps = StepMapping("dit_accel: Step Rehash profiled for %d steps, used for %d: steps are mapped by "
                                  "relative position (recalibrate at the served step count)")

    def make_plan(self, num_blocks: int) -> CachePlan:
        c = self.config
        ranges = per_block_ranges(num_blocks, c.fn_compute, c.bn_compute)
        return CachePlan(ranges=((ranges[0][0], ranges[-1][1]),))

    def compute_steps(self, branch: str) -> list[int]:
        """The computed steps of ``branch`` at the calibrated step count (for docs, tests and benchmarks)."""
        return sorted(self.compute[branch])

    def is_compute(self, state: CacheState) -> bool:
        compute = branch_table(self.compute, state, "similarity")
        t, _ = self._steps(state, branch_table(self.steps, state, "similarity"))
        return state.step < self.config.warmup_steps or t in compute

    def should_reuse(self, range_id: int, state: CacheState) -> bool:
        return range_id in state.residuals and not self.is_compute(state)

    def describe(self) -> str:
        c = self.config
        schedules = ", ".join(f"{b}: {len(s)}/{self.steps[b]} steps computed" for b, s in sorted(self.compute.items()))
        return (f"{self.name}(threshold={c.threshold}, warmup_steps={c.warmup_steps}, max_reuse={c.max_reuse}, "
                f"fn_compute={c.fn_compute}, bn_compute={c.bn_compute}; {schedules})")

    @staticmethod
    def calibrated(config: StepRehashConfig, records: Records, family: str) -> StepRehashConfig:
        """The profiled similarity of every step's stack residual with every earlier step's, per branch."""
        records.require("stack_cos", "step_rehash", "record with RecordConfig(stack_pairwise=True)")
        tables = records.pairwise(lambda row: row["stack_cos"])
        similarity = {}
        for branch, table in tables.items():
            rows = []
            for t in range(1, table.shape[0]):
                row = [float(v) for v in table[t, :t]]
                if any(v != v for v in row):
                    raise PolicyError(f"step_rehash: no similarity recorded for step {t} of branch {branch!r} (a "
                                      "call whose residual could not be taken?); calibrate again")
                rows.append([round(v, 6) for v in row])
            if not rows:
                raise PolicyError(f"step_rehash: branch {branch!r} ran one step; calibrate with more steps")
            similarity[branch] = rows
        return replace_config(config, similarity=similarity)
