"""Sweep specifications: models × policies × parameter grids × steps × seeds × prompts, and their keys.

A sweep file (YAML) or dict::

    name: tiny-ci
    models: [tiny-dit, tiny-flux, {name: zoo:cifar10_dit, kwargs: {guidance_scale: 1.5}}]
    policies:
      - fora                                   # preset name or YAML path
      - {name: fb, cache: {method: fbcache}}   # inline policy
      - {policy: fbcache, grid: {threshold: [0.05, 0.1, 0.2]}}   # a grid over cache fields
    steps: [8]
    seeds: 2                 # or a list of seeds
    prompts: builtin:4       # text models (see dit_accel.eval.prompts)
    classes: 4               # class-conditional models
    fewer_steps: [1.5, 2, 3] # the naive competitor: baseline with steps / f
    metrics: [psnr, rel_l2, ssim, lpips, fid, clip]
    lpips: {net: stlpips-alex}  # default; or alex | vgg | squeeze (standard), or {backbone: "py:module:factory"}
    fid: {feature: fid-helper, reference: baseline}  # fid-helper (default) | inception | py:...; baseline | PATH
    clip: {model: openai/clip-vit-large-patch14}     # or py:module:factory returning (model, processor)
    timing: {warmup: 1, repeats: 3}
    device: auto             # auto | cpu | cuda | cuda:N
    context_parallel: null   # N: every generation spread over the N processes of the launch (diffusers'
                             # Ulysses context parallelism); null: the processes share out the seeds

The whole spec is checked before anything runs (:meth:`SweepSpec.validate`, called by ``from_dict`` /
``from_yaml``): every model name resolves (tiny families, installed zoo models, importable ``py:`` factories,
existing folders or ``organisation/name`` hub ids; nothing is loaded or downloaded), the prompt set and class
list hold at least one condition (class ids and names checked against every class-conditional model), the
device exists, every policy and grid expands, and the metric settings name known networks and existing
reference sets — so a mistake in the last entry fails before the first model runs, not hours later.

Keys are hashes of what determines a result, so reruns skip finished work: a *generation* (model,
policy content, steps, seed, condition) is made once and shared by every row that needs it — the baseline
of a (model, condition, seed, steps) is generated once and reused by every variant, sweep and rerun.
"""

from __future__ import annotations

import dataclasses

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config import PolicyError
from ..policy import Policy, load_policy

METRICS = ("psnr", "rel_l2", "ssim", "lpips", "fid", "clip")
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # models.DTYPES (not imported here: it needs torch)
DEFAULT_METRICS = ("psnr", "rel_l2", "ssim")
KINDS = ("baseline", "policy", "fewer-steps")


class SweepError(ValueError):
    """A sweep specification is invalid; the message names the field."""


