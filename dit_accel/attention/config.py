"""The ``attention:`` section of a policy: block-sparse self-attention with token reordering.

```yaml
attention:
  sparse:
    method: xattention   # xattention | topp | static | adaspa | proxy | psa
    threshold: 0.9       # XAttention / static: cumulative block mass kept per q-block (tau)
    stride: 8            # XAttention: antidiagonal stride
    top_p: 0.9           # topp: cumulative (size-weighted) block probability kept per q-block
    density: null        # optional fixed budget: every q-block keeps this share of kv-blocks (top scores)
    refresh_interval: 1  # re-select every N sparse steps (per layer and CFG branch), reuse in between
    early_stop: null     # S2O-style: walk each row's blocks by score, stop once the rest is < this share of the mass
    proxy_heads: 4       # proxy (method): pooled proxy heads that rank the blocks for all heads (per-head budgets)
    recall: 0.95         # adaspa (method): share of each head's exact attention mass kept; needs refresh_interval > 1
    route: score         # score | error: SVG-EAR error-aware routing of the scored blocks (needs compensate)
  reorder: none          # none | paro | svg2 | pbs
  block_size: 64         # tokens per q-/kv-block of the block table
  warmup_steps: 2        # first steps of every CFG branch run dense
  dense_layers: [0]      # block indices whose self-attention stays dense
  compensate: none       # none | centroid (SVG-EAR: zeroth order) | pisa (PISA: + first order), fused in the kernel
  quant: none            # none | int8 | fp8: quantized attention kernel (dit_accel.kernels.quant_attention)
  quant_tolerance: 0.02  # quant auto: calibrated per-(layer, step) bf16 / int8 / fp8 (quant_plan, see below)
  psa:                   # method psa (pyramid levels per block, dit_accel.attention.pyramid)
    mode: threshold      # threshold (cumulative score mass) | quota (share of the row's blocks by rank)
    full: 0.4            # cumulative bounds: full resolution up to 0.4, 2x pooled to 0.5, 4x to 0.6, 8x to 0.8,
    pool2: 0.5           #   the rest skipped
    pool4: 0.6
    pool8: 0.8
```

Calibrated data lives in the section too: ``paro_orders`` (per layer, per head, one of
:data:`~dit_accel.attention.reorder_paro.ORDERS`), ``sparse.masks`` (static block masks) and ``quant_plan``
(``quant: auto``: a precision per layer and step, :mod:`~dit_accel.attention.adaptive_precision`), all
filled by ``dit_accel.calibrate``. Everything validates like the ``cache`` section: unknown keys,
wrong types and out-of-range values raise :class:`~dit_accel.config.PolicyError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..config import ConfigBase, PolicyError, option, unknown_key_error

METHODS = ("xattention", "topp", "static", "adaspa", "proxy", "psa")
REORDERS = ("none", "paro", "svg2", "pbs")
ROUTES = ("score", "error")
COMPENSATIONS = ("none", "centroid", "pisa")  # dit_accel.kernels.pisa.COMPENSATIONS
BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class SparseConfig(ConfigBase):
    """How kv-blocks are selected per q-block (see :mod:`dit_accel.attention.select`)."""

    section: ClassVar[str] = "attention.sparse"
    method: str = option("xattention", choices=METHODS, doc="block scoring: XAttention antidiagonals, top-p over "
                                                              "pooled/centroid scores, or calibrated static masks")
    threshold: float = option(0.9, gt=0.0, le=1.0, doc="XAttention / static: cumulative block mass kept (tau); "
                                                       "proxy: each head's own pooled-score mass that sets its budget")
    stride: int = option(8, ge=1, doc="XAttention antidiagonal stride")
    top_p: float = option(0.9, gt=0.0, le=1.0, doc="topp: cumulative block probability kept")
    density: float | None = option(None, gt=0.0, le=1.0, doc="fixed share of kv-blocks kept per q-block "
                                                             "(overrides threshold / top_p)")
    masks: dict | None = option(None, doc="static: calibrated block masks {grid, block_size, layers: {i: [hex]}}")
    refresh_interval: int = option(1, ge=1, doc="select blocks (and SVG2 clusters) every N sparse steps per layer "
                                                "and CFG branch; reuse the selection in between")
    early_stop: float | None = option(None, ge=0.0, le=1.0,
                                      doc="S2O-style early stop: each row walks its selected kv-blocks by pooled "
                                          "score, descending, and stops once the remaining blocks' bounded mass is "
                                          "at most this share of the mass so far (0 / null: walk them all; "
                                          "dit_accel.kernels.pisa)")
    proxy_heads: int = option(4, ge=1, doc="proxy: pooled proxy heads (contiguous head groups) whose block scores "
                                           "rank the kv-blocks of all heads; at most the layer's heads "
                                           "(dit_accel.attention.proxy)")
    recall: float = option(0.95, gt=0.0, le=1.0, doc="adaspa: share of each head's exact attention mass kept by "
                                                     "its fewest block pairs (dit_accel.attention.adaspa)")
    route: str = option("score", choices=ROUTES, doc="which blocks to compute exactly: the highest-scoring (score) "
                                                     "or, with compensation, the highest compensation-error-to-cost "
                                                     "ones at the same count (error, SVG-EAR: "
                                                     "dit_accel.attention.routing)")

    def validate(self) -> None:
        super().validate()
        if self.masks is not None:
            m = self.masks
            if not isinstance(m, Mapping) or set(m) != {"grid", "block_size", "layers"}:
                raise PolicyError("attention.sparse.masks: expected {grid: [F, H, W], block_size: n, "
                                  "layers: {index: [hex mask per head]}} (written by dit_accel.calibrate)")
            if not isinstance(m["layers"], Mapping) or not all(
                    isinstance(v, list) and all(isinstance(h, str) for h in v) for v in m["layers"].values()):
                raise PolicyError("attention.sparse.masks.layers: expected {layer index: [hex string per head]}")
            grid = m["grid"]
            if isinstance(grid, (str, bytes)) or not isinstance(grid, (list, tuple)) or not grid or not all(
                    isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid):
                raise PolicyError(f"attention.sparse.masks.grid: expected the token grid [F, H, W] (positive "
                                  f"integers), got {grid!r}")
            if m["block_size"] not in BLOCK_SIZES or isinstance(m["block_size"], bool):
                raise PolicyError(f"attention.sparse.masks.block_size: {m['block_size']!r} is not allowed; choose "
                                  f"one of {list(BLOCK_SIZES)}")
            n = -(-math.prod(grid) // m["block_size"])  # blocks per side of each head's (n, n) mask
            for layer, hexes in m["layers"].items():
                if isinstance(layer, bool) or not (isinstance(layer, int) and layer >= 0
                                                   or isinstance(layer, str) and layer.isdigit()):
                    raise PolicyError(f"attention.sparse.masks.layers: key {layer!r} is not a layer index")
                for h in hexes:
                    if len(h) % 2 or any(c not in string.hexdigits for c in h) or len(h) * 4 < n * n:
                        raise PolicyError(f"attention.sparse.masks.layers[{layer!r}]: expected hex strings of at "
                                          f"least {n * n} bits (a {n}x{n} block mask), got {h[:40]!r}")
        if self.method == "static" and self.density is not None:
            raise PolicyError("attention.sparse.density: not used by method 'static' (its masks are calibrated)")
        if self.method == "psa" and self.density is not None:
            raise PolicyError("attention.sparse.density: not used by method 'psa'; its budget is attention.psa "
                              "(mode: quota gives a fixed share of blocks per level)")
        if self.method == "adaspa" and self.refresh_interval == 1:
            raise PolicyError("attention.sparse.refresh_interval: method 'adaspa' runs a dense pass plus a mass pass "
                              "on every selection (search) step, so it needs refresh_interval > 1 (e.g. 20 at 50 "
                              "steps: two searches) to be faster than dense attention")
        if self.route == "error" and self.method not in ("xattention", "topp"):
            raise PolicyError(f"attention.sparse.route: 'error' re-ranks the blocks of a scored selection "
                              f"(method xattention or topp), not method {self.method!r}")


@dataclass(frozen=True)
class SVG2Config(ConfigBase):
    """Sparse VideoGen2 k-means settings (see :mod:`dit_accel.attention.reorder_svg2`)."""

    section: ClassVar[str] = "attention.svg2"
    q_clusters: int = option(100, ge=1, doc="k-means clusters of the queries per head (SVG2: 100)")
    k_clusters: int = option(500, ge=1, doc="k-means clusters of the keys per head (SVG2: 500)")
    init_iterations: int = option(10, ge=1, doc="k-means iterations at the first sparse step of a generation")
    iterations: int = option(2, ge=1, doc="iterations per later step, warm-started from the last centroids")


PSA_MODES = ("threshold", "quota")
PSA_SCORERS = ("xattention", "pooled")


@dataclass(frozen=True)
class PSAConfig(ConfigBase):
    """Pyramid sparse attention levels (``sparse.method: psa``; see :mod:`dit_accel.attention.pyramid`).

    Per q-block the kv-blocks are ranked by score and cut at the cumulative bounds ``full <= pool2 <= pool4
    <= pool8``: full resolution up to ``full``, 2x / 4x / 8x mean-pooled keys up to the next bounds, the rest
    skipped. Defaults: the PSA paper's balanced Wan2.1-14B configuration."""

    section: ClassVar[str] = "attention.psa"
    mode: str = option("threshold", choices=PSA_MODES, doc="threshold: bounds on the cumulative score mass of the "
                                                           "better-ranked blocks; quota: bounds on the share of "
                                                           "the row's blocks by rank")
    full: float = option(0.4, ge=0.0, le=1.0, doc="cumulative bound up to which blocks are computed at full "
                                                  "resolution")
    pool2: float = option(0.5, ge=0.0, le=1.0, doc="cumulative bound up to which blocks get 2x mean-pooled keys")
    pool4: float = option(0.6, ge=0.0, le=1.0, doc="cumulative bound up to which blocks get 4x mean-pooled keys")
    pool8: float = option(0.8, ge=0.0, le=1.0, doc="cumulative bound up to which blocks get 8x mean-pooled keys; "
                                                   "the rest are skipped")
    min_full: float = option(0.08, ge=0.0, le=1.0, doc="share of each row's blocks always at full resolution "
                                                       "(the best-ranked; the self block is full regardless)")
    scorer: str = option("xattention", choices=PSA_SCORERS, doc="block importance: XAttention antidiagonals "
                                                                "(sparse.stride) or pooled / SVG2-centroid scores")

    def validate(self) -> None:
        super().validate()
        bounds = (self.full, self.pool2, self.pool4, self.pool8)
        if any(a > b for a, b in zip(bounds, bounds[1:])):
            raise PolicyError(f"attention.psa: the bounds must not decrease (full <= pool2 <= pool4 <= pool8), got "
                              f"full={self.full}, pool2={self.pool2}, pool4={self.pool4}, pool8={self.pool8}")


