"""One :class:`TinyFamily` record per tiny test family, registered once with :func:`register_family`.

A record says everything the tiny pipelines, the tests and the command line need about a family that
cannot be read from its adapter (``dit_accel.adapters``): how to build the transformer and the pipeline,
the family's call arguments, how classifier-free guidance runs, the diffusers class names (written out
here, independently of the adapters, so the tests check the adapters against them), and what the
conformance suite (``tests/test_conformance.py``) varies between calls. The block lists and the
self-attention submodule come from the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import DiffusionPipeline

__all__ = ["CALIBRATION_PROMPTS", "CFG_LAYOUT", "CFG_LAYOUTS", "TWO_PROMPTS", "TinyFamily", "family_names",
           "get_family", "register_family"]

CFG_LAYOUTS = ("batched", "separate", "none")
CALIBRATION_PROMPTS = ("a photo of a cat", "a red car on a road", "a dog in the snow")
TWO_PROMPTS = ("a photo of a cat", "a photo of a dog")  # the batch change of the text families


@dataclass(frozen=True, eq=False)
class TinyFamily:
    """A tiny random-weight pipeline family.

    Build and call (used by ``tiny_transformer`` / ``tiny_pipeline`` / ``tiny_call_kwargs``):

    * ``transformer()`` builds the diffusers transformer from a tiny config (run under the weight seed);
    * ``pipeline(transformer)`` builds the family's pipeline around it (run under ``seed + 1``);
    * ``call_kwargs()`` returns the family's own call arguments, merged over the common ones (a prompt or
      nothing for ``class_labels`` families, ``output_type="latent"``, 4 steps, a seeded generator).

    Declared facts the tests check: ``transformer_class`` / ``pipeline_class`` (diffusers class names),
    ``cfg_layout`` ("batched": uncond and cond rows stacked in one transformer call per step, guidance
    scale > 1; "separate": one cond and one uncond call per step; "none": one call per step, e.g.
    guidance-distilled Flux) and ``output_shape`` (the output of one default call, batch 1).

    For the conformance suite: ``class_labels`` (conditioned on class labels instead of a prompt),
    ``calibration_prompts`` (strings, or dicts of call arguments), the call changes it supports
    (``resolution``: overrides giving another resolution, None for a fixed one; ``batch``: overrides giving
    two conditions; ``per_prompt_argument``: the pipeline's outputs-per-prompt argument, None when it has
    none), ``attention_size`` (overrides giving several 16-token blocks of visual tokens, for sparse
    attention) and ``conformance`` (True: the suite's full matrix, ~160 cases; False: its light set only —
    off/remove bit-exact, state reset, every caching method once, sparse attention where it applies).

    Coverage families (``tier=2``): every diffusers transformer class beyond tier 1 that builds offline. They
    are left out of ``FAMILIES`` / ``CFG_LAYOUT`` (the tier-1 tests and tools) and listed by
    ``family_names(tier=None)``; ``get_family`` and the builders take any registered family. ``prompt_embeds``
    families are called with seeded random text embeddings instead of a prompt (no text encoder or tokenizer is
    built): their ``call_kwargs`` return the embeddings, and ``batch`` / ``calibration_prompts`` may be
    callables (so that importing the registry imports no torch) returning the mapping / tuple.
    """

    name: str
    transformer_class: str
    pipeline_class: str
    transformer: Callable[[], "torch.nn.Module"]
    pipeline: Callable[["torch.nn.Module"], "DiffusionPipeline"]
    call_kwargs: Callable[[], dict[str, Any]]
    cfg_layout: str
    output_shape: tuple[int, ...]
    class_labels: bool = False
    calibration_prompts: tuple | Callable[[], tuple] = CALIBRATION_PROMPTS
    resolution: Mapping[str, Any] | None = None
    batch: Mapping[str, Any] | Callable[[], Mapping[str, Any]] = field(
        default_factory=lambda: {"prompt": list(TWO_PROMPTS)})
    per_prompt_argument: str | None = None
    attention_size: Mapping[str, Any] = field(default_factory=dict)
    conformance: bool = True
    tier: int = 1
    prompt_embeds: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"family name {self.name!r}: expected an identifier (it names tiny-{self.name})")
        if self.cfg_layout not in CFG_LAYOUTS:
            raise ValueError(f"{self.name}: cfg_layout {self.cfg_layout!r} is not one of {CFG_LAYOUTS}")
        for name in ("transformer", "pipeline", "call_kwargs"):
            if not callable(getattr(self, name)):
                raise ValueError(f"{self.name}: {name} must be callable")
        if self.tier not in (1, 2):
            raise ValueError(f"{self.name}: tier {self.tier!r} is not 1 or 2")
        if self.tier == 2 and self.conformance:
            raise ValueError(f"{self.name}: coverage families (tier 2) run the conformance suite's light set "
                             "(conformance=False)")

    def calibration_inputs(self) -> tuple:
        """``calibration_prompts`` as a tuple (a callable is called)."""
        prompts = self.calibration_prompts
        return tuple(prompts() if callable(prompts) else prompts)

    def changes(self, steps: int = 6) -> dict[str, dict[str, Any]]:
        """Call changes the family supports, name -> call overrides, in this order: other ``steps``,
        other ``resolution``, a ``batch`` of two conditions, several outputs ``per_prompt``."""
        out: dict[str, dict[str, Any]] = {"steps": {"num_inference_steps": steps}}
        if self.resolution is not None:
            out["resolution"] = dict(self.resolution)
        batch = self.batch() if callable(self.batch) else self.batch
        out["batch"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in batch.items()}
        if self.per_prompt_argument is not None:
            out["per_prompt"] = {self.per_prompt_argument: 2}
        return out


_REGISTRY: dict[str, TinyFamily] = {}

# How classifier-free guidance runs in one call made with ``tiny_call_kwargs(family)`` (see
# ``TinyFamily.cfg_layout``) for each family of ``FAMILIES`` (tier 1), kept up to date by ``register_family``.
# Note DiT stacks [cond, uncond] (class labels, then the null class); the others stack [uncond, cond].
CFG_LAYOUT: dict[str, str] = {}


def register_family(family: TinyFamily, *, replace: bool = False) -> TinyFamily:
    """Add a family (``replace=True`` to redefine one); it then shows in ``dit_accel.testing.FAMILIES``."""
    if not isinstance(family, TinyFamily):
        raise TypeError(f"expected a TinyFamily, got {type(family).__name__}")
    if family.name in _REGISTRY and not replace:
        raise ValueError(f"tiny family {family.name!r} is already registered (pass replace=True)")
    _REGISTRY[family.name] = family
    if family.tier == 1:
        CFG_LAYOUT[family.name] = family.cfg_layout
    return family


def family_names(tier: int | None = 1) -> tuple[str, ...]:
    """The registered families of ``tier`` (None: every tier), in registration order."""
    return tuple(name for name, record in _REGISTRY.items() if tier is None or record.tier == tier)


def get_family(name: str) -> TinyFamily:
    """The record of ``name``; a ValueError naming the supported families otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown family {name!r}; supported families: {', '.join(_REGISTRY)}") from None
