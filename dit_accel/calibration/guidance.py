"""Calibration of guidance methods that fit coefficients offline: LinearAG (:mod:`dit_accel.caching.linear_ag`).

Runs full-CFG generations with the pipeline accelerated by a no-op policy (so that the runtime names the CFG
branch of every call), reads every transformer output through a forward hook, splits it into the conditional
and unconditional predictions (batched CFG: by the pipeline's row order; separate CFG: by the ``"cond"`` /
``"uncond"`` call) and accumulates, per step that LinearAG will replace, the normal equations of
û_t = a_0·c_t + Σ a_i·c_{t−i} + b_i·u_{t−i} + γ against the real u_t. Only the last ``history`` steps are
held, never the whole trajectory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..adapters import TRANSFORMER_COMPONENTS, get_adapter
from ..api import accelerated, inspect
from ..caching.adaptive_guidance import COND, UNCOND, cfg_order_for
from ..caching.linear_ag import LinearAGConfig, NormalEquations, calibrated_config, replaced_steps
from ..config import PolicyError
from ..outputs import output_sample
from ..policy import Policy


class _GuidanceTap:
    """Per step (c_t, u_t) of one generation, fed to the normal equations of the steps to replace."""

    def __init__(self, pipe: Any, config: LinearAGConfig, equations: NormalEquations) -> None:
        self.pipe, self.config, self.equations = pipe, config, equations
        self.name = next(n for n in TRANSFORMER_COMPONENTS if isinstance(getattr(pipe, n, None), torch.nn.Module))
        self.transformer = getattr(pipe, self.name)
        adapter = get_adapter(self.transformer)
        layout = adapter.cfg_layout
        if layout == "none":
            raise PolicyError(f"guidance: the {adapter.family} adapter runs no classifier-free guidance")
        self.layout = layout
        self.order = cfg_order_for(pipe, config, layout)
        self.reset(None)

    def reset(self, steps: int | None) -> None:
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cond: torch.Tensor | None = None
        self.step = -1
        self.fit_steps = set(replaced_steps(self.config, steps)) if steps else set()
        self.seen_pairs = 0

    def __enter__(self) -> "_GuidanceTap":
        self.handle = self.transformer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _pair(self, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        self.step += 1
        self.seen_pairs += 1
        h = self.config.history
        if self.step in self.fit_steps and len(self.history) >= h:
            self.equations.add(self.step, cond, self.history[-h:], uncond)
        self.history.append((cond.detach(), uncond.detach()))
        del self.history[:-h]

    @torch.no_grad()
    def _hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        sample = output_sample(output)
        if sample is None:
            return
        view = inspect(self.pipe).runtimes[self.name]  # a snapshot: read at every call
        call = view.current_call or view.last_call
        branch = call[0] if call is not None else "default"
        if branch == COND:
            self.cond = sample.detach()
        elif branch == UNCOND:
            if self.cond is not None:
                self._pair(self.cond, sample.detach())
            self.cond = None
        elif self.layout == "batched" and sample.shape[0] % 2 == 0:
            first, second = sample.detach().chunk(2, dim=0)
            self._pair(*((first, second) if self.order == "cond_first" else (second, first)))


def calibrate_linear_ag(pipe: Any, prompts: Sequence[str | dict], policy: Policy, call_arguments,
                        **call_kwargs: Any) -> Policy:
    """``policy`` with its LinearAG coefficients fitted on one full-CFG generation per prompt."""
    config = policy.guidance
    steps = call_kwargs.get("num_inference_steps") or (getattr(pipe, "defaults", None) or {}).get(
        "num_inference_steps")
    if not isinstance(steps, int):
        raise PolicyError("calibrate: pass num_inference_steps= for linear_ag (the coefficients belong to a step "
                          "count)")
    equations = NormalEquations()
    with accelerated(pipe, Policy(name="calibration")):
        tap = _GuidanceTap(pipe, config, equations)
        with tap:
            for prompt in prompts:
                tap.reset(steps)
                pipe(**call_arguments(prompt, call_kwargs))
                if tap.seen_pairs == 0:
                    raise PolicyError("calibrate: the generation ran no classifier-free guidance (guidance_scale "
                                      "<= 1?); linear_ag needs cond and uncond predictions")
    return dataclasses.replace(policy, guidance=calibrated_config(config, equations, steps))
