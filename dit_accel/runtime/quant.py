"""The quantization feature: the blocks' linear layers through torchao (the ``quant:`` policy section)."""

from __future__ import annotations

from typing import Any

from ..quant import LinearQuantConfig, apply_policy_quant, remove_policy_quant
from .feature import Feature, Host


class QuantFeature(Feature):
    """Quantizes the adapter's block linears on attach; ``detach`` puts the original weights back bit-exactly."""

    name = "quant"

    def __init__(self, config: LinearQuantConfig) -> None:
        self.config = config
        self.host: Host | None = None

    def attach(self, host: Host) -> None:
        apply_policy_quant(host.transformer, host.adapter, self.config)
        self.host = host

    def detach(self) -> None:
        if self.host is not None:
            remove_policy_quant(self.host.transformer)
            self.host = None

    def stats(self) -> dict[str, Any]:
        return {"quant": f"{self.config.linear} ({self.config.granularity})"}