def _sub(cls, value: Any, where: str):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, ConfigBase):
        raise PolicyError(f"{where}: expected a mapping, got {type(value).__name__}")
    return cls.from_dict(value, where=where)


@dataclass(frozen=True)
class AttentionConfig(ConfigBase):
    """Block-sparse self-attention with token reordering (module docstring has the YAML form)."""

    section: ClassVar[str] = "attention"
    sparse: SparseConfig | None = dataclasses.field(default_factory=SparseConfig)
    reorder: str = option("none", choices=REORDERS, doc="token permutation before blocking")
    block_size: int = option(64, choices=BLOCK_SIZES, doc="tokens per block of the block table")
    warmup_steps: int = option(2, ge=0, doc="first steps of each CFG branch computed densely")
    dense_layers: tuple = option((), doc="block indices whose self-attention stays dense")
    compensate: str = option("none", choices=COMPENSATIONS,
                             doc="approximate the skipped blocks: centroid (SVG-EAR, zeroth order) or pisa (PISA: "
                                 "plus the first-order term), fused in the block-sparse kernel "
                                 "(dit_accel.kernels.pisa); true / false mean centroid / none")
    quant: str = option("none", choices=("none", "int8", "fp8", "auto"),
                        doc="run the kept blocks with the SageAttention-style quantized kernel; auto (with "
                            "sparse: null): per layer and step the calibrated quant_plan's choice of bf16 / int8 "
                            "/ fp8 (dit_accel.attention.adaptive_precision)")
    quant_plan: tuple | None = option(None, doc="quant auto: calibrated precision per layer, one code per step "
                                                "(b bf16, i int8, f fp8), filled by dit_accel.calibrate")
    quant_tolerance: float = option(0.02, ge=0.0, doc="quant auto: calibration keeps the cheapest precision whose "
                                                      "mean relative L1 vs the 16-bit attention output is below this")
    svg2: SVG2Config = dataclasses.field(default_factory=SVG2Config)
    psa: PSAConfig = dataclasses.field(default_factory=PSAConfig)
    paro_orders: tuple | None = option(None, doc="calibrated PARO order per layer and head")

    def __post_init__(self) -> None:
        if isinstance(self.compensate, bool):  # policies written before the modes: true / false
            object.__setattr__(self, "compensate", "centroid" if self.compensate else "none")
        object.__setattr__(self, "sparse", _sub(SparseConfig, self.sparse, "attention.sparse"))
        object.__setattr__(self, "svg2", _sub(SVG2Config, self.svg2, "attention.svg2") or SVG2Config())
        object.__setattr__(self, "psa", _sub(PSAConfig, self.psa, "attention.psa") or PSAConfig())
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        layers = self.dense_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise PolicyError("attention.dense_layers: expected a list of block indices (integers >= 0), "
                              f"got {layers!r}")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))
        if self.paro_orders is not None:
            from .reorder_paro import ORDERS

            orders = self.paro_orders
            if not isinstance(orders, (Mapping, list, tuple)):
                raise PolicyError(f"attention.paro_orders: expected one list of orders per layer, got {orders!r}")
            if isinstance(orders, Mapping):
                orders = [orders[k] for k in sorted(orders, key=int)] if all(
                    str(k).isdigit() for k in orders) else orders
            if isinstance(orders, (str, bytes)) or not all(
                    isinstance(heads, (list, tuple)) and all(o in ORDERS for o in heads) for heads in orders):
                raise PolicyError(f"attention.paro_orders: expected one list of orders per layer, each order one of "
                                  f"{list(ORDERS)}")
            object.__setattr__(self, "paro_orders", tuple(tuple(heads) for heads in orders))
        if self.sparse is not None and self.sparse.method == "static" and self.sparse.masks is None:
            pass  # filled by calibrate; checked when attached (needs_calibration)
        if self.quant_plan is not None:
            from .adaptive_precision import normalise_plan

            if self.quant != "auto":
                raise PolicyError(f"attention.quant_plan: used by quant: auto only, not quant: {self.quant!r}")
            object.__setattr__(self, "quant_plan", normalise_plan(self.quant_plan))
        if self.quant == "auto" and self.sparse is not None:
            raise PolicyError("attention.quant: 'auto' chooses the precision of dense attention calls; it needs "
                              "sparse: null (use quant: int8 or fp8 with a sparse section)")
        if self.sparse is not None and self.sparse.method == "psa" and self.quant != "none":
            raise PolicyError(f"attention.quant: method 'psa' runs the pyramid kernel, which has no quantized "
                              f"variant; use quant: none, not {self.quant!r}")
        if self.sparse is not None and self.sparse.method == "proxy" and self.reorder != "none":
            raise PolicyError(f"attention.reorder: method 'proxy' pools heads token by token, which a per-head "
                              f"permutation ({self.reorder!r}) makes meaningless; use reorder: none")
        if self.sparse is not None and self.sparse.route == "error" and self.compensate in (False, "none"):
            raise PolicyError("attention.sparse.route: 'error' routes the blocks that compensation would get "
                              "wrong to the kernel; it needs attention.compensate on")
        if self.sparse is not None and self.sparse.early_stop and (self.quant != "none" or self.sparse.method == "psa"):
            what = f"quant {self.quant!r}" if self.quant != "none" else "method 'psa' (the pyramid kernel)"
            raise PolicyError(f"attention.sparse.early_stop: the early stop lives in the block-sparse kernel; "
                              f"{what} does not run it (use early_stop: null)")

    @property
    def needs_calibration(self) -> list[str]:
        """What ``dit_accel.calibrate`` must still fill before the section can run."""
        missing = []
        if self.reorder == "paro" and self.paro_orders is None:
            missing.append("paro_orders")
        if self.sparse is not None and self.sparse.method == "static" and self.sparse.masks is None:
            missing.append("sparse.masks")
        if self.quant == "auto" and self.quant_plan is None:
            missing.append("quant_plan")
        return missing

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str | None = None) -> "AttentionConfig":
        where = where or cls.section
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PolicyError(f"{where}: expected a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise unknown_key_error(where, key, names)
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["sparse"] = None if self.sparse is None else self.sparse.to_dict()
        d["svg2"] = self.svg2.to_dict()
        d["psa"] = self.psa.to_dict()
        d["dense_layers"] = list(self.dense_layers)
        d["paro_orders"] = None if self.paro_orders is None else [list(h) for h in self.paro_orders]
        d["quant_plan"] = None if self.quant_plan is None else list(self.quant_plan)
        return d

    def replace(self, **changes: Any) -> "AttentionConfig":
        return AttentionConfig.from_dict({**self.to_dict(), **changes})
