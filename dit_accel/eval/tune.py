"""``dit_accel.tune``: the best validated policy for a target speed-up on the user's own model and prompts.

The question every user asks ("which method and threshold for my model?") answered by measurement:

1. **Candidates** — method × parameters (:data:`GRIDS`): FORA intervals, TaylorSeer interval × order,
   the FBCache gate's threshold, calibrated TeaCache / MagCache thresholds, ERTACache budgets around
   ``1 / target``, Adaptive Guidance's switch threshold. Methods that need calibration are calibrated
   once on the search prompts (:func:`dit_accel.calibrate`), then varied through ``Policy.replace``.
2. **Search** — successive halving (Jamieson & Talwalkar 2016; Karnin et al. 2013) over (prompt, seed)
   pairs: every candidate runs on the first rung's pairs, candidates that cannot reach the target's compute
   share are set aside, the best ``1/eta`` of the rest (by ``metric`` against the unaccelerated output of the
   same pair) go on to the next rung with more pairs. Written here rather than with optuna: the space is a
   small discrete grid with a hard speed constraint, where optuna's samplers add nothing and its pruners
   expect trials that report as they train; a synchronous halving is deterministic, so a rerun resumes from
   the store.
3. **Validation** — the best ``validate`` survivors get guardrails recorded on the search prompts
   (:func:`dit_accel.calibration.record_guardrails`) and are scored *with them* on held-out seeds (and
   held-out prompts when given) against the unaccelerated output, beside **the fewer-steps competitor at
   the same compute share** (``round(steps × share)`` steps, same seeds). Wall-clock is measured in
   interleaved rounds (:mod:`dit_accel.eval.timing`) for the baseline, the survivors and their competitors:
   median ± half-range.
4. **Decision** — a policy is returned only if it meets the target speed-up and beats its fewer-steps
   competitor on held-out pairs. The speed-up is the measured wall-clock one when its spread decides the
   target; when the target lies inside the spread (tiny models, CPU noise) the compute bound ``1 / share``
   is used and the result says so. Wall-clock above the compute bound is flagged (it means the baseline
   measurement was disturbed). Otherwise no policy: the Pareto front of what was measured and why.

**Levers** (``levers=``: compile, FP8 linears, sparse attention; :mod:`dit_accel.eval.tune_levers`) are
measured alone before the search; the kept ones join every candidate and the fewer-steps competitor, and the
search's compute target becomes ``target / lever speed-up``.

Compute share: block evaluations computed relative to the unaccelerated call (``dit_accel.stats``), with the
calls Adaptive Guidance skips taken out (a batched CFG call cut to its conditional half counts half).

Everything generated goes through a results store (:class:`~dit_accel.eval.store.ResultStore`; pass
``store=`` to make it persistent and resumable: a rerun with the same arguments regenerates nothing).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import api
from ..config import PolicyError
from ..policy import Policy
from .report import METRICS, pareto_front
from .store import ResultStore
from .sweep import SweepSpec, digest
from .timing import CallTimer, interleaved, median_spread
from .tune_levers import (FLOORS, Lever, LeverResult, combined_speedup, lever_policy, measure_levers,
                          resolve_levers, with_levers)

#: method -> function(target speed-up) -> list of its cache (or guidance) sections to try
GRIDS: dict[str, Callable[[float], list[dict]]] = {
    "fora": lambda t: [{"method": "fora", "interval": i} for i in (2, 3, 4, 5, 6)],
    "taylorseer": lambda t: [{"method": "taylorseer", "interval": i, "order": o} for i in (2, 3, 4, 5, 6)
                             for o in (1, 2)],
    "fbcache": lambda t: [{"method": "fbcache", "threshold": th} for th in (0.05, 0.1, 0.15, 0.2, 0.3, 0.45)],
    "teacache": lambda t: [{"method": "teacache", "threshold": th} for th in (0.1, 0.2, 0.3, 0.5, 0.8)],
    "magcache": lambda t: [{"method": "magcache", "threshold": th, "max_skips": k} for th in (0.06, 0.12, 0.25, 0.5)
                           for k in (2, 4)],
    "ertacache": lambda t: [{"method": "ertacache", "budget": round(min(1.0, b / t), 3)} for b in (1.0, 0.85)],
    "adaptive_guidance": lambda t: [{"method": "adaptive", "threshold": th} for th in (0.99, 0.995, 0.999)],
}
CALIBRATED = ("teacache", "magcache", "ertacache")  # calibrated on the search prompts before the search
PER_SETTING_CALIBRATION = ("ertacache",)            # its schedule depends on the varied field (budget)
GUIDANCE = ("adaptive_guidance",)
HOLDOUT_SEED = 1000                                 # held-out seeds are 1000, 1001, ...
SPEEDS = ("wall", "transformer", "compute")
PSNR_CAP = 100.0                                    # identical outputs (+inf dB) count as this when averaged


@dataclass(frozen=True)
class Candidate:
    """One configuration: a policy, or the unaccelerated pipeline at ``steps`` (baseline / fewer steps)."""

    label: str
    method: str
    policy: Policy | None
    steps: int

    @property
    def generation(self) -> dict:
        """What determines its outputs (the name does not)."""
        if self.policy is None:
            return {"accelerated": False, "steps": self.steps}
        return {"steps": self.steps, **{k: v for k, v in self.policy.to_dict().items() if k != "name"}}


@dataclass
class Trial:
    """What was measured for one candidate: per pair its score and compute share."""

    candidate: Candidate
    scores: dict[int, float] = field(default_factory=dict)
    shares: dict[int, float] = field(default_factory=dict)
    rung: int = 0
    error: str | None = None

    @property
    def score(self) -> float:
        return _mean(self.scores.values())

    @property
    def share(self) -> float:
        return _mean(self.shares.values())


@dataclass
class Validation:
    """A survivor on held-out pairs, beside its fewer-steps competitor, with timing."""

    trial: Trial
    policy: Policy
    score: float
    share: float
    fallbacks: int
    competitor_steps: int
    competitor_score: float
    higher_is_better: bool = True
    wall_speedup: float | None = None
    wall_range: tuple[float, float] | None = None
    speed: float | None = None
    speed_basis: str = ""
    above_compute_bound: bool = False

    @property
    def margin(self) -> float:
        """Score minus the competitor's (dB for PSNR; positive = better for every metric)."""
        return self.score - self.competitor_score if self.higher_is_better else self.competitor_score - self.score


