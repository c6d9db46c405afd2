"""Tiny offline diffusers pipelines of every tier-1 family, for tests, demos and notebooks.

Everything here is built from configs with random weights under a fixed seed: nothing calls
``from_pretrained`` or touches the network, and the same seed gives bit-identical weights and outputs.

    >>> from dit_accel.testing import tiny_pipeline, tiny_call_kwargs
    >>> pipe = tiny_pipeline("flux")
    >>> latents = pipe(**tiny_call_kwargs("flux")).images

Each family is one :class:`TinyFamily` record, registered once in :mod:`dit_accel.testing.families`
(builders, call arguments, CFG layout, class names, what the conformance suite varies); tokenizers, text
encoders and VAEs are in :mod:`dit_accel.testing.components`. ``FAMILIES`` lists the registered names and
``CFG_LAYOUT`` maps each to how classifier-free guidance runs in a tiny call:

* ``"batched"``: uncond and cond rows stacked into one transformer call per step (guidance_scale > 1);
* ``"separate"``: one cond call and one uncond call per step;
* ``"none"``: one cond call per step (Flux is guidance-distilled: the guidance scale is an embedding input,
  not a second pass).

Note DiT stacks [cond, uncond] (class labels, then the null class); the others stack [uncond, cond].

``FAMILIES`` and ``CFG_LAYOUT`` are the tier-1 families. The coverage families (tier 2: Qwen-Image, FLUX.2,
Sana, LTX-Video, Mochi, ... in :mod:`~dit_accel.testing.image_families` / :mod:`~dit_accel.testing.video_families`)
are called with seeded text embeddings instead of prompts; ``family_names(tier=None)`` lists every family and
:mod:`dit_accel.testing.coverage` writes the report of every diffusers transformer class (docs/models.md).
Importing this package imports neither torch nor diffusers (the builders do, when called).
"""

from __future__ import annotations

from typing import Any

from . import families as _families  # noqa: F401  (registers the built-in families)
from . import image_families as _image_families  # noqa: F401  (the image coverage families, tier 2)
from . import video_families as _video_families  # noqa: F401  (the video coverage families, tier 2)
from .build import tiny_call_kwargs, tiny_generate, tiny_pipeline, tiny_transformer
from .components import CLIP_LEN, NEGATIVE_PROMPT, PROMPT, TEXT_LEN
from .components import _seeded, _tokenizer  # noqa: F401  (the names of testing.py, kept)
from .registry import CALIBRATION_PROMPTS, CFG_LAYOUT, TinyFamily, family_names, get_family, register_family

__all__ = ["CALIBRATION_PROMPTS", "CFG_LAYOUT", "CLIP_LEN", "FAMILIES", "NEGATIVE_PROMPT", "PROMPT", "TEXT_LEN",
           "TinyFamily", "family_names", "get_family", "register_family", "tiny_call_kwargs", "tiny_generate",
           "tiny_pipeline", "tiny_transformer"]


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":  # computed on access: a family registered later shows up too
        return family_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
