"""A second calibration pass: the transformer's outputs, sketched, under a calibrated schedule from the same noise.

ERTACache's timestep adjustment fits a coefficient per reused step from the model outputs of a
pass that computes everything and of a pass under the calibrated schedule along the trajectory
that schedule really follows (:meth:`dit_accel.caching.ertacache.ERTACache.refined`). Both passes
start from the same random state (:class:`RandomState`) and record a fixed random sketch of every
transformer output (:class:`OutputTap`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from ..adapters import TRANSFORMER_COMPONENTS
from ..api import inspect
from ..config import PolicyError
from ..outputs import output_sample


class OutputTap:
    """Records a fixed random sketch of every transformer output of a pipeline call, keyed by (CFG branch,
    step of that branch), through a temporary forward hook on the (first) accelerated transformer."""

    def __init__(self, pipe: Any, sketch_size: int) -> None:
        transformers = [getattr(pipe, name) for name in TRANSFORMER_COMPONENTS
                        if isinstance(getattr(pipe, name, None), torch.nn.Module)]
        if isinstance(pipe, torch.nn.Module):
            transformers = [pipe]
        if not transformers:
            raise PolicyError(f"{type(pipe).__name__} has no transformer to calibrate")
        self.pipe = pipe
        self.transformer = transformers[0]
        self.sketch_size = sketch_size
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self._index: torch.Tensor | None = None
        self.handle = None

    def __enter__(self) -> "OutputTap":
        # registered after accelerate's hooks: it runs after the runtime finished the call
        self.handle = self.transformer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _branch(self) -> str:
        view = inspect(self.pipe)
        runtime = view.runtimes.get("transformer") or next(iter(view.runtimes.values()))
        # the tap runs before the runtime's post-hook when it was registered first (the recording pass)
        call = runtime.current_call or runtime.last_call
        return call[0] if call is not None else "default"

    @torch.no_grad()
    def _hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        sample = output_sample(output)
        if sample is None:
            return
        branch = self._branch()
        step = self.calls[branch]
        self.calls[branch] += 1
        flat = sample.detach().reshape(-1)
        if self._index is None or int(self._index.max()) >= flat.numel() or self._index.device != flat.device:
            g = torch.Generator().manual_seed(0)
            n = min(self.sketch_size, flat.numel())
            self._index = torch.randperm(flat.numel(), generator=g)[:n].to(flat.device) \
                if flat.numel() <= 1 << 24 else torch.randint(flat.numel(), (n,), generator=g).to(flat.device)
        self.outputs[(branch, step)] = flat.index_select(0, self._index).float().cpu()
class RandomState:
    """The global torch RNG and every ``torch.Generator`` among the call arguments, to replay a call's noise."""

    def __init__(self, cpu: torch.Tensor, cuda: list | None, generators: list) -> None:
        self.cpu, self.cuda, self.generators = cpu, cuda, generators

    @classmethod
    def capture(cls, kwargs: dict) -> "RandomState":
        generators = []
        for value in kwargs.values():
            for g in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(g, torch.Generator):
                    generators.append((g, g.get_state()))
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return cls(torch.get_rng_state(), cuda, generators)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        for g, state in self.generators:
            g.set_state(state)