def digest(obj: Any) -> str:
    """A stable 20-hex-digit hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kwargs: dict = field(default_factory=dict)
    dtype: str | None = None
    label: str = ""

    @property
    def key(self) -> str:
        return digest({"name": self.name, "kwargs": self.kwargs, "dtype": self.dtype})

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Variant:
    """One configuration of a model: the baseline, a policy, or the baseline with fewer steps."""

    kind: str
    label: str
    steps: int
    ref_steps: int
    policy: Policy | None = None

    @property
    def generation(self) -> dict:
        """What determines the generated output (names do not)."""
        if self.kind == "policy":
            d = self.policy.to_dict()
            return {"accelerated": True, **{k: v for k, v in d.items() if k != "name"}}
        return {"accelerated": False}


def generation_key(model: ModelSpec, variant: Variant, seed: int, condition: Any) -> str:
    return digest({"model": model.key, "gen": variant.generation, "steps": variant.steps, "seed": seed,
                   "condition": condition})


@dataclass
class SweepSpec:
    name: str
    models: list[ModelSpec]
    policies: list[Policy]
    steps: list[int]
    seeds: list[int]
    prompts: Any = "builtin:4"
    classes: Any = 4
    fewer_steps: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0])
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    # defaults: the networks the eval extra ships offline (ST-LPIPS also needs torchvision; see metrics.py)
    lpips: dict = field(default_factory=lambda: {"net": "stlpips-alex"})
    fid: dict = field(default_factory=lambda: {"feature": "fid-helper", "reference": "baseline"})
    clip: dict = field(default_factory=lambda: {"model": "openai/clip-vit-large-patch14"})
    timing: dict = field(default_factory=lambda: {"warmup": 1, "repeats": 3})
    device: str = "auto"
    store: str | None = None
    context_parallel: int | None = None  # Ulysses degree: one generation over all processes (None: seeds sharded)
    base_dir: str | None = None  # folder of the sweep file, for relative paths

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_yaml(cls, path: str | Path | Mapping[str, Any], check: bool = True) -> "SweepSpec":
        """Parse a sweep file (relative paths in it are resolved against its folder), or an already parsed
        dict (as :meth:`from_dict`). ``check``: run :meth:`validate` (the CLI defers it until its
        ``--device`` override is applied)."""
        if isinstance(path, Mapping):
            return cls.from_dict(path, check=check)
        path = Path(path)
        if not path.is_file():
            raise SweepError(f"sweep file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SweepError(f"sweep file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, Mapping):
            raise SweepError(f"sweep file {str(path)!r}: expected a mapping at the top level")
        return cls.from_dict({"name": path.stem, **data}, base_dir=str(path.parent), check=check)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | None = None, check: bool = True) -> "SweepSpec":
        """Parse and check a sweep dict (see the module docstring); ``check``: also run :meth:`validate`."""
        if not isinstance(data, Mapping):
            raise SweepError(f"a sweep spec is a mapping of fields, got {type(data).__name__}")
        allowed = ["name", "models", "policies", "steps", "seeds", "prompts", "classes", "fewer_steps", "metrics",
                   "lpips", "fid", "clip", "timing", "device", "store", "context_parallel"]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise SweepError(f"unknown sweep field(s) {unknown}; allowed: {allowed}")
        for required in ("models", "steps"):
            if required not in data:
                raise SweepError(f"sweep field {required!r} is required")
        defaults = cls(name="", models=[], policies=[], steps=[], seeds=[])
        metrics = _list(data.get("metrics", list(DEFAULT_METRICS)), "metrics")
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise SweepError(f"metrics: unknown {bad}; choose from {list(METRICS)}")
        spec = cls(
            name=str(data.get("name") or "sweep"),
            models=[_model(m, i) for i, m in enumerate(_list(data["models"], "models"))],
            policies=[p for i, e in enumerate(_list(data.get("policies", []), "policies"))
                      for p in expand_policy(e, f"policies[{i}]", base_dir)],
            steps=[_positive_int(s, "steps") for s in _list(data["steps"], "steps")],
            seeds=_seeds(data.get("seeds", 1)),
            prompts=resolve_prompts(data.get("prompts", defaults.prompts), base_dir),
            classes=data.get("classes", defaults.classes),
            fewer_steps=[_factor(f) for f in _list(data.get("fewer_steps", defaults.fewer_steps), "fewer_steps")],
            metrics=metrics,
            lpips=_section(data, "lpips", defaults.lpips, ("net", "backbone")),
            fid=_section(data, "fid", defaults.fid, ("feature", "reference", "reference_limit")),
            clip=_section(data, "clip", defaults.clip, ("model",)),
            timing=_section(data, "timing", defaults.timing, ("warmup", "repeats")),
            device=str(data.get("device", "auto")),
            store=data.get("store"),
            context_parallel=None if data.get("context_parallel") is None
            else _positive_int(data["context_parallel"], "context_parallel"),
            base_dir=base_dir,
        )
        if spec.context_parallel is not None and spec.context_parallel < 2:
            raise SweepError(f"context_parallel: expected the number of processes (>= 2) to spread each generation "
                             f"over, got {spec.context_parallel}; leave it out to share out the seeds instead")
        for k in ("warmup", "repeats"):
            if not isinstance(spec.timing[k], int) or spec.timing[k] < (1 if k == "repeats" else 0):
                raise SweepError(f"timing.{k}: expected an integer >= {1 if k == 'repeats' else 0}, "
                                 f"got {spec.timing[k]!r}")
        labels = [p.name for p in spec.policies]
        dupes = sorted({n for n in labels if labels.count(n) > 1})
        if dupes:
            raise SweepError(f"policies: duplicate names {dupes}; give each policy a distinct 'name'")
        for name in ("models", "steps"):
            if not getattr(spec, name):
                raise SweepError(f"sweep field {name!r}: expected at least one entry")
        if check:
            spec.validate()
        return spec

    # ---------------------------------------------------------------- checking
    def validate(self) -> None:
        """The up-front pass over the whole spec, before anything is generated: device, every model (resolved,
        not loaded), the class list against every class-conditional model, the prompt set, the metric
        settings. Raises :class:`SweepError` naming the field. (Policies and grids are checked by parsing.)"""
        from .models import describe_model
        from .prompts import check_classes, check_prompts, load_classes

        _check_device(self.device)
        infos = []
        for i, m in enumerate(self.models):
            try:
                infos.append(describe_model(m.name, m.dtype, self.base_dir))
            except Exception as err:  # ValueError, FileNotFoundError, ImportError or a SyntaxError of a py: file
                raise SweepError(f"models[{i}] ({m.name!r}): {err}") from None
        try:
            check_classes(self.classes)
        except ValueError as err:
            raise SweepError(str(err)) from None
        for i, info in enumerate(infos):
            if info.conditioning == "class" and info.num_classes:
                try:
                    load_classes(self.classes, info.num_classes, info.class_names)
                except ValueError as err:
                    detail = str(err).removeprefix("classes: ")
                    raise SweepError(f"classes, for models[{i}] ({self.models[i].name!r}): {detail}") from None
        try:
            check_prompts(self.prompts)
        except Exception as err:  # ValueError, OSError, csv / JSON errors of a prompt file
            detail = str(err)
            message = detail if detail.startswith("prompts") else f"prompts {self.prompts!r}: {detail}"
            raise SweepError(message) from None
        self._check_metric_settings()

    def _check_metric_settings(self) -> None:
        from . import refs
        from .metrics import LPIPS_SHIFT_TOLERANT, LPIPS_STANDARD

        def factory(value: Any, where: str) -> None:
            try:
                obj = refs.resolve(value, self.base_dir)
            except Exception as err:
                raise SweepError(f"{where}: {err}") from None
            if not callable(obj):
                raise SweepError(f"{where}: {value} is a {type(obj).__name__}, not a factory")

        if "lpips" in self.metrics:
            if "backbone" in self.lpips:
                if refs.is_ref(self.lpips["backbone"]):
                    factory(self.lpips["backbone"], "lpips.backbone")
            elif self.lpips.get("net") not in (*LPIPS_STANDARD, *LPIPS_SHIFT_TOLERANT):
                raise SweepError(f"lpips.net: {self.lpips.get('net')!r} is not allowed; choose one of "
                                 f"{[*LPIPS_STANDARD, *LPIPS_SHIFT_TOLERANT]} "
                                 "(or give lpips.backbone: py:MODULE:FACTORY)")
        if "fid" in self.metrics:
            feature = self.fid.get("feature")
            if refs.is_ref(feature):
                factory(feature, "fid.feature")
            elif feature not in ("inception", "fid-helper"):
                raise SweepError(f"fid.feature: {feature!r} is not allowed; choose 'inception', 'fid-helper' or "
                                 "py:MODULE:FACTORY")
            reference = self.fid.get("reference", "baseline")
            if reference != "baseline":
                path = Path(str(reference))
                if not path.exists() and self.base_dir:
                    path = Path(self.base_dir) / str(reference)
                if not isinstance(reference, str) or not (path.is_dir() or (path.is_file() and path.suffix == ".npz")):
                    raise SweepError(f"fid.reference: {reference!r} is neither 'baseline' nor an existing folder of "
                                     "images or .npz file")
            limit = self.fid.get("reference_limit")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise SweepError(f"fid.reference_limit: expected a positive integer or null, got {limit!r}")
        if "clip" in self.metrics:
            model = self.clip.get("model")
            if not isinstance(model, str) or not model:
                raise SweepError(f"clip.model: expected a CLIP model name or py:MODULE:FACTORY, got {model!r}")
            if refs.is_ref(model):
                factory(model, "clip.model")

    # ---------------------------------------------------------------- expansion
    def variants(self, steps: int) -> list[Variant]:
        """Baseline, every policy, and the fewer-steps competitor for ``steps`` (deduplicated, ordered)."""
        out = [Variant("baseline", "baseline", steps, steps)]
        out += [Variant("policy", p.name, steps, steps, p) for p in self.policies]
        seen = {steps}
        for f in self.fewer_steps:
            k = max(1, round(steps / f))
            if k not in seen:
                seen.add(k)
                out.append(Variant("fewer-steps", f"{k} steps", k, steps))
        return out

    def metric_settings(self) -> dict:
        """The settings that change metric values (part of every row's key)."""
        return {"metrics": sorted(self.metrics), "lpips": self.lpips if "lpips" in self.metrics else None,
                "fid": self.fid if "fid" in self.metrics else None,
                "clip": self.clip if "clip" in self.metrics else None}


def expand_policy(entry: Any, where: str, base_dir: str | None = None) -> list[Policy]:
    """A preset name / YAML path / inline dict, or ``{policy: ..., grid: {field: [values]}, name: ...}``."""
    try:
        if isinstance(entry, Mapping) and ("policy" in entry or "grid" in entry):
            extra = sorted(set(entry) - {"policy", "grid", "name"})
            if extra:
                raise SweepError(f"{where}: unknown key(s) {extra}; a grid entry has 'policy', 'grid' and 'name'")
            base = _policy(entry.get("policy"), base_dir)
            name = str(entry.get("name") or base.name)
            grid = entry.get("grid") or {}
            if not isinstance(grid, Mapping):
                raise SweepError(f"{where}.grid: expected a mapping of cache field -> list of values")
            for key, value in grid.items():
                if not isinstance(key, str) or not key:
                    raise SweepError(f"{where}.grid: key {key!r} is not a cache field name")
                if isinstance(value, list) and not value:
                    raise SweepError(f"{where}.grid.{key}: the list of values is empty (the grid would give no "
                                     "policies); give at least one value")
            fields = [k[len("cache."):] if k.startswith("cache.") else k for k in grid]
            values = [v if isinstance(v, list) else [v] for v in grid.values()]
            if not fields:
                return [dataclasses.replace(base, name=name)]
            out = []
            for combo in itertools.product(*values):
                changes = dict(zip(fields, combo))
                varied = base.replace(**changes)
                suffix = ",".join(f"{k}={v}" for k, v in changes.items())
                out.append(dataclasses.replace(varied, name=f"{name}[{suffix}]"))
            return out
        return [_policy(entry, base_dir)]
    except PolicyError as err:
        raise SweepError(f"{where}: {err}") from None


def _policy(spec: Any, base_dir: str | None) -> Policy:
    if isinstance(spec, str) and base_dir and spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
        candidate = Path(base_dir) / spec
        if candidate.is_file():
            spec = str(candidate)
    return load_policy(spec)


def _model(entry: Any, i: int) -> ModelSpec:
    if isinstance(entry, str):
        return ModelSpec(entry)
    if isinstance(entry, Mapping):
        extra = sorted(set(entry) - {"name", "kwargs", "dtype", "label"})
        if extra or "name" not in entry:
            raise SweepError(f"models[{i}]: expected a name or a mapping with 'name' and optional 'kwargs', "
                             f"'dtype', 'label' (got keys {sorted(entry)})")
        kwargs, dtype = entry.get("kwargs") or {}, entry.get("dtype")
        if not isinstance(entry["name"], str) or not entry["name"]:
            raise SweepError(f"models[{i}].name: expected a model name, got {entry['name']!r}")
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise SweepError(f"models[{i}].kwargs: expected a mapping of call arguments, got {kwargs!r}")
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise SweepError(f"models[{i}].dtype: {dtype!r} is not allowed; choose one of {list(DTYPE_NAMES)}")
        return ModelSpec(entry["name"], dict(kwargs), dtype, str(entry.get("label") or ""))
    raise SweepError(f"models[{i}]: expected a string or a mapping, got {entry!r}")


def resolve_prompts(spec: Any, base_dir: str | None) -> Any:
    """The prompts field with a prompt file relative to the sweep file's folder made absolute."""
    from .prompts import resolve_spec

    return resolve_spec(spec, base_dir)


def _check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` / ``cuda:N`` (present on this machine) or ``mps`` (available)."""
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SweepError(f"device: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SweepError(f"device: {device!r}, but CUDA is not available on this machine; use device: cpu or "
                             "auto (or --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SweepError(f"device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if dev.type == "mps" and torch.backends.mps.is_available():
        return
    raise SweepError(f"device: {device!r} is not supported here; use auto, cpu, cuda or cuda:N")


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"{where}: expected positive integers, got {value!r}")
    return value


def _seeds(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise SweepError(f"seeds: expected a count >= 1 or a list of seeds, got {value}")
        return list(range(value))
    seeds = _list(value, "seeds")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise SweepError(f"seeds: expected a count or a list of non-negative integers, got {value!r}")
    return seeds


def _factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 1:
        raise SweepError(f"fewer_steps: expected speed-up factors > 1 (e.g. [1.5, 2, 3]), got {value!r}")
    return float(value)


def _section(data: Mapping, name: str, default: dict, allowed: tuple[str, ...]) -> dict:
    value = data.get(name)
    if value is None:
        return dict(default)
    if not isinstance(value, Mapping):
        raise SweepError(f"{name}: expected a mapping with keys {list(allowed)}, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise SweepError(f"{name}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    merged = {**default, **value}
    if name == "lpips" and "backbone" in value:
        merged.pop("net", None)
    return merged
