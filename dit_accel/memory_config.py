"""The ``memory:`` policy section: Feature Slicer / Operator Grouping (run by :mod:`dit_accel.runtime.memory`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import ConfigBase, document_options, option

SLICE_UNITS = ("tokens", "frames")


@document_options
@dataclass(frozen=True)
class MemoryConfig(ConfigBase):
    """Run each block's FFN (up projection → activation → down projection) over slices of the token sequence,
    so that its wide intermediate (4× the hidden size in most DiTs, 5.8× in Wan 2.1) never exists for the
    whole sequence at once. Outputs equal the unsliced ones up to rounding (the FFN is token-wise); peak
    activation memory drops, compute stays the same (the slices are large matrix products).
    """

    section: ClassVar[str] = "memory"
    slice_tokens: int = option(8192, ge=1, doc="tokens per slice; a sequence of at most this many tokens runs "
                                               "unsliced")
    slice_by: str = option("tokens", choices=SLICE_UNITS,
                           doc="tokens: slices of slice_tokens tokens; frames: slices of whole frames (as many as "
                               "fit in slice_tokens, at least one), from the call's token grid")
