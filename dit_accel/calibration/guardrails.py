"""``record_guardrails``: fill a policy's ``guardrails:`` section from generations run with the policy attached.

What the section checks: :mod:`dit_accel.guardrail_config`. The range of the gate statistic is recorded
*under the policy* (not on the unaccelerated model): reuse changes the trajectory the statistic is read
on, so a range taken without caching would flag the policy's own calls. Record on the prompts, seeds,
steps and size you serve; the section also keeps the transformer class, its block count, the calls per
branch, the sample shape and the scheduler, and falls back to computing when any of them differs.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any, Sequence

from ..api import accelerated, runtimes_of
from ..config import PolicyError
from ..guardrail_config import GuardrailConfig
from ..policy import Policy, PolicyLike, load_policy


def record_guardrails(pipe: Any, prompts: Sequence[str | dict] | str | dict, policy: PolicyLike, *,
                      margin: float = 0.5, **call_kwargs: Any) -> Policy:
    """Run one generation per prompt with ``policy`` attached and return it with a filled ``guardrails:`` section.

    ``prompts`` and ``call_kwargs`` as for :func:`dit_accel.calibrate` (a dict prompt may carry its own
    ``generator``). ``margin``: the tolerance of the range check (see
    :class:`~dit_accel.guardrail_config.GuardrailConfig`). The pipeline is left as it was."""
    from . import _normalise_prompts, call_arguments

    prompts = _normalise_prompts(prompts)
    policy = load_policy(policy)
    if policy.cache is None:
        raise PolicyError("record_guardrails: the policy has no cache section (guardrails guard the cache's reuse)")
    recording = dataclasses.replace(policy, guardrails=GuardrailConfig(margin=margin, recompute_nonfinite=False))
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    calls: set[int] = set()
    shapes: set[tuple[int, ...]] = set()
    with accelerated(pipe, recording):
        runtimes = list(runtimes_of(pipe).values())
        for prompt in prompts:
            pipe(**call_arguments(prompt, call_kwargs))
            for rt in runtimes:
                guard = rt.feature("cache").guard
                for branch, step, value in guard.records:
                    if not math.isnan(value):
                        values[branch][step].append(value)
                shapes.update(guard.sample_shapes)
                calls.update(rt.calls.values())
        first = runtimes[0]
        models = {type(rt.transformer).__name__ for rt in runtimes}
        blocks = {len(rt.blocks) for rt in runtimes}
    if not values:
        raise PolicyError("record_guardrails: no statistic was recorded (the generations made fewer than 2 "
                          "transformer calls per branch?)")
    table = {}
    for branch, steps in values.items():
        length = max(steps) + 1
        table[branch] = {"lo": [min(steps[t]) if t in steps else math.nan for t in range(length)],
                         "hi": [max(steps[t]) if t in steps else math.nan for t in range(length)]}
    scheduler = getattr(pipe, "scheduler", None)
    section = GuardrailConfig(
        margin=margin, input_change=table, recompute_nonfinite=True,
        model=type(first.transformer).__name__ if len(models) == 1 else None,
        blocks=next(iter(blocks)) if len(blocks) == 1 else None,
        calls=next(iter(calls)) if len(calls) == 1 else None,
        sample_shape=next(iter(shapes)) if len(shapes) == 1 else None,
        scheduler=None if scheduler is None else type(scheduler).__name__)
    return dataclasses.replace(policy, guardrails=section)
