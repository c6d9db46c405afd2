"""``dit_accel.calibrate``: run a few generations, record what a policy's methods need, return a policy that
carries it (and saves to YAML like any other).

The layer above the methods: a method declares what it needs recorded (``record_options``: fields of
:class:`~dit_accel.calibration.recorder.RecordConfig`; ``output_pass``: a second pass over the model
outputs; ``reference_pass``: recordings on the full-precision and on the quantized model, CacheQuant) and keeps
a pure ``calibrated(config, records, family)``; this package attaches the
recording method (:mod:`~dit_accel.calibration.recorder`), runs the generations, hands the method its
:class:`~dit_accel.caching.records.Records`, and records what the calibration was made for
(:class:`~dit_accel.calibrated_for.CalibratedFor`). The attention section (PARO orders, static
masks) is calibrated by :mod:`~dit_accel.calibration.attention`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Sequence

from ..api import accelerated, runtimes_of
from ..caching.base import CacheConfig, method_for
from ..caching.records import Records, fit_polynomial
from ..calibrated_for import CalibratedFor
from ..config import PolicyError
from ..policy import Policy, PolicyLike, load_policy
from ..quant import quantized
from ..runtime.parallel import shard_group
from .passes import OutputTap, RandomState
from .guardrails import record_guardrails
from .recorder import RecordConfig, Recorder, attention_statistics, foreground_tokens

__all__ = ["RecordConfig", "Recorder", "Records", "attention_statistics", "calibrate", "call_arguments",
           "fit_polynomial", "foreground_tokens", "record", "record_guardrails"]


def call_arguments(prompt: str | dict, call_kwargs: dict) -> dict:
    """The pipeline arguments of one calibration generation: ``call_kwargs`` plus the prompt (a string
    becomes ``prompt=``; a dict of call arguments is merged as is)."""
    kwargs = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
    return {**call_kwargs, **kwargs}


def record(pipe: Any, prompts: Sequence[str | dict], options: dict | None = None,
           **call_kwargs: Any) -> tuple[Records, str]:
    """Run one generation per prompt with the recording method (``RecordConfig(**options)``) attached;
    return the per-step records (with what they were recorded on) and the adapter family. The pipeline
    is left as it was.

    Step ``t`` of a record is the ``t``-th transformer call of its CFG branch (second-order samplers
    evaluate twice per step). A generation that does not start at the beginning of its schedule
    (img2img with ``strength < 1``) is refused: the tables are indexed over full schedules and serve
    partial ones at their schedule position."""
    records = Records()
    with accelerated(pipe, Policy(name="calibration", cache=RecordConfig(**(options or {})))):
        runtime = next(iter(runtimes_of(pipe).values()))
        recorder: Recorder = runtime.feature("cache").method
        family = runtime.adapter.family
        if shard_group(runtime.transformer) is not None:
            raise PolicyError("calibrate: the transformer runs context-parallel; calibrate on one process (a "
                              "calibration is a property of the model and its schedule, not of the sharding)")
        calls: set[int] = set()
        recorder.watch(runtime.transformer)  # latent inputs, for the foreground masks of attention statistics
        try:
            for prompt in prompts:
                pipe(**call_arguments(prompt, call_kwargs))
                recorder.end_generation()
                if runtime.plan.offset:
                    raise PolicyError(
                        f"calibrate: the generation started at call {runtime.plan.offset} of its schedule (img2img "
                        "with strength < 1?); calibrate on full schedules (strength 1.0), the calibration then "
                        "serves partial ones at their schedule position")
                records.extend(recorder.records)
                recorder.records = []
                calls.update(runtime.calls.values())
        finally:
            recorder.close()
        pipeline = runtime.pipeline_ref() if runtime.pipeline_ref is not None else None
        scheduler = getattr(pipeline, "scheduler", None)
        records.calibrated_for = CalibratedFor(
            model=type(runtime.transformer).__name__, blocks=len(runtime.blocks),
            branches=tuple(sorted({row["branch"] for row in records})),
            calls=next(iter(calls)) if len(calls) == 1 else None,
            scheduler=type(scheduler).__name__ if scheduler is not None else None)
    return records, family


def _normalise_prompts(prompts: Any) -> list[str | dict]:
    if isinstance(prompts, (str, Mapping)):
        prompts = [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Iterable):
        raise PolicyError(f"calibrate: prompts must be a prompt (a string, or a dict of call arguments such as "
                          f"{{'class_labels': [3]}}) or a list of them; got {type(prompts).__name__} {prompts!r:.80}")
    prompts = list(prompts)
    if not prompts:
        raise PolicyError("calibrate needs at least one prompt (a string or a dict of call arguments)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, Mapping)):
            raise PolicyError(f"calibrate: prompts[{i}] is {type(prompt).__name__} {prompt!r:.80}; each prompt must "
                              "be a string or a dict of call arguments")
    return [dict(p) if isinstance(p, Mapping) else p for p in prompts]


def _with_output_pass(pipe: Any, prompts: list, config: CacheConfig, method: type,
                      call_kwargs: dict) -> tuple[CacheConfig, CalibratedFor | None]:
    """Calibrate a method that also needs the model outputs under its calibrated schedule (see ``passes``)."""
    records, reference, snapshots = Records(), [], []
    family = ""
    sketch = getattr(config, "sketch_size", 65536)
    for prompt in prompts:
        snapshots.append(RandomState.capture(call_arguments(prompt, call_kwargs)))
        with OutputTap(pipe, sketch) as tap:
            rows, family = record(pipe, [prompt], method.record_options, **call_kwargs)
        records.extend(rows)
        records.calibrated_for = records.calibrated_for or rows.calibrated_for
        reference.append(tap.outputs)
    calibrated = method.calibrated(config, records, family)
    if not method.output_pass(config):
        return calibrated, records.calibrated_for
    cached = []
    with accelerated(pipe, Policy(name="calibration", cache=calibrated)):
        for prompt, snapshot in zip(prompts, snapshots):
            snapshot.restore()
            with OutputTap(pipe, sketch) as tap:
                pipe(**call_arguments(prompt, call_kwargs))
            cached.append(tap.outputs)
    return method.refined(config, calibrated, reference, cached), records.calibrated_for


def _with_reference_pass(pipe: Any, prompts: list, policy: Policy, method: type,
                         call_kwargs: dict) -> tuple[CacheConfig, CalibratedFor | None]:
    """Calibrate a method that compares the quantized model with the full-precision one (``reference_pass``,
    CacheQuant): per prompt, one recording on the full-precision model and one with the policy's ``quant`` section,
    from the same random state. Without a ``quant`` section, one full-precision recording."""
    if policy.quant is None:
        records, family = record(pipe, prompts, method.record_options, **call_kwargs)
        return method.calibrated(policy.cache, records, family), records.calibrated_for
    records, reference, family = Records(), Records(), ""
    for prompt in prompts:
        snapshot = RandomState.capture(call_arguments(prompt, call_kwargs))
        rows, family = record(pipe, [prompt], method.record_options, **call_kwargs)
        reference.extend(rows)
        snapshot.restore()
        with quantized(pipe, policy.quant):
            rows, family = record(pipe, [prompt], method.record_options, **call_kwargs)
        records.extend(rows)
        records.calibrated_for = records.calibrated_for or rows.calibrated_for
    records.quantized, records.reference = policy.quant.linear, reference
    return method.calibrated(policy.cache, records, family), records.calibrated_for


def calibrate(pipe: Any, prompts: Sequence[str | dict] | str | dict, policy: PolicyLike, **call_kwargs: Any) -> Policy:
    """Run one generation per prompt and return ``policy`` with the method's calibrated fields filled.

    ``prompts``: a prompt or a list of them — strings (passed as ``prompt=``) or dicts of call arguments
    (e.g. ``{"class_labels": [3]}``); ``call_kwargs`` go to every call (steps, size, seed...). Calibrate
    at the step count and resolution you will serve. The returned policy's ``calibrated_for`` says what it
    was calibrated on (model, blocks, CFG branches, calls per branch, scheduler); applying it to something
    else fails or warns (:mod:`dit_accel.calibrated_for`). Cache and quantization errors compound
    (CacheQuant, Liu et al. 2025): with a ``quant`` section the calibration runs on the quantized model (a method
    with ``reference_pass``, CacheQuant itself, records each generation on the full-precision model too).
    """
    prompts = _normalise_prompts(prompts)
    policy = load_policy(policy)
    if policy.attention is not None and policy.attention.needs_calibration:  # PARO orders / static masks
        from .attention import calibrate_attention

        with quantized(pipe, policy.quant):
            policy = calibrate_attention(pipe, prompts, policy, **call_kwargs)
        if policy.cache is None or not hasattr(method_for(policy.cache), "calibrated"):
            return policy
    if getattr(policy.guidance, "needs_calibration", False):  # LinearAG coefficients (calibration/guidance.py)
        from .guidance import calibrate_linear_ag

        with quantized(pipe, policy.quant):
            policy = calibrate_linear_ag(pipe, prompts, policy, call_arguments, **call_kwargs)
        if policy.cache is None or not hasattr(method_for(policy.cache), "calibrated"):
            return policy
    if policy.cache is None:
        raise PolicyError("policy has no cache section to calibrate")
    method = method_for(policy.cache)
    if not hasattr(method, "calibrated"):
        raise PolicyError(f"cache.method {policy.cache.method!r} needs no calibration")
    if getattr(method, "reference_pass", False):  # CacheQuant: quantized and full-precision recordings
        cache, made_for = _with_reference_pass(pipe, prompts, policy, method, call_kwargs)
        return dataclasses.replace(policy, cache=cache, calibrated_for=made_for)
    with quantized(pipe, policy.quant):
        if hasattr(method, "output_pass"):
            cache, made_for = _with_output_pass(pipe, prompts, policy.cache, method, call_kwargs)
        else:
            records, family = record(pipe, prompts, method.record_options, **call_kwargs)
            cache, made_for = method.calibrated(policy.cache, records, family), records.calibrated_for
    # guidance, attention and quant sections kept
    return dataclasses.replace(policy, cache=cache, calibrated_for=made_for)
