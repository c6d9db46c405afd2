"""Finite-difference Taylor series of a feature across denoising steps (TaylorSeer, CG-Taylor).

A :class:`Series` keeps, for one feature (a block residual, a block output), the factors
``F[0..k]`` computed at the last ``k + 1`` *nodes* — the steps at which the feature was really
computed — and forecasts the feature at a later step. It is a ``tuple`` of tensors on purpose:
the runtime's state walk counts tuples of tensors, so factors kept in a method's state are
counted in ``dit_accel.stats(...).cache_bytes``.

Two expansions share the storage and cost (``order + 1`` tensors, one subtraction per order on
update, one multiply-add per order on forecast):

``"taylor"`` — TaylorSeer's (Liu et al., 2025, "From Reusing to Forecasting"; the official code's
  ``derivative_approximation`` / ``taylor_formula``, also diffusers' ``TaylorSeerState``): each new factor is the
  backward difference of the previous order divided by the distance to the previous node,
  ``F[i+1] = (F_new[i] − F_old[i]) / (t_n − t_{n−1})``, an estimate of the i+1-th derivative per
  step, and the forecast is the Taylor polynomial ``Σ_i F[i] · x^i / i!`` with ``x`` the steps since
  the last node. Exact for features that are linear in the step; for order ≥ 2 the backward
  differences estimate derivatives at the middle of the node span, not at its end, so a quadratic
  trajectory is *not* reproduced (the error of order 2 on ``t²`` is ``−N·x``, N the node spacing).
``"newton"`` — the same finite differences as true divided differences
  ``F[i+1] = (F_new[i] − F_old[i]) / (t_n − t_{n−1−i})`` and the Newton form
  ``Σ_i F[i] · Π_{j<i} (t − t_{n−j})``: the polynomial through the last ``order + 1`` nodes,
  exact for any trajectory that is a polynomial of degree ≤ order in the step, also across uneven
  node spacing (warm-up steps at distance 1, then every ``interval``). It tends to TaylorSeer's
  expansion as the node spacing goes to zero.

Factors are stored and combined in the feature's dtype (the model dtype), as the reference code
and diffusers' ``TaylorSeerCacheConfig`` (bfloat16 factors) do: no float32 copies of activations.
"""

from __future__ import annotations

import math

import torch

EXPANSIONS = ("taylor", "newton")


class Series(tuple):
    """Taylor factors of one feature (a tuple of tensors, highest order last) and their nodes.

    ``nodes`` are the steps of the last ``len(self)`` updates, most recent first. ``version`` is the
    in-place version counter of ``self[0]`` when it aliases a tensor the model keeps using (None
    when unknown: inference tensors, or factor 0 is a fresh tensor nobody else holds).
    """

    nodes: tuple[int, ...]
    version: int | None

    def __new__(cls, factors, nodes: tuple[int, ...], version: int | None = None) -> "Series":
        series = super().__new__(cls, factors)
        series.nodes = tuple(nodes)
        series.version = version
        return series

    @property
    def order(self) -> int:
        """Highest order available (0 after the first update: a forecast is then plain reuse)."""
        return len(self) - 1

    def map_tensors(self, fn) -> "Series":
        """The same series with ``fn`` applied to every factor (e.g. cutting a batched CFG state to its
        conditional rows); nodes and version are kept (a slice of dim 0 shares the version counter)."""
        return Series([fn(f) for f in self], self.nodes, self.version)

    def intact(self) -> bool:
        """False if factor 0 was modified in place since it was stored (a block wrote into its input)."""
        return self.version is None or self[0]._version == self.version


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


def update(series: Series | None, feature: torch.Tensor, step: int, order: int, expansion: str,
           track_version: bool = False) -> Series:
    """The series after observing ``feature`` at ``step``: new finite differences up to ``order``.

    Orders are built only as far as earlier nodes allow (order 0 after the first update, as in
    the reference). Factors that no longer match the feature's shape or dtype, whose factor 0 was
    modified in place, or whose last node is not before ``step`` (a block run twice in one step,
    a new generation nobody announced) are dropped and the expansion restarts from order 0.
    """
    if expansion not in EXPANSIONS:
        raise ValueError(f"expansion must be one of {EXPANSIONS}, got {expansion!r}")
    factors = [feature]
    usable = (series is not None and len(series) > 0 and series[0].shape == feature.shape
              and series[0].dtype == feature.dtype and series.intact() and step > series.nodes[0])
    if usable:
        for i in range(min(order, len(series))):
            distance = step - (series.nodes[0] if expansion == "taylor" else series.nodes[i])
            factors.append((factors[i] - series[i]) / distance)
        nodes = (step, *series.nodes)[: len(factors)]
    else:
        nodes = (step,)
    return Series(factors, nodes, _version(feature) if track_version else None)


def coefficients(series: Series, step: int, expansion: str) -> list[float]:
    """The weight of each factor in the forecast at ``step``."""
    if expansion == "taylor":
        x = step - series.nodes[0]
        return [x ** i / math.factorial(i) for i in range(len(series))]
    coeffs, product = [], 1.0
    for i in range(len(series)):
        coeffs.append(product)
        product *= step - series.nodes[i]
    return coeffs


def forecast(series: Series, step: int, expansion: str) -> torch.Tensor:
    """The forecast of the feature at ``step`` — always a new tensor, in the factors' dtype."""
    coeffs = coefficients(series, step, expansion)
    out = series[0].clone() if len(series) == 1 else series[0]
    for coeff, factor in zip(coeffs[1:], series[1:]):
        out = torch.add(out, factor, alpha=coeff)
    return out