@dataclass
class TuneResult:
    """What :func:`tune` found. ``policy`` is None when no candidate met the target and beat fewer steps;
    ``explanation`` says why, ``pareto`` lists the measured trade-offs."""

    policy: Policy | None
    target_speedup: float
    metric: str
    steps: int
    explanation: str
    trials: list[Trial]
    validations: list[Validation]
    pareto: list[Trial]
    competitor: dict[str, Any]
    baseline_ms: tuple[float, float] | None
    notes: list[str] = field(default_factory=list)
    chosen: Validation | None = None
    calibrated_on: dict[str, Any] = field(default_factory=dict)
    levers: list[LeverResult] = field(default_factory=list)

    def table(self) -> str:
        """The validated survivors and the search's Pareto front as Markdown."""
        name = METRICS[self.metric][0]
        lines = [f"target {self.target_speedup:g}× at {self.steps} steps, metric {name}: {self.explanation}", "",
                 f"| candidate | compute share | speed-up (basis) | wall-clock (range) | held-out {name} | "
                 f"fewer steps (steps, {name}) | margin | guardrail fallbacks |",
                 "|---|---|---|---|---|---|---|---|"]
        for v in self.validations:
            wall = "—" if v.wall_speedup is None else (f"{v.wall_speedup:.2f}× ({v.wall_range[0]:.2f}–"
                                                        f"{v.wall_range[1]:.2f})" + (" ⚠ above compute bound"
                                                                                     if v.above_compute_bound else ""))
            speed = "—" if v.speed is None else f"{v.speed:.2f}× ({v.speed_basis})"
            star = " ✔" if v is self.chosen else ""
            lines.append(f"| {v.trial.candidate.label}{star} | {v.share:.3f} | {speed} | {wall} | {v.score:.2f} | "
                         f"{v.competitor_steps}, {v.competitor_score:.2f} | {v.margin:+.2f} | {v.fallbacks} |")
        if self.levers:
            lines += ["", f"Levers alone (search pairs, {name} vs the unaccelerated output):", "",
                      f"| lever | {name} | wall-clock (range) | kept |", "|---|---|---|---|"]
            for r in self.levers:
                wall = "—" if r.speedup is None else (f"{r.speedup:.2f}× ({r.speed_range[0]:.2f}–"
                                                       f"{r.speed_range[1]:.2f})")
                lines.append(f"| {r.lever.name} | {r.score:.2f} | {wall} | {'yes' if r.kept else 'no: ' + r.reason} |")
        lines += ["", f"Search Pareto front (compute speed-up vs {name}, search pairs):", "",
                  f"| candidate | pairs | compute share | {name} |", "|---|---|---|---|"]
        for t in sorted(self.pareto, key=lambda t: t.share):
            lines.append(f"| {t.candidate.label} | {len(t.scores)} | {t.share:.3f} | {t.score:.2f} |")
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines)

    def card(self) -> dict[str, Any]:
        """Model-card tables for :meth:`Policy.save_pretrained`."""
        v = self.chosen
        measured = {"target speed-up": f"{self.target_speedup:g}×", "steps": self.steps}
        if v is not None:
            measured.update({
                "speed-up": f"{v.speed:.2f}× ({v.speed_basis})",
                "wall-clock speed-up": "—" if v.wall_speedup is None
                else f"{v.wall_speedup:.2f}× (range {v.wall_range[0]:.2f}–{v.wall_range[1]:.2f})",
                "compute share": f"{v.share:.3f}",
                f"held-out {METRICS[self.metric][0]}": f"{v.score:.2f}",
                f"fewer steps ({v.competitor_steps}) {METRICS[self.metric][0]}": f"{v.competitor_score:.2f}"})
        return {"Tuned on": self.calibrated_on, "Measured (dit_accel.tune)": measured}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Save the tuned policy as a shareable folder with its measurements on the card."""
        if self.policy is None:
            raise PolicyError(f"tune returned no policy: {self.explanation}")
        return self.policy.save_pretrained(folder, card=self.card())


# ------------------------------------------------------------------------------------------------- helpers
def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


def _output_tensor(out: Any) -> torch.Tensor:
    for name in ("images", "frames", "sample"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    raise PolicyError(f"tune: the pipeline returned {type(out).__name__} without a tensor; pass output_type='pt' "
                      "(images, videos) or 'latent'")


def _default_steps(pipe: Any) -> int | None:
    defaults = getattr(pipe, "defaults", None) or {}
    if defaults.get("num_inference_steps"):
        return int(defaults["num_inference_steps"])
    param = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    return param.default if param is not None and isinstance(param.default, int) else None


def _model_key(pipe: Any, call_kwargs: dict) -> str:
    """What identifies the model for the store: its transformer classes, configs and a weight fingerprint."""
    parts = {}
    for name, module in api._transformers(pipe).items():
        first = next(module.parameters(), None)
        parts[name] = {"class": type(module).__name__, "config": dict(getattr(module, "config", {}) or {}),
                       "weights": None if first is None else float(first.detach().float().flatten()[:4096].sum())}
    return digest({"model": parts, "call": {k: v for k, v in call_kwargs.items() if k != "generator"}})


def _compute(pipe: Any, policy: Policy) -> dict[str, float]:
    """Block evaluations computed and reused, calls and skipped unconditional evaluations of the last call."""
    stats = api.stats(pipe)
    items = list(stats.values()) if isinstance(stats, dict) else [stats]
    layouts = [rt.adapter.cfg_layout for rt in api.runtimes_of(pipe).values()]
    out = {"computed": 0.0, "total": 0.0, "calls": 0.0, "fallbacks": 0}
    for s, layout in zip(items, layouts):
        blocks = len(s.block_names)
        rows = 1.0
        if s.guidance_skipped_calls and layout == "batched" and s.transformer_calls:
            rows = 1.0 - s.guidance_skipped_calls / (2.0 * s.transformer_calls)  # half-batch calls count half
        out["computed"] += s.blocks_computed * rows
        out["total"] += s.transformer_calls * blocks
        out["calls"] += s.transformer_calls
        out["fallbacks"] += int(s.extra.get("guardrails", {}).get("fallbacks", 0))
    return out


# ------------------------------------------------------------------------------------------------- engine
class _Engine:
    """Generates (cached in the store), scores and measures the compute of candidates on (prompt, seed) pairs."""

    def __init__(self, pipe: Any, prompts: list, call_kwargs: dict, steps: int, metric: str,
                 store: ResultStore, progress: bool) -> None:
        from .scoring import MetricSuite

        self.pipe, self.prompts, self.call_kwargs, self.steps = pipe, prompts, call_kwargs, steps
        self.metric, self.store, self.progress = metric, store, progress
        self.model_key = _model_key(pipe, call_kwargs)
        spec = SweepSpec(name="tune", models=[], policies=[], steps=[steps], seeds=[0], metrics=[metric])
        self.suite = MetricSuite(spec, torch.device("cpu"))
        self.baseline_calls: float | None = None
        self.seconds = 0.0  # generation time spent in this run

    def call_args(self, prompt: Any, seed: int, steps: int) -> dict:
        from ..calibration import call_arguments

        return call_arguments(prompt, {**self.call_kwargs, "num_inference_steps": steps,
                                       "generator": _generator(seed)})

    def _key(self, candidate: Candidate, pair: tuple[int, int]) -> str:
        p, seed = pair
        return digest({"model": self.model_key, "gen": candidate.generation, "seed": seed, "prompt": self.prompts[p]})

    def run(self, candidate: Candidate, pair: tuple[int, int]) -> dict:
        """The stored record {output, computed, total, calls, fallbacks} of ``candidate`` on ``pair``."""
        key = self._key(candidate, pair)
        if self.store.has_output(key):
            return self.store.load_output(key)
        p, seed = pair
        t0 = time.perf_counter()
        policy = candidate.policy or Policy(name="none")  # "none": hooks only count (bit-identical)
        with api.accelerated(self.pipe, policy):
            out = _output_tensor(self.pipe(**self.call_args(self.prompts[p], seed, candidate.steps)))
            record = {"output": out.detach().float().cpu(), **_compute(self.pipe, policy)}
        self.seconds += time.perf_counter() - t0
        self.store.save_output(key, record)
        return record

    def baseline(self, pair: tuple[int, int]) -> dict:
        record = self.run(Candidate("baseline", "baseline", None, self.steps), pair)
        self.baseline_calls = record["calls"]
        return record

    def kind(self, output: torch.Tensor) -> str:
        if self.call_kwargs.get("output_type") == "pt":
            return "image" if output.ndim == 4 else "video"
        return "latent"

    def measure(self, candidate: Candidate, pair: tuple[int, int]) -> tuple[float, float, int]:
        """(score vs the baseline output, compute share, guardrail fallbacks) of ``candidate`` on ``pair``."""
        base = self.baseline(pair)
        record = self.run(candidate, pair)
        scores = self.suite.sample(record["output"], base["output"], self.kind(base["output"]), None)
        score = scores.get(self.metric)
        if score is None:
            raise PolicyError(f"tune: metric {self.metric!r} is not defined for these outputs")
        if math.isinf(score):
            score = PSNR_CAP if score > 0 else -PSNR_CAP
        share = record["computed"] / (base["total"] or 1.0)
        return float(score), float(share), int(record.get("fallbacks", 0))


# --------------------------------------------------------------------------------------------- candidates
def _candidates(engine: _Engine, methods: Sequence[str], target: float, calib_prompts: Callable[[], list],
                notes: list[str], log: Callable[[str], None]) -> list[Candidate]:
    from ..calibration import calibrate

    out: list[Candidate] = []
    kwargs = {**engine.call_kwargs, "num_inference_steps": engine.steps}
    for method in methods:
        sections = GRIDS[method](target)
        calibrated: Policy | None = None
        for section in sections:
            label = method + "[" + ",".join(f"{k}={v}" for k, v in section.items() if k != "method") + "]"
            try:
                if method in GUIDANCE:
                    policy = Policy(name=f"tuned-{method}", guidance=section)
                elif method in PER_SETTING_CALIBRATION:
                    log(f"tune: calibrating {label} on {len(calib_prompts())} generation(s)")
                    policy = calibrate(engine.pipe, calib_prompts(), Policy(name=f"tuned-{method}", cache=section),
                                       **kwargs)
                elif method in CALIBRATED:
                    if calibrated is None:
                        log(f"tune: calibrating {method} on {len(calib_prompts())} generation(s)")
                        calibrated = calibrate(engine.pipe, calib_prompts(),
                                               Policy(name=f"tuned-{method}", cache={"method": method}), **kwargs)
                    policy = calibrated.replace(**{k: v for k, v in section.items() if k != "method"})
                else:
                    policy = Policy(name=f"tuned-{method}", cache=section)
            except PolicyError as err:
                notes.append(f"{method} left out: {err}")
                break
            out.append(Candidate(label, method, policy, engine.steps))
    return out


# ------------------------------------------------------------------------------------------------- search
def _halving(engine: _Engine, trials: list[Trial], pairs: list[tuple[int, int]], target: float, eta: int,
             tolerance: float, deadline: float, notes: list[str], higher: bool) -> list[Trial]:
    """Successive halving; returns the survivors of the last rung reached (feasible, best first)."""
    from tqdm.auto import tqdm

    rungs, n = [], 1
    while n < len(pairs):
        rungs.append(n)
        n *= eta
    rungs.append(len(pairs))
    alive = list(trials)
    limit = (1.0 + tolerance) / target
    for r, size in enumerate(rungs):
        work = [(t, i) for t in alive for i in range(size) if i not in t.scores]
        bar = tqdm(work, desc=f"tune rung {r} ({size} pair{'s' if size > 1 else ''})", disable=not engine.progress)
        stopped = False
        for trial, i in bar:
            if time.perf_counter() > deadline:
                notes.append(f"search budget reached during rung {r}: survivors are ranked on the pairs they ran")
                stopped = True
                break
            if trial.error is not None:
                continue
            try:
                trial.scores[i], trial.shares[i], _ = engine.measure(trial.candidate, pairs[i])
                trial.rung = r
            except PolicyError as err:  # a method this model's adapter cannot run
                trial.error = str(err)
        bar.close()
        ran = [t for t in alive if t.error is None and t.scores]
        feasible = [t for t in ran if t.share <= limit]
        feasible.sort(key=lambda t: t.score, reverse=higher)
        if stopped or r == len(rungs) - 1:
            return feasible
        alive = feasible[:max(2, math.ceil(len(feasible) / eta))]
    return []


def _round_robin(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates interleaved by method (first setting of each method, then the second, ...)."""
    by_method: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_method.setdefault(c.method, []).append(c)
    columns = list(by_method.values())
    return [col[i] for i in range(max(map(len, columns), default=0)) for col in columns if i < len(col)]


