"""TeaCache — Liu et al., 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model".

Before the blocks run, compare the first block's timestep-modulated input with the previous
step's (relative L1), rescale it with a fitted polynomial (the input change is a biased
estimate of the output change), and accumulate. While the accumulator stays under
``threshold`` the whole block stack is skipped and its last residual (output − input) reused;
when it crosses, the stack is computed and the accumulator reset. The first ``warmup_steps``
and the last step are always computed.

Published coefficients (TeaCache repository, degree-4, highest power first) ship for FLUX and
HunyuanVideo on the modulated input, and for Wan 2.1 T2V on the timestep projection ``e0``
that Wan's blocks receive (TeaCache's ``use_ret_steps`` variant, which also computes the first
5 steps). Any other model: ``dit_accel.calibrate`` fits them (``coefficients: null`` falls back
to the identity with a warning). Threshold default 0.25 — TeaCache's FLUX setting for ~1.5×
(0.4 / 0.6 / 0.8 give ~1.8 / 2.0 / 2.25× there).

Departures: the cached residual is kept per CFG branch and per sample batch (as everything
here); the accumulator is one number per branch (pooled over the batch, as in TeaCache).
Calibration fits the polynomial to the change of the block-stack residual rather than of the
final model output (the residual is what gets reused).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import PolicyError, finite_numbers, option
from .base import BlockCall, CacheConfig, CacheMethod, CachePlan, CacheState, register_cache_method, replace_config
from .dbcache import relative_l1
from .records import Records

logger = logging.getLogger("dit_accel")

# (coefficients, teacache input) published by the TeaCache authors, per adapter family.
PUBLISHED: dict[str, tuple[tuple[float, ...], str]] = {
    "flux": ((4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01), "modulated"),
    "hunyuan_video": ((7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02),
                      "modulated"),
    "wan": ((-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
            "timestep_embedding"),  # Wan2.1-T2V-1.3B, ret-steps variant
}


@dataclass(frozen=True)
class TeaCacheConfig(CacheConfig):
    """TeaCache: reuse the stack's residual while the accumulated rescaled input change stays small."""

    threshold: float = option(0.25, ge=0.0, le=100.0, doc="accumulated rescaled relative L1 under which to reuse")
    coefficients: tuple[float, ...] | None = option(
        None, doc="rescaling polynomial, highest power first; null = the family's published one, else identity")
    input: str | None = option(None, choices=("modulated", "timestep_embedding"),
                               doc="what is compared: the modulated first-block input, or the block's timestep "
                                   "embedding argument (Wan); null = the published choice for the family")
    warmup_steps: int = option(1, ge=0, doc="steps always computed at the start")
    compute_last_step: bool = option(True, doc="always compute the last step (needs num_inference_steps)")

    def validate(self) -> None:
        if self.coefficients is not None:
            if isinstance(self.coefficients, (str, bytes)) or not hasattr(self.coefficients, "__iter__"):
                raise PolicyError(f"cache.coefficients: expected a list of numbers, got {self.coefficients!r}")
            coeffs = tuple(self.coefficients)
            if not coeffs or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c == c
                                     for c in coeffs):
                raise PolicyError(f"cache.coefficients: expected a non-empty list of numbers, got {coeffs!r}")
            finite_numbers("cache.coefficients", coeffs)  # an inf coefficient makes every step "changed" (or NaN)
            object.__setattr__(self, "coefficients", tuple(float(c) for c in coeffs))
        super().validate()

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["coefficients"] = None if self.coefficients is None else list(self.coefficients)
        return d


def polyval(coefficients: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """Horner evaluation, highest power first (numpy.polyval order)."""
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + c
    return out


@dataclass(eq=False)
class TeaCacheState(CacheState):
    """Args:
        previous_input: the watched input of the previous call.
        distance: this call's rescaled change (a tensor until the gate reads it).
        accumulated: the change accumulated since the last computed step.
    """

    previous_input: torch.Tensor | None = None
    distance: torch.Tensor | None = None
    accumulated: float = 0.0


@register_cache_method("teacache", TeaCacheConfig)
class TeaCache(CacheMethod):
    State = TeaCacheState
    exact = {"threshold": 0.0}
    reusing = {"threshold": 100.0}

    def __init__(self, config: TeaCacheConfig, blocks, adapter) -> None:
        super().__init__(config, blocks, adapter)
        published_coeffs, published_input = PUBLISHED.get(adapter.family, (None, "modulated"))
        self.input_kind = config.input or published_input
        self.coefficients = config.coefficients or (published_coeffs if config.input in (None, published_input)
                                                    else None)
        if self.coefficients is None:
            logger.warning("dit_accel: no TeaCache coefficients for %s (%s input): using the identity; "
                           "run dit_accel.calibrate for fitted ones", adapter.family, self.input_kind)
            self.coefficients = (1.0, 0.0)
        if self.input_kind == "modulated" and adapter.modulated_input_fn is None:
            raise PolicyError(f"cache.input: the {adapter.family} adapter cannot compute the modulated input; "
                              "use input: timestep_embedding")

    def make_plan(self, num_blocks: int) -> CachePlan:
        return CachePlan(ranges=((0, num_blocks),), watch_inputs=frozenset({0}))

    def teacache_input(self, call: BlockCall) -> torch.Tensor:
        if self.input_kind == "timestep_embedding":
            from ..adapters.base import call_argument

            temb = call_argument(call.block.meta, "temb", call.args, call.kwargs)
            if temb is None:
                raise PolicyError(f"cache.input: {call.block.name} has no 'temb' argument; use input: modulated")
            return temb
        return self.adapter.modulated_input(call.block, call.args, call.kwargs)

    def on_input(self, call: BlockCall, state: TeaCacheState) -> None:
        current = self.teacache_input(call)
        previous, state.previous_input = state.previous_input, current
        if previous is None or previous.shape != current.shape:
            state.distance = None
            return
        change = relative_l1(current, previous, per_sample=False, state=state)
        state.distance = polyval(self.coefficients, change).abs()

    def should_reuse(self, range_id: int, state: TeaCacheState) -> bool:
        c = self.config
        distance, state.distance = state.distance, None
        last = c.compute_last_step and state.num_steps is not None and state.step >= state.num_steps - 1
        if distance is None or state.step < c.warmup_steps or last or range_id not in state.residuals:
            state.accumulated = 0.0
            return False
        accumulated = state.accumulated + float(distance)  # the one host sync per step
        if accumulated < c.threshold:
            state.accumulated = accumulated
            return True
        state.accumulated = 0.0
        return False

    @staticmethod
    def calibrated(config: TeaCacheConfig, records: Records, family: str) -> TeaCacheConfig:
        """Fit the degree-4 rescaling polynomial: residual change ≈ P(input change)."""
        kind = config.input or PUBLISHED.get(family, (None, "modulated"))[1]
        key = "modulated_change" if kind == "modulated" else "temb_change"
        return replace_config(config, coefficients=records.fit_polynomial(key, "residual_change"), input=kind)
