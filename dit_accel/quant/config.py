"""``LinearQuantConfig``: the ``quant:`` section of a policy (linear layers through torchao)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import ConfigBase, PolicyError, option

#: ``quant.linear`` modes and the torchao config each maps to (see :mod:`dit_accel.quant.linear`).
LINEAR_MODES = ("fp8_dynamic", "int8_dynamic", "int8_weight_only")


@dataclass(frozen=True)
class LinearQuantConfig(ConfigBase):
    """Quantize the linear layers *inside the transformer blocks* with torchao.

    Layers outside the adapter's blocks (patch/time/text embedders, the final norm and
    projection) are never quantized: they are few, cheap and precision-sensitive. ``skip`` adds
    fnmatch patterns over the qualified names under the transformer (e.g.
    ``"*.norm1.linear"`` for adaLN modulation, ``"single_transformer_blocks.37.*"``).

    YAML::

        quant:
          linear: fp8_dynamic        # fp8_dynamic | int8_dynamic | int8_weight_only
          granularity: row           # fp8 scales: row (per-row, torchao's accurate default) | tensor
          skip: ["*.norm1.linear"]   # extra layers to keep in bf16
          keep_originals: cpu        # where the original weights wait for dit_accel.remove: cpu | device
    """

    section: ClassVar[str] = "quant"

    linear: str = option("fp8_dynamic", choices=LINEAR_MODES,
                         doc="fp8_dynamic: FP8 e4m3 weights and per-call activations (Hopper/Ada); int8_dynamic: "
                             "INT8 weights and activations; int8_weight_only: INT8 weights, 16-bit compute")
    granularity: str = option("row", choices=("row", "tensor"), doc="FP8 scale granularity (fp8_dynamic only)")
    skip: tuple = option((), doc="fnmatch patterns of linear layers (names under the transformer) to leave alone")
    keep_originals: str = option("cpu", choices=("cpu", "device"),
                                 doc="keep the original weights on the CPU (frees GPU memory) or on their device")

    def validate(self) -> None:
        skip: Any = self.skip
        if isinstance(skip, str) or not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) for p in skip):
            raise PolicyError(f"quant.skip: expected a list of fnmatch patterns (strings), got {skip!r}")
        object.__setattr__(self, "skip", tuple(skip))
        super().validate()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["skip"] = list(self.skip)
        return d
