"""Block-sparse self-attention with token reordering.

Modules, one job each: ``config`` (the policy's ``attention:`` section), ``sparse`` (the reorder → select →
kernel → inverse-permute pipeline, joint text handling),
``reorder_paro`` (PAROAttention axis-order permutations), ``reorder_svg2`` (Sparse VideoGen2 k-means
permutation), ``select`` (XAttention / top-p / static block selection), ``compensate`` (SVG-EAR
centroid compensation). The per-layer processors that route a model's attention here are the
runtime's attention feature (:mod:`dit_accel.runtime.attention`); PARO orders and static masks are
calibrated by :mod:`dit_accel.calibration.attention`.
"""

from .config import AttentionConfig, SparseConfig, SVG2Config
from .sparse import SparseRequest, joint_attention, sparse_self_attention

__all__ = ["AttentionConfig", "SparseConfig", "SVG2Config", "SparseRequest", "joint_attention",
           "sparse_self_attention"]