def _front(trials: list[Trial], higher: bool) -> list[Trial]:
    import numpy as np

    done = [t for t in trials if t.error is None and t.scores and t.share < 1.0 - 1e-9]  # no-ops saved nothing
    if not done:
        return []
    speed = np.array([1.0 / max(t.share, 1e-9) for t in done])
    values = np.array([t.score for t in done])
    mask = pareto_front(speed, values, higher)
    return [t for t, m in zip(done, mask) if m]


# ------------------------------------------------------------------------------------------------ the API
def tune(pipe: Any, prompts: Sequence[str | dict] | str | dict, target_speedup: float = 2.5, metric: str = "psnr",
         budget_minutes: float = 10.0, *, seeds: int = 2, holdout_seeds: int = 2,
         holdout_prompts: Sequence[str | dict] | None = None, methods: Sequence[str] | None = None,
         guardrails: bool = True, validate: int = 3, eta: int = 3, tolerance: float = 0.05,
         speed: str = "wall", timing_repeats: int = 3, timing_warmup: int = 1, store: str | Path | None = None,
         progress: bool = True, log: Callable[[str], None] | None = None,
         levers: Sequence[str | dict] = (), lever_floor: float | None = None, **call_kwargs: Any) -> TuneResult:
    """Search method × parameters for the policy that best keeps ``metric`` at ``target_speedup`` on ``pipe``.

    ``prompts``: strings (``prompt=``) or dicts of call arguments (``{"class_labels": [3]}``); searched with
    seeds ``0 .. seeds-1``; validated on seeds ``1000 .. 1000+holdout_seeds-1`` of ``holdout_prompts``
    (default: the same prompts). ``call_kwargs`` go to every call (``num_inference_steps``, size, guidance
    scale...; default ``output_type="pt"``). ``methods``: keys of :data:`GRIDS` (default all).
    ``budget_minutes`` bounds the search (calibration and validation come on top: a few generations per
    survivor). ``store``: a folder to keep every generation in (resumable). ``speed``: what must reach the
    target — ``"wall"`` (end-to-end wall-clock; the compute bound where the target lies inside the measured
    spread), ``"transformer"`` (the transformer's own time, without text encoding, decoding and the sampler)
    or ``"compute"`` (the compute bound ``1 / share`` only; wall-clock still measured and reported).
    ``levers``: speed levers measured alone first and, where they keep ``metric`` above ``lever_floor`` and
    measurably speed the call up, added to every candidate and to the fewer-steps competitor
    (:mod:`dit_accel.eval.tune_levers`: ``"compile"``, ``"fp8"``, ``"sparse"`` or mappings of sections).

    Returns a :class:`TuneResult`; its ``policy`` (guardrails on unless ``guardrails=False``) is None when
    nothing met the target and beat the fewer-steps competitor. See the module docstring for the procedure."""
    from ..calibration import _normalise_prompts, record_guardrails

    log = log or (print if progress else (lambda msg: None))
    if speed not in SPEEDS:
        raise PolicyError(f"tune: speed must be one of {list(SPEEDS)}, got {speed!r}")
    if metric not in METRICS or metric in ("fid", "clip"):
        raise PolicyError(f"tune: metric {metric!r} is not a fidelity metric; choose psnr, ssim, lpips or rel_l2")
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or target_speedup <= 1:
        raise PolicyError(f"tune: target_speedup must be a number > 1, got {target_speedup!r}")
    for name, value, low in (("seeds", seeds, 1), ("holdout_seeds", holdout_seeds, 1), ("validate", validate, 1),
                             ("eta", eta, 2), ("timing_repeats", timing_repeats, 1),
                             ("timing_warmup", timing_warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PolicyError(f"tune: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(budget_minutes, bool) or not isinstance(budget_minutes, (int, float)) or not budget_minutes > 0:
        raise PolicyError(f"tune: budget_minutes must be a positive number, got {budget_minutes!r}")
    if api.is_accelerated(pipe):
        raise PolicyError("tune: the pipeline is accelerated; call dit_accel.remove(pipe) first (tune attaches every "
                          "candidate itself)")
    methods = list(GRIDS) if methods is None else list(methods)
    lever_specs = resolve_levers(levers)
    unknown = [m for m in methods if m not in GRIDS]
    if unknown or not methods:
        raise PolicyError(f"tune: unknown method(s) {unknown}; choose from {list(GRIDS)}")
    prompts = _normalise_prompts(prompts)
    held = _normalise_prompts(holdout_prompts) if holdout_prompts is not None else prompts
    steps = call_kwargs.pop("num_inference_steps", None) or _default_steps(pipe)
    if not isinstance(steps, int) or steps < 2:
        raise PolicyError("tune: pass num_inference_steps (>= 2), the step count you serve")
    call_kwargs.setdefault("output_type", "pt")
    if "generator" in call_kwargs:
        raise PolicyError("tune: seeds are set per generation (seeds=, holdout_seeds=); do not pass a generator")
    higher = METRICS[metric][1]
    start = time.perf_counter()
    deadline = start + 60.0 * budget_minutes
    all_prompts = prompts + [p for p in held if p not in prompts]
    memory = Path(tempfile.gettempdir()) / f"dit-accel-tune-{uuid.uuid4().hex}"  # never written (persist=False)
    engine = _Engine(pipe, all_prompts, call_kwargs, steps, metric,
                     ResultStore(store) if store is not None else ResultStore(memory, persist=False), progress)
    search_pairs = [(i, s) for s in range(seeds) for i in range(len(prompts))]
    holdout_pairs = [(all_prompts.index(p), HOLDOUT_SEED + s) for s in range(holdout_seeds) for p in held]

    def calib() -> list[dict]:
        """The calibration generations (fresh generators each time, so every use sees the same noise)."""
        return [{**(p if isinstance(p, dict) else {"prompt": p}), "generator": _generator(s)}
                for s in range(seeds) for p in prompts][:max(2, len(prompts))]
    notes: list[str] = []

    log(f"tune: {len(methods)} method(s), target {target_speedup:g}× at {steps} steps, {len(search_pairs)} search "
        f"and {len(holdout_pairs)} held-out pairs")
    lever_results: list[LeverResult] = []
    if lever_specs:
        floor = FLOORS[metric] if lever_floor is None else float(lever_floor)
        log(f"tune: measuring {len(lever_specs)} lever(s) alone")
        lever_results = measure_levers(engine, lever_specs, search_pairs, floor, higher, timing_warmup,
                                       timing_repeats, "transformer" if speed == "transformer" else "wall")
        notes.extend(f"lever {r.lever.name}: {r.reason}" for r in lever_results)
    kept: list[Lever] = [r.lever for r in lever_results if r.kept]
    lever_factor = combined_speedup(lever_results)
    cache_target = max(1.1, target_speedup / lever_factor)  # what the cache's compute share must reach
    if kept:
        notes.append(f"levers {', '.join(lv.name for lv in kept)} kept ({lever_factor:.2f}× together, estimated): "
                     f"the cache search targets {cache_target:.2f}×; the fewer-steps competitor runs with them too")
    rival_levers = lever_policy(kept, "fewer-steps+levers")
    candidates = _candidates(engine, methods, cache_target, calib, notes, log)
    if kept:
        suffix = " + " + " + ".join(lv.name for lv in kept)
        candidates = [dataclasses.replace(c, label=c.label + suffix, policy=with_levers(c.policy, kept))
                      for c in candidates]
    trials = [Trial(c) for c in _round_robin(candidates)]  # a budget cut in rung 0 still leaves every method
    survivors = _halving(engine, trials, search_pairs, cache_target, eta, tolerance, deadline, notes, higher)
    for t in trials:
        if t.error:
            notes.append(f"{t.candidate.label} failed: {t.error}")
    pareto = _front(trials, higher)

    # ---- validation on held-out pairs, with guardrails, beside the fewer-steps competitor at the same share
    validations: list[Validation] = []
    from tqdm.auto import tqdm

    for trial in tqdm(survivors[:validate], desc="tune validation", disable=not progress):
        policy = dataclasses.replace(trial.candidate.policy, name=f"tuned-{trial.candidate.method}")
        if guardrails and policy.cache is not None:
            policy = record_guardrails(pipe, calib(), policy, num_inference_steps=steps, **call_kwargs)
        cand = Candidate(trial.candidate.label, trial.candidate.method, policy, steps)
        measured = [engine.measure(cand, pair) for pair in holdout_pairs]
        share = _mean(m[1] for m in measured)
        k = max(1, min(steps - 1, round(steps * share)))
        rival = Candidate(f"{k} steps", "fewer-steps", rival_levers, k)
        rival_score = _mean(engine.measure(rival, pair)[0] for pair in holdout_pairs)
        validations.append(Validation(trial, policy, _mean(m[0] for m in measured), share,
                                      sum(m[2] for m in measured), k, rival_score, higher))
    target_k = max(1, round(steps / cache_target))
    competitor = {"steps": target_k, "share": target_k / steps, "levers": [lv.name for lv in kept],
                  "score": _mean(engine.measure(Candidate(f"{target_k} steps", "fewer-steps", rival_levers, target_k),
                                                pair)[0] for pair in holdout_pairs)}

    # ---- wall-clock: baseline, the survivors that beat their competitor, and those competitors, interleaved
    winners = [v for v in validations if v.margin > 0]
    baseline_ms = (_time(engine, winners, holdout_pairs, timing_warmup, timing_repeats, speed, notes, rival_levers)
                   if winners else None)
    clock = "transformer time" if speed == "transformer" else "wall-clock"
    for v in winners:
        lo, hi = v.wall_range
        bound = lever_factor / v.share  # the compute bound, times the kept levers' measured speed-up
        basis = "compute share" + (" × levers" if kept else "")
        if speed == "compute":
            v.speed, v.speed_basis = bound, basis
        elif lo <= target_speedup <= hi:
            v.speed, v.speed_basis = bound, f"{basis}; {clock} inside its spread"
        else:
            v.speed, v.speed_basis = v.wall_speedup, clock
        v.above_compute_bound = lo > (1.0 + tolerance) * bound

    met = [v for v in winners if v.speed is not None and v.speed >= target_speedup * (1.0 - tolerance)]
    met.sort(key=lambda v: v.score, reverse=higher)
    chosen = met[0] if met else None
    name = METRICS[metric][0]
    if chosen is not None:
        explanation = (f"{chosen.trial.candidate.label}: {chosen.speed:.2f}× ({chosen.speed_basis}), held-out {name} "
                       f"{chosen.score:.2f} vs {chosen.competitor_score:.2f} with {chosen.competitor_steps} steps at "
                       f"the same compute share ({chosen.margin:+.2f})")
    elif not survivors:
        explanation = (f"no candidate reached compute share <= {1 / cache_target:.3f} on the search pairs; the "
                       "Pareto front shows what each method buys")
    elif not winners:
        explanation = (f"every survivor lost to (or tied) the fewer-steps competitor at its own compute share on the "
                       f"held-out pairs: take fewer steps ({target_k} steps: {name} {competitor['score']:.2f})")
    else:
        explanation = ("the survivors that beat fewer steps did not reach the target speed-up in wall-clock time "
                       f"(measured: {', '.join(f'{v.wall_speedup:.2f}×' for v in winners)})")
    result = TuneResult(chosen.policy if chosen else None, float(target_speedup), metric, steps, explanation, trials,
                        validations, pareto, competitor, baseline_ms, notes, chosen,
                        {"model": ", ".join(type(m).__name__ for m in api._transformers(pipe).values()),
                         "steps": steps, "prompts": len(prompts), "search seeds": seeds,
                         "held-out seeds": f"{HOLDOUT_SEED}..{HOLDOUT_SEED + holdout_seeds - 1}",
                         "held-out prompts": len(held), "metric": name,
                         **({"levers": ", ".join(lv.name for lv in kept)} if kept else {})}, lever_results)
    log(f"tune: {explanation} ({time.perf_counter() - start:.0f} s)")
    return result


def _time(engine: _Engine, winners: list[Validation], pairs: list[tuple[int, int]], warmup: int, repeats: int,
          speed: str, notes: list[str], rival_levers: Policy | None = None) -> tuple[float, float]:
    """Interleaved wall-clock rounds of the baseline, every winner and its competitor; fills each winner's
    speed-up and its range (baseline ± spread over candidate ∓ spread), end to end or of the transformer
    time. One timed sample generates every held-out pair in turn, so the time covers the same pairs as the
    compute share and the score (a guardrail fallback on one pair slows that sample, as it would a user).
    Returns the baseline's (median, spread) per generation."""
    modules = list(api._transformers(engine.pipe).values())
    timer = CallTimer(modules, next(modules[0].parameters()).device)

    def entry(policy: Policy | None, steps: int):
        def call(rnd: int) -> None:
            for index, seed in pairs:
                engine.pipe(**engine.call_args(engine.prompts[index], seed, steps))
        if policy is None:
            return (lambda: None, call, lambda: None)
        return (lambda: api.accelerate(engine.pipe, policy), call, lambda: api.remove(engine.pipe))

    variants = {"baseline": entry(None, engine.steps)}
    for i, v in enumerate(winners):
        variants[f"candidate{i}"] = entry(v.policy, engine.steps)
        variants.setdefault(f"steps{v.competitor_steps}", entry(rival_levers, v.competitor_steps))
    timings = interleaved(variants, timer, warmup, repeats)
    which = "transformer_ms" if speed == "transformer" else "e2e_ms"
    base_med, base_spread = median_spread(getattr(timings["baseline"], which))
    for i, v in enumerate(winners):
        med, spread = median_spread(getattr(timings[f"candidate{i}"], which))
        v.wall_speedup = base_med / med
        v.wall_range = ((base_med - base_spread) / (med + spread), (base_med + base_spread) / max(med - spread, 1e-9))
    if any(v.wall_range[0] <= 1.0 for v in winners):
        notes.append("a wall-clock range includes 1.0×: the timing is noise-bound here (tiny model or loaded "
                     "machine); compute shares are the better guide")
    return base_med / len(pairs), base_spread / len(pairs)
