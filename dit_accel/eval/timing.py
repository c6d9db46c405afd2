"""Latency: end-to-end and transformer time per call, interleaved across variants, plus peak memory.

On CUDA every call is bracketed by ``torch.cuda.synchronize()`` and timed with CUDA events; the
transformer's forward calls are timed with events recorded by forward pre/post hooks (their sum is the
transformer time of the call; divided by the steps it is the per-step latency). On CPU the host clock
(``time.perf_counter``) is used. Variants run in interleaved rounds — round r calls every variant once —
so drift (clocks, thermals, other load) hits all variants alike; the first ``warmup`` rounds are not
recorded. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed calls (None on CPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass
class Timing:
    e2e_ms: list[float] = field(default_factory=list)
    transformer_ms: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None

    def summary(self, steps: int) -> dict[str, Any]:
        med, spread = median_spread(self.e2e_ms)
        tmed, _ = median_spread(self.transformer_ms)
        return {"e2e_ms": med, "e2e_ms_spread": spread, "e2e_ms_all": list(self.e2e_ms),
                "transformer_ms_per_step": tmed / steps, "peak_memory_gib": None if self.peak_memory_bytes is None
                else self.peak_memory_bytes / 2**30}


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """Median and half the min–max range."""
    return statistics.median(values), (max(values) - min(values)) / 2


class _Clock:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


class CallTimer:
    """Times one call end to end and the forward calls of ``modules`` inside it."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.modules = list(modules)
        self.cuda = device.type == "cuda"
        self.clock = _Clock(self.cuda)

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float, int | None]:
        marks: list[tuple[Any, Any]] = []
        handles = []
        for m in self.modules:
            handles.append(m.register_forward_pre_hook(lambda *_: marks.append((self.clock.mark(), None))))
            handles.append(m.register_forward_hook(lambda *_: marks.append((marks.pop()[0], self.clock.mark()))))
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            start = self.clock.mark()
            fn()
            end = self.clock.mark()
            if self.cuda:
                torch.cuda.synchronize()
        finally:
            for h in handles:
                h.remove()
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        inner = sum(self.clock.elapsed_ms(a, b) for a, b in marks if b is not None)
        return self.clock.elapsed_ms(start, end), inner, peak


def interleaved(variants: dict[str, tuple[Callable[[], None], Callable[[int], Any], Callable[[], None]]],
                timer: CallTimer, warmup: int, repeats: int,
                progress: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """``variants``: label -> (setup, call(round), teardown). Returns the recorded timings per label."""
    out = {label: Timing() for label in variants}
    for rnd in range(warmup + repeats):
        for label, (setup, call, teardown) in variants.items():
            setup()
            try:
                ms, inner, peak = timer(lambda: call(rnd))
            finally:
                teardown()
            if rnd < warmup:
                continue
            t = out[label]
            t.e2e_ms.append(ms)
            t.transformer_ms.append(inner)
            if peak is not None:
                t.peak_memory_bytes = max(peak, t.peak_memory_bytes or 0)
            if progress:
                progress(label)
    return out
