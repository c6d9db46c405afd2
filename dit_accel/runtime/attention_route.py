"""How a model's self-attention call reaches the sparse path, traceable by ``torch.compile`` with no graph break.

:class:`RoutedProcessor` replaces the processor of one self-attention module (set with the module's
own ``set_processor``; ``remove`` puts the original object back). It delegates the whole call to the
original processor — projections, q/k norms, RoPE and output projections stay the model's own code
— and, while that call runs, a ``TorchFunctionMode`` (:class:`RouteSDPA`, torch's documented
interception point, active only inside this processor call) replaces the processor's
``scaled_dot_product_attention`` call (direct, or through diffusers' ``dispatch_attention_fn`` native
backend) by one call of the custom op ``dit_accel::routed_attention``. Nothing is patched.

Under ``torch.compile`` dynamo traces the processor, the mode and the original's code like any
other code of the block; the op is one opaque node of the graph (its fake implementation gives the
output's shape and layout). Everything that decides — the denoising step, the CFG branch, which
layer is running (the block gate records it before the block's compiled code is entered), warm-up
and dense layers, block selection, reordering, the kernels — runs inside the op's implementation,
at run time, in eager Python. So the graph is the same for every block, step and branch: a compiled
block compiles once, with ``fullgraph=True``, and its projections and their quantization are fused
as in the dense model. The op finds its :class:`~dit_accel.runtime.attention.AttentionFeature`
through an integer ``route`` (a registry entry made at attach, dropped at detach); a route with no
feature, or a call the feature does not handle, runs the original SDPA call unchanged.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from typing import Any, Optional, Protocol

import torch
from torch.overrides import TorchFunctionMode

from ..kernels.ops import plain_eager

SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class Router(Protocol):
    def attend(self, call: dict[str, Any]) -> torch.Tensor | None:
        """The attention output of one SDPA call (its arguments by name), or None to run it as it is."""


_ROUTES: dict[int, weakref.ReferenceType] = {}
_NEXT = itertools.count(1)


def add_route(router: Router) -> int:
    """A new route id for ``router`` (held weakly)."""
    route = next(_NEXT)
    _ROUTES[route] = weakref.ref(router)
    return route


def drop_route(route: int) -> None:
    _ROUTES.pop(route, None)


def _output_like(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The op's output layout: ``empty_like(query)`` (what the kernels and flash SDPA return, so the
    processor's transpose back is free), or a contiguous tensor when value's head dim differs."""
    if value.shape[-1] == query.shape[-1]:
        return torch.empty_like(query)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def routed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: Optional[torch.Tensor], dropout_p: float, is_causal: bool,
                     scale: Optional[float], enable_gqa: bool, route: int) -> torch.Tensor:
    """One self-attention call: the router's output, else SDPA as the processor called it."""
    ref = _ROUTES.get(route)
    router = ref() if ref is not None else None
    call = {"query": query, "key": key, "value": value, "attn_mask": attn_mask, "dropout_p": dropout_p,
            "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}
    out = router.attend(call) if router is not None else None
    if out is None:
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        out = SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                   **kwargs)
    return out


def routed_attention_impl(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: Optional[torch.Tensor], dropout_p: float, is_causal: bool,
                          scale: Optional[float], enable_gqa: bool, route: int) -> torch.Tensor:
    """The op: :func:`routed_attention` in the layout its fake implementation promises (a copy only when the
    path taken returned another layout)."""
    out = routed_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, route)
    target = _output_like(query, value)
    return out if target.stride() == out.stride() else target.copy_(out)


routed_attention_op = torch.library.custom_op("dit_accel::routed_attention", routed_attention_impl,
                                              mutates_args=())


@routed_attention_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, route):
    return _output_like(query, value)


# The one Tensor method written in Python whose body dynamo cannot trace from inside a mode
# (``super().unflatten``): ``torch.unflatten`` does the same for the arguments processors pass (sizes, not names).
_UNFLATTEN = torch.Tensor.unflatten


class RouteSDPA(TorchFunctionMode):
    """Inside one processor call: every SDPA call becomes one ``dit_accel::routed_attention`` call."""

    route: int = 0  # set on the instance (an __init__ calling super() is not traced by dynamo)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA:
            if func is _UNFLATTEN:
                return torch.unflatten(*args, **kwargs)
            return func(*args, **kwargs)
        bound = dict(zip(_SDPA_ARGS, args))
        bound.update(kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask, dropout_p = bound.get("attn_mask"), bound.get("dropout_p", 0.0)
        is_causal, scale, gqa = bound.get("is_causal", False), bound.get("scale"), bound.get("enable_gqa", False)
        if plain_eager(q, k, v, mask):  # eager: the op's function itself (no dispatcher hop)
            return routed_attention(q, k, v, mask, dropout_p, is_causal, scale, gqa, self.route)
        return routed_attention_op(q, k, v, mask, dropout_p, is_causal, scale, gqa, self.route)


class RoutedProcessor:
    """Wraps one attention module's original processor (see the module docstring); made by :func:`routed`."""

    def __init__(self, original: Any, route: int) -> None:
        self.original = original
        self.route = route

    def __getattr__(self, name: str) -> Any:  # _attention_backend, _parallel_config, ... of the original
        if name in ("original", "route"):
            raise AttributeError(name)
        return getattr(self.original, name)

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        mode = RouteSDPA()
        mode.route = self.route
        with mode:
            return self.original(attn, *args, **kwargs)


_CLASSES: dict[type, type] = {}


def routed(original: Any, route: int) -> RoutedProcessor:
    """A :class:`RoutedProcessor` around ``original`` whose ``__call__`` has the original's signature: diffusers
    filters a processor's call kwargs by it. A class per processor class (an instance-level ``__call__`` would
    not be traced by dynamo)."""
    kind = type(original)
    cls = _CLASSES.get(kind)
    if cls is None:
        def __call__(self, attn, *args, **kwargs):
            return RoutedProcessor.__call__(self, attn, *args, **kwargs)

        try:
            __call__.__signature__ = inspect.signature(kind.__call__)
        except (TypeError, ValueError):
            pass
        cls = _CLASSES[kind] = type(f"Routed{kind.__name__}", (RoutedProcessor,), {"__call__": __call__})
    return cls(original, route)
