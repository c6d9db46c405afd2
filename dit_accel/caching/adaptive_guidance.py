"""Adaptive Guidance — AG (Castillo et al., 2023, "Adaptive Guidance: Training-free Acceleration of
Conditional Diffusion Models", arXiv:2312.12487; AAAI 2025).

Classifier-free guidance runs the network twice per step (conditional ``c`` and unconditional ``u``)
and steps along ``g = u + w (c − u)``. The paper observes that as denoising progresses the guided
update becomes aligned with the plain conditional one, so the second evaluation turns redundant.
AG measures, per step, the cosine similarity ``γ_t = cos(c, g)`` and, once it exceeds a threshold
``γ̄``, drops the unconditional evaluation for the rest of the generation (the decision is
sticky): the remaining steps are conditional-only (``g = c``).

Defaults: ``threshold=0.991``, the paper's main setting (see ``docs/methods.md``; sweep it per model:
on the reference model it drops guidance almost at once). ``min_steps=1``: the first step
always runs full CFG (a decision needs one pair of predictions).

Departures: the cosine is taken over the whole transformer output of a sample (including
learned-sigma channels where a model has them); a batch of several samples switches when every
sample's similarity passed the threshold (one batch cannot drop the unconditional half for some
rows only).

This module holds the configuration and the decisions; the runtime (``dit_accel.runtime.guidance``)
does the plumbing and asks the adapter for the CFG layout ("batched": one call on a stacked batch,
"separate": a "cond" call and an "uncond" call per step, named through diffusers'
``cache_context``). Which half of a batched call is the conditional one depends on the pipeline,
not the model: :data:`CFG_ORDER_BY_PIPELINE` lists the pipelines that stack ``[cond, uncond]``
(every other diffusers pipeline we support stacks ``[uncond, cond]``); ``cfg_order`` in the
policy overrides it and is required for a bare transformer with batched CFG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..batching import slice_rows
from ..config import ConfigBase, PolicyError, option
from ..outputs import map_output
from .base import register_guidance_method

CFG_ORDERS = ("uncond_first", "cond_first")

# Pipelines whose batched CFG stacks the conditional rows first; any other pipeline: "uncond_first".
CFG_ORDER_BY_PIPELINE: dict[str, str] = {
    "DiTPipeline": "cond_first",  # class labels, then the null class (diffusers DiTPipeline)
}

# Call arguments that never carry a batch dimension (positions / rotary tables / option dicts).
UNBATCHED_ARGUMENTS = frozenset({"image_rotary_emb", "rotary_emb", "img_ids", "txt_ids", "attention_kwargs",
                                 "joint_attention_kwargs", "cross_attention_kwargs", "return_dict"})

COND, UNCOND = "cond", "uncond"  # the branch names diffusers pipelines give separate CFG calls


@dataclass(frozen=True)
class AdaptiveGuidanceConfig(ConfigBase):
    """Adaptive Guidance: drop the unconditional branch once the guided and conditional predictions agree."""

    section: ClassVar[str] = "guidance"
    method: str = option("adaptive", choices=("adaptive",))
    threshold: float = option(0.991, ge=-1.0, doc="γ̄: drop the unconditional branch once cos(cond, guided) >= it "
                                                  "(> 1: never; -1: right after min_steps)")
    min_steps: int = option(1, ge=1, doc="steps that always run full CFG before the switch may happen")
    cfg_order: str | None = option(None, choices=CFG_ORDERS,
                                   doc="row order of batched CFG; None: from the pipeline class")
    guidance_scale: float | None = option(None, gt=0.0, doc="w of the guided prediction; None: from the pipeline")


def cfg_order_for(pipeline: Any | None, config: AdaptiveGuidanceConfig, cfg_layout: str) -> str | None:
    """Row order of a batched CFG call: the policy's ``cfg_order``, else the pipeline class's."""
    if config.cfg_order is not None:
        return config.cfg_order
    if cfg_layout != "batched":
        return None
    if pipeline is None:
        raise PolicyError("guidance.cfg_order is required for a bare transformer whose CFG is batched: say whether "
                          f"each call stacks the rows as {' or '.join(repr(o) for o in CFG_ORDERS)}")
    for cls in type(pipeline).__mro__:
        if cls.__name__ in CFG_ORDER_BY_PIPELINE:
            return CFG_ORDER_BY_PIPELINE[cls.__name__]
    return "uncond_first"


class AdaptiveGuidance:
    """The AG decisions for one transformer: when to switch, and how to cut / complete a batched call."""

    def __init__(self, config: AdaptiveGuidanceConfig, cfg_layout: str, order: str | None) -> None:
        self.config = config
        self.cfg_layout = cfg_layout
        self.order = order

    def describe(self) -> str:
        c = self.config
        return (f"adaptive_guidance(threshold={c.threshold}, min_steps={c.min_steps}"
                + (f", cfg_order={self.order}" if self.order else "") + ")")

    # ---- decisions ------------------------------------------------------------------------------
    @staticmethod
    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample cosine similarity of two predictions (flattened beyond the batch dimension)."""
        a, b = a.flatten(1).double(), b.flatten(1).double()
        return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)

    def may_switch(self, step: int) -> bool:
        """Whether the check after (guided) step ``step`` may switch: the first ``min_steps`` steps stay guided."""
        return step + 1 >= self.config.min_steps

    def converged(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> bool:
        """γ_t = cos(c, u + w (c − u)) >= γ̄ for every sample of the batch."""
        threshold = self.config.threshold
        if threshold <= -1.0:
            return True
        if threshold > 1.0:
            return False
        guided = uncond + scale * (cond - uncond)
        return bool((self.cosine(cond, guided) >= threshold).all())

    # ---- batched layout -------------------------------------------------------------------------
    def halves(self, batched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) rows of a batched CFG tensor."""
        first, second = batched.chunk(2, dim=0)
        return (first, second) if self.order == "cond_first" else (second, first)

    def cond_rows(self, batch: int) -> slice:
        half = batch // 2
        return slice(0, half) if self.order == "cond_first" else slice(half, batch)

    def slice_call(self, args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
        """The call's arguments for the conditional rows only (every tensor whose dim 0 is ``batch``)."""
        rows = self.cond_rows(batch)
        return (tuple(slice_rows(a, batch, rows) for a in args),
                {k: (v if k in UNBATCHED_ARGUMENTS else slice_rows(v, batch, rows)) for k, v in kwargs.items()})

    @staticmethod
    def complete_output(output: Any, half: int) -> Any:
        """A half-batch output completed to the full batch with the conditional rows in both halves.

        Whatever the row order, ``u + w (c − u)`` of the completed output is exactly ``c``."""
        return map_output(output, lambda t: torch.cat([t, t], 0) if t.ndim and t.shape[0] == half else t)


register_guidance_method("adaptive", AdaptiveGuidanceConfig)
