"""``dit_accel.inspect``: a read-only snapshot of what is attached to a pipeline and what it holds now.

For tests, notebooks and debugging, so that nothing outside the runtime reads its private state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RuntimeView:
    """One accelerated transformer at the moment of the snapshot.

    ``branches`` maps each (CFG branch, input shape) state of the current generation to the calls it
    made; ``held_bytes`` counts the cached tensors alive now (0 between pipeline calls);
    ``hooked_blocks`` are the gated blocks and ``compiled_blocks`` how many of them run compiled code
    behind their gate; ``current_call`` / ``last_call`` are (branch, step) of the transformer call in
    progress / of the last one that ran.
    """

    component: str
    family: str
    policy: Any
    block_names: tuple[str, ...]
    hooked_blocks: tuple[str, ...]
    compiled_blocks: int
    planned_calls: int | None
    schedule_offset: int
    branches: dict[tuple, int] = field(default_factory=dict)
    held_bytes: int = 0
    clone_inputs: bool = False
    generation_open: bool = False
    last_call: tuple[str, int] | None = None
    current_call: tuple[str, int] | None = None


@dataclass(frozen=True)
class Inspection:
    """Every accelerated transformer of a pipeline (``runtimes`` by component name) and their totals."""

    runtimes: dict[str, RuntimeView]

    @property
    def held_bytes(self) -> int:
        return sum(r.held_bytes for r in self.runtimes.values())

    def __getitem__(self, component: str) -> RuntimeView:
        return self.runtimes[component]
