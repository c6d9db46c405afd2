"""Block-sparse self-attention with token reordering (issue #5).

Modules, one job each: ``config`` (the policy's ``attention:`` section), ``processor`` (per-layer
attention processors and the controller that knows layer, step, branch and token layout),
``sparse`` (the reorder → select → kernel → inverse-permute pipeline, joint text handling),
``reorder_paro`` (PAROAttention axis-order permutations), ``reorder_svg2`` (Sparse VideoGen2 k-means
permutation), ``select`` (XAttention / top-p / static block selection), ``compensate`` (SVG-EAR
centroid compensation), ``calibrate`` (PARO orders and static masks from sampled attention maps).
"""

from .config import AttentionConfig, SparseConfig, SVG2Config
from .sparse import SparseRequest, joint_attention, sparse_self_attention

__all__ = ["AttentionConfig", "SparseConfig", "SVG2Config", "SparseRequest", "joint_attention",
           "sparse_self_attention"]
