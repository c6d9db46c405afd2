"""Per-call statistics: steps, blocks computed/reused, share of block evaluations saved."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    """What the last pipeline call (generation) did. Block counts are transformer calls × blocks.

    ``num_inference_steps`` is the scheduler's step count; ``planned_calls`` the transformer calls one
    CFG branch was to make (second-order samplers evaluate twice per step, img2img starts part-way):
    what step-indexed schedules are indexed by. Both are None where unknown (custom loops without
    ``dit_accel.reset(model, num_inference_steps=N)``).

    Adaptive Guidance: ``guidance_skipped_calls`` counts unconditional evaluations it saved (a skipped
    "uncond" call, or a batched call run on the conditional half only); ``guidance_switch_step`` maps a
    branch ("uncond" for separate CFG calls, the batched call's branch otherwise) to the first step that
    ran without the unconditional branch. Skipped calls are not in ``calls_per_branch``.
    """

    policy: str
    family: str
    method: str
    block_names: list[str]
    num_inference_steps: int | None
    calls_per_branch: dict[str, int]
    computed: list[int]
    reused: list[int]
    mixed_batch_decisions: int = 0
    cache_bytes: int = 0
    guidance: str = "none"
    guidance_skipped_calls: int = 0
    guidance_switch_step: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    planned_calls: int | None = None

    @property
    def transformer_calls(self) -> int:
        return sum(self.calls_per_branch.values())

    @property
    def blocks_computed(self) -> int:
        return sum(self.computed)

    @property
    def blocks_reused(self) -> int:
        return sum(self.reused)

    @property
    def saved_share(self) -> float:
        """Share of block evaluations skipped (0 = nothing saved)."""
        total = self.blocks_computed + self.blocks_reused
        return self.blocks_reused / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(transformer_calls=self.transformer_calls, blocks_computed=self.blocks_computed,
                 blocks_reused=self.blocks_reused, saved_share=self.saved_share)
        return d

    def summary(self) -> str:
        lines = [f"policy {self.policy} [{self.method}] on {self.family}: {self.transformer_calls} transformer calls "
                 f"({', '.join(f'{k}={v}' for k, v in self.calls_per_branch.items()) or 'none'}), "
                 f"steps={self.num_inference_steps}"
                 + (f" ({self.planned_calls} calls per branch)"
                    if self.planned_calls not in (None, self.num_inference_steps)
                    else ""),
                 f"blocks computed {self.blocks_computed}, reused {self.blocks_reused} "
                 f"({100 * self.saved_share:.1f}% saved), cache {self.cache_bytes / 2**20:.1f} MiB"]
        if self.guidance != "none":
            switched = ", ".join(f"from step {v} ({k})" for k, v in self.guidance_switch_step.items()) or "never"
            lines.append(f"guidance {self.guidance}: unconditional branch dropped {switched}; "
                         f"{self.guidance_skipped_calls} unconditional evaluations skipped")
        attention = self.extra.get("attention")
        if attention:
            calls = attention["calls"]
            density = attention["sparse_density"]
            lines.append(f"attention {attention['method']}: {calls['sparse']} sparse self-attention calls"
                         + (f" at density {density:.3f}" if density is not None else "")
                         + (f", {calls['quant_dense']} quantized dense" if calls.get("quant_dense") else "")
                         + f", {sum(calls.values()) - calls['sparse'] - calls.get('quant_dense', 0)} dense "
                         f"(warm-up {calls['dense_warmup']}, "
                         f"dense layers {calls['dense_layer']}, unhandled {calls['dense_unhandled']}"
                         + (f", dense plan {calls['dense_plan']}" if "dense_plan" in calls else "") + ")")
        if self.mixed_batch_decisions:
            lines.append(f"{self.mixed_batch_decisions} gate decisions where samples disagreed (computed)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
