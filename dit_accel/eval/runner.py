"""Runs a sweep into a results store: generate, score, time, aggregate — resumably and sharded.

For each model, in two phases separated by a barrier:

1. *Samples.* The (seed, condition) pairs are split across processes (``accelerate``'s ``PartialState``:
   process i takes pairs i, i + n, …). For each pair and step count the baseline is generated first, then
   every policy (attached with ``dit_accel.accelerate`` and removed after) and every fewer-steps variant,
   all with the same seed; each output is saved, scored against the baseline output and written as one
   ``sample`` row. Work whose row is already stored is skipped, and an output already saved is not
   generated again.
2. *Configurations.* Step counts are split across processes. The baseline and every configuration still
   missing are timed in interleaved rounds on the same process (so a speed-up compares two measurements
   of one run on one device), FID is computed against the reference set, per-sample metrics are averaged,
   and one ``config`` row is written per configuration.

A run that is killed loses only the row in progress; running the same sweep again finishes the rest.

With ``context_parallel: N`` (launched on N processes) nothing is split: every process runs every
generation and timing together, each computing its share of the tokens (diffusers' Ulysses context
parallelism); rank 0 writes the rows and outputs.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import api
from .models import EvalModel, as_images, load_model
from .prompts import load_classes, load_prompts
from .scoring import MetricSuite, reference_images
from .store import ResultStore
from .sweep import ModelSpec, SweepSpec, Variant, digest, generation_key
from .timing import CallTimer, interleaved


@dataclass
class RunSummary:
    generated: int = 0        # outputs generated in this run
    samples: int = 0          # sample rows written in this run
    samples_skipped: int = 0  # sample rows found in the store
    configs: int = 0          # config rows written in this run
    configs_skipped: int = 0  # config rows found in the store
    stopped_early: bool = False


def _state(device: str):
    """accelerate's process state; a long collective timeout, since one process may wait at the barrier while
    another finishes a slow shard or computes FID on a large reference set."""
    from datetime import timedelta

    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return PartialState(cpu=cpu, timeout=timedelta(hours=12))


def _device(requested: str, state: Any) -> torch.device:
    if requested == "auto":
        dev = torch.device(state.device)
    elif requested.startswith("cuda") and torch.device(state.device).type == "cuda" and ":" not in requested:
        dev = torch.device(state.device)  # one GPU per process
    else:
        dev = torch.device(requested)
    return torch.device("cpu") if dev.type == "cpu" else dev


def _enable_context_parallel(model: EvalModel, degree: int) -> list[str]:
    """Spread every generation of ``model`` over the launch's processes (diffusers' Ulysses context
    parallelism on each transformer of its pipeline). On CPU, diffusers' device choice (``rank %
    torch.accelerator.device_count()``) is given the world size for the call, as there are no devices.
    Returns the components that now run context-parallel."""
    from unittest import mock

    from diffusers import ContextParallelConfig

    cpu = model.device.type == "cpu"
    count = mock.patch.object(torch.accelerator, "device_count", lambda: degree) if cpu else contextlib.nullcontext()
    for name in api.TRANSFORMER_COMPONENTS:
        transformer = getattr(model.pipe, name, None)
        if isinstance(transformer, torch.nn.Module) and getattr(transformer, "_parallel_config", None) is None:
            if cpu:
                transformer.set_attention_backend("native")  # the CPU backend that supports context parallelism
            with count:
                transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    return [name for name in api.TRANSFORMER_COMPONENTS
            if getattr(getattr(model.pipe, name, None), "_parallel_config", None) is not None]


def _versions() -> dict[str, str]:
    import diffusers

    import dit_accel

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "dit_accel": getattr(dit_accel, "__version__", "unknown")}


class SweepRunner:
    """Holds what one process needs while it works through a sweep."""

    def __init__(self, spec: SweepSpec, store: str | os.PathLike | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        root = store or spec.store
        if root is None:
            raise ValueError("no results store given: pass a folder (or set 'store' in the sweep file)")
        self.spec = spec
        self.state = _state(spec.device)
        self.device = _device(spec.device, self.state)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        # context parallel: every process runs every generation (its shard of it) and so every row; rank 0
        # writes them, the others keep theirs in memory, so all ranks take the same path in lockstep
        self.cp = spec.context_parallel
        self.store = ResultStore(root, rank=self.rank, persist=self.cp is None or self.rank == 0)
        self.parallel: dict | None = None
        self.suite = MetricSuite(spec, self.device)
        self.settings_key = digest(spec.metric_settings())
        self.progress = progress
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.meta = {"device": str(self.device), "device_name": torch.cuda.get_device_name(self.device)
                     if self.device.type == "cuda" else "cpu", **_versions(), "run_id": self.run_id,
                     "num_processes": self.world}

    # ------------------------------------------------------------------ entry
    def run(self, max_samples: int | None = None) -> RunSummary:
        summary = RunSummary()
        self.spec.validate()  # a spec built or changed in code is checked as a parsed one is
        if max_samples is not None and self.world > 1:
            raise ValueError("max_samples works in single-process runs only")
        if self.cp is not None and self.cp != self.world:
            raise ValueError(f"context_parallel: {self.cp} spreads each generation over {self.cp} processes; this "
                             f"launch has {self.world} (torchrun --nproc-per-node {self.cp} ...)")
        for spec_model in self.spec.models:
            model = load_model(spec_model.name, spec_model.kwargs, self.device, spec_model.dtype,
                               base_dir=self.spec.base_dir)
            self.parallel = None  # recorded in the config rows: what actually runs context-parallel
            if self.cp is not None:
                self.parallel = {"degree": self.cp, "components": _enable_context_parallel(model, self.cp)}
                if not self.parallel["components"]:
                    raise ValueError(f"context_parallel: {spec_model.display} has no transformer that diffusers "
                                     "can run context-parallel")
            try:
                plan = self._plan(model)
                self.log(f"[{spec_model.display}] {len(plan)} (seed, condition) pairs × "
                         f"{sum(len(self.spec.variants(s)) for s in self.spec.steps)} configurations")
                if not self._samples(spec_model, model, plan, summary, max_samples):
                    summary.stopped_early = True
                    return summary
                self.state.wait_for_everyone()
                self.store.refresh()
                self._configs(spec_model, model, plan, summary)
                self.state.wait_for_everyone()
                self.store.refresh()
            finally:
                del model
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return summary

    def _plan(self, model: EvalModel) -> list[tuple[int, Any]]:
        if model.conditioning == "class":
            conditions: list[Any] = load_classes(self.spec.classes, model.num_classes or 1, model.class_names)
        else:
            prompts = self.spec.prompts
            if isinstance(prompts, str) and self.spec.base_dir and prompts.split(":")[0] not in (
                    "builtin", "parti", "coco") and (Path(self.spec.base_dir) / prompts).is_file():
                prompts = str(Path(self.spec.base_dir) / prompts)
            conditions = load_prompts(prompts)
        return [(seed, cond) for seed in self.spec.seeds for cond in conditions]

    # ------------------------------------------------------------- keys/rows
    def _sample_key(self, model: ModelSpec, variant: Variant, seed: int, cond: Any) -> str:
        return digest({"gen": generation_key(model, variant, seed, cond), "ref_steps": variant.ref_steps,
                       "kind": variant.kind, "metrics": self.settings_key})

    def _config_key(self, model: ModelSpec, variant: Variant, plan: list) -> str:
        return digest({"model": model.key, "label": variant.label, "gen": variant.generation,
                       "steps": variant.steps, "ref_steps": variant.ref_steps, "kind": variant.kind,
                       "plan": plan, "metrics": self.settings_key, "timing": self.spec.timing})

    @staticmethod
    def _clip_text(model: EvalModel, cond: Any) -> str | None:
        if model.conditioning == "text":
            return str(cond)
        if model.class_names:
            return f"a photo of a {model.class_names[int(cond)]}"
        return None

    # --------------------------------------------------------------- samples
    def _output(self, spec_model: ModelSpec, model: EvalModel, variant: Variant, seed: int, cond: Any,
                summary: RunSummary) -> dict:
        key = generation_key(spec_model, variant, seed, cond)
        if self.store.has_output(key):
            return self.store.load_output(key)
        t0 = time.perf_counter()
        if variant.kind == "policy":
            with api.accelerated(model.pipe, variant.policy):
                out = model.generate(cond, seed, variant.steps)
                stats = _stats(model.pipe, variant.policy)
        else:
            out = model.generate(cond, seed, variant.steps)
            stats = {"blocks_computed_share": 1.0, "attention_density": 1.0}
        record = {"output": out.detach().float().cpu(), "stats": stats, "seconds": time.perf_counter() - t0}
        self.store.save_output(key, record, media=model.output)
        summary.generated += 1
        return record

    def _samples(self, spec_model: ModelSpec, model: EvalModel, plan: list, summary: RunSummary,
                 max_samples: int | None) -> bool:
        from tqdm.auto import tqdm

        mine = plan if self.cp is not None else plan[self.rank::self.world]
        work = [(seed, cond, v) for seed, cond in mine for steps in self.spec.steps for v in self.spec.variants(steps)]
        todo = [w for w in work if not self.store.has("sample", self._sample_key(spec_model, w[2], w[0], w[1]))]
        summary.samples_skipped += len(work) - len(todo)
        bar = tqdm(todo, desc=f"{spec_model.display} samples", disable=not self.progress, position=self.rank,
                   leave=self.rank == 0)
        for seed, cond, variant in bar:
            if max_samples is not None and summary.samples >= max_samples:
                return False
            record = self._output(spec_model, model, variant, seed, cond, summary)
            reference = None
            if variant.kind != "baseline":
                base = Variant("baseline", "baseline", variant.ref_steps, variant.ref_steps)
                reference = self._output(spec_model, model, base, seed, cond, summary)["output"]
            scores = self.suite.sample(record["output"], reference, model.output, self._clip_text(model, cond))
            row = {"sweep": self.spec.name, "model": spec_model.display, "model_name": spec_model.name,
                   "model_key": spec_model.key, "variant": variant.label, "kind": variant.kind,
                   "steps": variant.steps, "ref_steps": variant.ref_steps, "seed": seed, "condition": cond,
                   "generation_key": generation_key(spec_model, variant, seed, cond), "gen_seconds": record["seconds"],
                   **record["stats"], **scores, "run_id": self.run_id, "time": time.time()}
            self.store.add("sample", self._sample_key(spec_model, variant, seed, cond), row)
            summary.samples += 1
        return True

    # --------------------------------------------------------------- configs
    def _configs(self, spec_model: ModelSpec, model: EvalModel, plan: list, summary: RunSummary) -> None:
        for steps in self.spec.steps if self.cp is not None else self.spec.steps[self.rank::self.world]:
            variants = self.spec.variants(steps)
            pending = [v for v in variants if not self.store.has("config", self._config_key(spec_model, v, plan))]
            summary.configs_skipped += len(variants) - len(pending)
            if not pending:
                continue
            rows = {v.label: [self.store.get("sample", self._sample_key(spec_model, v, s, c)) for s, c in plan]
                    for v in pending}
            missing = [label for label, rs in rows.items() if any(r is None for r in rs)]
            if missing:
                self.log(f"[{spec_model.display}] samples missing for {missing} (a process failed?): "
                         "not aggregating them; run the sweep again")
                pending = [v for v in pending if v.label not in missing]
            timed = [variants[0]] + [v for v in pending if v.kind != "baseline"]
            timings = self._time(spec_model, model, timed, plan)
            base = timings["baseline"].summary(steps)
            for v in pending:
                t = timings[v.label].summary(v.steps)
                row = {"sweep": self.spec.name, "model": spec_model.display, "model_name": spec_model.name,
                       "model_key": spec_model.key, "output": model.output, "variant": v.label, "kind": v.kind,
                       "policy": None if v.policy is None else v.policy.to_dict(), "steps": v.steps,
                       "ref_steps": v.ref_steps, "n_samples": len(plan), **t,
                       "baseline_e2e_ms": base["e2e_ms"], "speedup": base["e2e_ms"] / t["e2e_ms"],
                       "transformer_speedup": base["transformer_ms_per_step"] * steps
                       / max(t["transformer_ms_per_step"] * v.steps, 1e-12),
                       **_aggregate(rows[v.label]), "fid": self._fid(spec_model, model, v, plan),
                       "settings": self.spec.metric_settings(), "timing_settings": self.spec.timing,
                       **self.meta, "context_parallel": self.parallel, "time": time.time()}
                self.store.add("config", self._config_key(spec_model, v, plan), row)
                summary.configs += 1

    def _time(self, spec_model: ModelSpec, model: EvalModel, variants: list[Variant], plan: list) -> dict:
        from tqdm.auto import tqdm

        modules = [m for name in api.TRANSFORMER_COMPONENTS
                   if isinstance(m := getattr(model.pipe, name, None), torch.nn.Module)]
        timer = CallTimer(modules, self.device)

        def entry(v: Variant):
            def call(rnd: int) -> None:
                seed, cond = plan[rnd % len(plan)]
                model.generate(cond, seed, v.steps)
            if v.kind == "policy":
                return (lambda: api.accelerate(model.pipe, v.policy), call, lambda: api.remove(model.pipe))
            return (lambda: None, call, lambda: None)

        bar = tqdm(total=self.spec.timing["repeats"] * len(variants), desc=f"{spec_model.display} timing",
                   disable=not self.progress, position=self.rank, leave=self.rank == 0)
        with bar:
            out = interleaved({v.label: entry(v) for v in variants}, timer, self.spec.timing["warmup"],
                              self.spec.timing["repeats"], progress=lambda _: bar.update())
        return out

    def _fid(self, spec_model: ModelSpec, model: EvalModel, variant: Variant, plan: list) -> float | None:
        if "fid" not in self.spec.metrics or model.output == "latent":
            return None
        ref = self.spec.fid.get("reference", "baseline")

        def outputs(v: Variant):
            for seed, cond in plan:
                record = self.store.load_output(generation_key(spec_model, v, seed, cond))
                yield as_images(record["output"], model.output)

        if ref == "baseline":
            base = Variant("baseline", "baseline", variant.ref_steps, variant.ref_steps)
            ref_id = f"baseline:{spec_model.key}:{variant.ref_steps}:{digest(plan)}"
            real = lambda: outputs(base)  # noqa: E731
        else:
            path = Path(ref)
            if not path.exists() and self.spec.base_dir:
                path = Path(self.spec.base_dir) / ref
            ref_id = f"path:{path.resolve()}"
            real = lambda: reference_images(path, self.spec.fid.get("reference_limit"))  # noqa: E731
        value = self.suite.fid(ref_id, real, outputs(variant))
        return None if value is None else max(value, 0.0)  # rounding makes identical sets come out at -1e-11


def _stats(pipe: Any, policy: Any) -> dict[str, Any]:
    """Share of block evaluations computed, and attention density: the share of self-attention query-key
    pairs computed over all calls (``Stats.extra["attention"]["density"]``) when the policy has an attention
    section, 1.0 (dense) when it has none, else unknown (None)."""
    stats = api.stats(pipe)
    items = list(stats.values()) if isinstance(stats, dict) else [stats]
    computed = sum(s.blocks_computed for s in items)
    total = computed + sum(s.blocks_reused for s in items)
    density = [s.extra["attention"]["density"] for s in items
               if s.extra.get("attention", {}).get("density") is not None]
    dense = policy.to_dict().get("attention") is None
    return {"blocks_computed_share": computed / total if total else 1.0,
            "transformer_calls": sum(s.transformer_calls for s in items),
            "attention_density": float(np.mean(density)) if density else (1.0 if dense else None)}


def _aggregate(rows: list[dict]) -> dict[str, Any]:
    """Means over samples. PSNR averages the finite values (identical samples give +inf, counted apart)."""
    out: dict[str, Any] = {}
    for name in ("rel_l2", "ssim", "lpips", "clip", "blocks_computed_share", "attention_density", "gen_seconds"):
        values = [r[name] for r in rows if r.get(name) is not None]
        out[name] = float(np.mean(values)) if values else None
    psnr = [r["psnr"] for r in rows if r.get("psnr") is not None]
    finite = [p for p in psnr if math.isfinite(p)]
    out["psnr"] = float(np.mean(finite)) if finite else (math.inf if psnr else None)
    out["psnr_identical"] = len(psnr) - len(finite)
    return out


def run_sweep(spec: SweepSpec | str | os.PathLike, store: str | os.PathLike | None = None, *,
              progress: bool = True, max_samples: int | None = None,
              log: Callable[[str], None] = print) -> RunSummary:
    """Run (or resume) a sweep given as a :class:`SweepSpec` or a YAML path; returns what was done."""
    if not isinstance(spec, SweepSpec):
        spec = SweepSpec.from_yaml(spec)
    return SweepRunner(spec, store, progress=progress, log=log).run(max_samples=max_samples)
