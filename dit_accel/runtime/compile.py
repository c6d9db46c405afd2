"""The compile feature: regional ``torch.compile`` of the blocks (the ``compile:`` policy section).

Attach compiles every block that is not compiled yet (``module.compile(...)``, what diffusers'
``compile_repeated_blocks`` does for the repeated block classes); the runtime's gates then sit in
front of each compiled call (:mod:`dit_accel.runtime.blocks`). Detach un-compiles exactly the blocks
it compiled, so a user's own compilation is left as it was.
"""

from __future__ import annotations

from typing import Any

from ..compile_config import CompileConfig
from .feature import Feature, Host


class CompileFeature(Feature):
    """Regional compilation of one transformer's blocks."""

    name = "compile"

    def __init__(self, config: CompileConfig) -> None:
        self.config = config
        self.fullgraph = config.resolved_fullgraph()
        self.compiled: list = []

    def attach(self, host: Host) -> None:
        if self.config.mode == "none":
            return
        options = self.config.options()
        for block in host.blocks:
            module = block.module
            if module.__dict__.get("_compiled_call_impl") is None:
                module.compile(**options)
                self.compiled.append(module)

    def detach(self) -> None:
        for module in self.compiled:
            module.__dict__.pop("_compiled_call_impl", None)
        self.compiled = []

    def stats(self) -> dict[str, Any]:
        return {"compile": f"{self.config.mode} ({self.config.backend}, fullgraph={self.fullgraph})"}
