"""The ``compile:`` policy section: regional ``torch.compile`` of the transformer's blocks, done by ``accelerate``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import ConfigBase, PolicyError, document_options, option

COMPILE_MODES = ("regional", "none")
TORCH_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@document_options
@dataclass(frozen=True)
class CompileConfig(ConfigBase):
    """Compile every block of the transformer (diffusers' regional compilation, as
    ``compile_repeated_blocks`` does) when the policy is attached; ``remove`` un-compiles what it compiled.

    dit_accel decides each block before its compiled code runs, so skipped blocks enter no compiled
    region and a block's compiled region holds none of dit_accel's code (``fullgraph: true`` works).
    """

    section: ClassVar[str] = "compile"
    mode: str = option("regional", choices=COMPILE_MODES, doc="regional: compile each block; none: leave it")
    fullgraph: bool | None = option(
        None, doc="one graph per block (an error instead of a silent graph break); null: true")
    backend: str = option("inductor", doc="torch.compile backend")
    torch_mode: str = option("default", choices=TORCH_MODES, doc="torch.compile mode")
    dynamic: bool | None = option(None, doc="torch.compile dynamic shapes (null: torch's default)")

    def validate(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise PolicyError(f"compile.backend: expected a backend name, got {self.backend!r}")
        super().validate()

    def resolved_fullgraph(self) -> bool:
        """``fullgraph`` as compiled (null: true; sparse and quantized attention trace as one custom op)."""
        return True if self.fullgraph is None else self.fullgraph

    def options(self) -> dict:
        """Keyword arguments of ``torch.compile``."""
        kwargs = {"fullgraph": self.resolved_fullgraph(), "backend": self.backend,
                  "dynamic": self.dynamic}
        if self.torch_mode != "default":
            kwargs["mode"] = self.torch_mode
        return kwargs
