"""The sparse-attention seed methods as benchmark variants: one table shared by ``bench_sparse_accuracy.py``
(error vs dense at equal density) and ``bench_sparse_wan.py`` (step time), so both measure the same settings.

Each variant is a function of the asked density returning the ``attention:`` section overrides; ``None`` as
density means the method's own threshold mode. Variants whose budget is not a per-row share (PSA's cumulative
bounds, AdaSpa's recall) report the density they used; compare rows by that column.
"""

from __future__ import annotations

from typing import Callable

Section = dict


def _fixed(method: str, **sparse) -> Callable[[float | None], Section]:
    def make(density: float | None) -> Section:
        s = {"method": method, **sparse}
        if density is not None:
            s["density"] = density
        return {"sparse": s}
    return make


def _with(base: Callable[[float | None], Section], **section) -> Callable[[float | None], Section]:
    def make(density: float | None) -> Section:
        out = base(density)
        for key, value in section.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
        return out
    return make


def _psa(density: float | None) -> Section:
    """PSA's bounds are cumulative score mass, not a share of blocks: the paper's default, or at a fixed
    density its quota mode with the full-resolution share set to the density (the pooled levels come on top)."""
    if density is None:
        return {"sparse": {"method": "psa"}}
    d = density
    return {"sparse": {"method": "psa"}, "psa": {"mode": "quota", "full": d, "pool2": min(1.0, 1.25 * d),
                                                 "pool4": min(1.0, 1.5 * d), "pool8": min(1.0, 2.0 * d),
                                                 "min_full": 0.0}}


XATT = _fixed("xattention")
#: name -> density -> attention-section overrides (block size, warm-up, reorder defaults come from the bench)
SEED_VARIANTS: dict[str, Callable[[float | None], Section]] = {
    "xattention": XATT,
    "xattention+centroid": _with(XATT, compensate="centroid"),
    "xattention+pisa": _with(XATT, compensate="pisa"),
    "xattention+ear": _with(_fixed("xattention", route="error"), compensate="centroid"),
    "xattention+ear+pisa": _with(_fixed("xattention", route="error"), compensate="pisa"),
    "xattention+early_stop": _with(_fixed("xattention", early_stop=0.02)),
    "topp+ear": _with(_fixed("topp", route="error"), compensate="centroid"),
    "proxy": _fixed("proxy", proxy_heads=4),
    "pbs": _with(XATT, reorder="pbs"),
    "adaspa": _fixed("adaspa", refresh_interval=20),
    "psa": _psa,
}
#: variants that must be called twice on the same request (the first call searches, the second is measured)
TWO_CALL = ("adaspa",)


def section(name: str, density: float | None, base: Section) -> Section:
    """``base`` (block size, warm-up, svg2 ...) with the variant's overrides merged in."""
    if name not in SEED_VARIANTS:
        raise SystemExit(f"unknown sparse variant {name!r}; choose from {sorted(SEED_VARIANTS)}")
    out = {**base}
    for key, value in SEED_VARIANTS[name](density).items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out
