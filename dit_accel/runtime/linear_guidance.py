"""The LinearAG feature: its plumbing (its decisions and fit: :mod:`dit_accel.caching.linear_ag`).

Every step's conditional prediction c_t and unconditional prediction u_t are kept for ``history`` steps. On a
replaced step the unconditional evaluation does not run: a batched CFG call is cut to its conditional rows and
its output completed with û_t in the unconditional rows; a separate ``"uncond"`` call passes every block
through and its output becomes û_t. Steps are counted here (a half-batch call has its own per-shape state in
the runtime, so the runtime's step counter of that state would restart).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..batching import slice_rows
from ..caching.adaptive_guidance import COND, UNCOND, UNBATCHED_ARGUMENTS
from ..caching.linear_ag import LinearAG
from ..outputs import map_output, output_sample, replace_sample
from .feature import Call, Feature

logger = logging.getLogger("dit_accel")


class LinearGuidanceFeature(Feature):
    """LinearAG on one transformer (see the module docstring)."""

    name = "guidance"
    passes_through = True

    def __init__(self, guidance: LinearAG, component: str = "transformer") -> None:
        self.guidance = guidance
        self.component = component
        self._warned_steps = False
        self.new_generation()

    def new_generation(self) -> None:
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.step = -1
        self.steps: int | None = None
        self.replaced = 0
        self.replaced_steps: list[int] = []
        self._cond: torch.Tensor | None = None
        self._call: tuple | None = None

    def release(self) -> None:
        self.history, self._cond, self._call = [], None, None

    def _push(self, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        self.history.append((cond.detach(), uncond.detach()))
        del self.history[:-self.guidance.config.history]

    def _replaces(self) -> bool:
        n = self.guidance.config.calibrated_steps
        if n is not None and self.steps is not None and self.steps != n and not self._warned_steps:
            self._warned_steps = True
            logger.warning("dit_accel: LinearAG calibrated for %d steps, used for %d: replaced steps are mapped by "
                           "relative position with the calibrated coefficients (recalibrate)", n, self.steps)
        return self.guidance.replaces(self.step, self.steps, len(self.history))

    def prepare(self, call: Call) -> None:
        self._call = None
        hidden = call.kwargs.get("hidden_states", call.args[0] if call.args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim == 0:
            return
        if call.branch == COND:
            self.step += 1
            self._call = ("cond",)
            return
        if call.branch == UNCOND:
            cond, self._cond = self._cond, None
            if cond is None or cond.shape[0] != hidden.shape[0]:
                return  # no conditional prediction of this very step: run as usual
            if self._replaces():
                call.passthrough = True
                self._call = ("skip", cond)
            else:
                self._call = ("uncond", cond)
            return
        if self.guidance.cfg_layout != "batched" or hidden.shape[0] % 2:
            return
        self.step += 1
        batch = hidden.shape[0]
        if self._replaces():
            rows = self._cond_rows(batch)
            args = tuple(slice_rows(a, batch, rows) for a in call.args)
            kwargs = {k: (v if k in UNBATCHED_ARGUMENTS else slice_rows(v, batch, rows))
                      for k, v in call.kwargs.items()}
            call.replace_arguments(args, kwargs)
            self._call = ("half", batch)
        else:
            self._call = ("full", batch)

    def _cond_rows(self, batch: int) -> slice:
        half = batch // 2
        return slice(0, half) if self.guidance.order == "cond_first" else slice(half, batch)

    def after_call(self, call: Call, output: Any) -> Any | None:
        g, self._call = self._call, None
        if g is None or output is None:
            return None
        if call.ctx is not None and call.ctx.num_steps is not None and g[0] in ("cond", "full"):
            self.steps = call.ctx.num_steps
        sample = output_sample(output)
        if sample is None:
            return None
        kind = g[0]
        if kind == "cond":
            self._cond = sample
        elif kind == "uncond":
            self._push(g[1], sample)
        elif kind == "skip":
            u_hat = self.guidance.predict(g[1], self.history, self.step, self.steps)
            self._push(g[1], u_hat)
            self.replaced += 1
            self.replaced_steps.append(self.step)
            return replace_sample(output, u_hat)
        elif kind == "full":
            first, second = sample.chunk(2, dim=0)
            cond, uncond = (first, second) if self.guidance.order == "cond_first" else (second, first)
            self._push(cond, uncond)
        elif kind == "half":
            half = g[1] // 2
            u_hat = self.guidance.predict(sample, self.history, self.step, self.steps)
            self._push(sample, u_hat)
            self.replaced += 1
            self.replaced_steps.append(self.step)
            pair = (sample, u_hat) if self.guidance.order == "cond_first" else (u_hat, sample)
            return map_output(output, lambda t: torch.cat(pair, 0) if t is sample else
                              (torch.cat([t, t], 0) if t.ndim and t.shape[0] == half else t))
        return None

    def stats(self) -> dict[str, Any]:
        return {"guidance": self.guidance.describe(), "guidance_skipped_calls": self.replaced,
                "guidance_switch_step": {}}
