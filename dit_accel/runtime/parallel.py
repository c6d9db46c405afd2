"""Context parallelism (diffusers' ``enable_parallelism``): one decision on every rank, shards stay local.

diffusers shards a transformer call's sequence across the ranks of a context-parallel mesh
(``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=..., ring_degree=...))``, or
``from_pretrained(..., parallel_config=...)``): hooks of its ``_cp_plan`` split the inputs at the
transformer or at its first block, and the attention backend exchanges what attention needs
(Ulysses: an all-to-all so that each rank holds every token of its own heads; ring: K/V passed
around). We build on that engine and add no parallel runtime of our own:

* **One decision on every rank.** A gate that decides from a statistic of the hidden states (FBCache /
  DBCache, TeaCache, CG-Taylor) sees only its rank's shard. Ranks that decided differently would leave
  the collectives of the computed blocks unmatched and hang. Methods therefore reduce the *sums* their
  statistic is made of (e.g. the two L1 norms of a relative L1) over the context-parallel group before
  deciding — one batched all-reduce per step (:meth:`ShardGroup.sum`), so every rank takes the decision
  the unsharded call would take. Static schedules (FORA, TaylorSeer, Δ-DiT, MagCache, BAC, ERTACache)
  need none. Adaptive Guidance compares transformer outputs, which diffusers gathers before returning.
* **Shards stay local.** Cached residuals and Taylor series are kept per rank for its own shard: a
  reused step needs no communication.
* **Sparse attention under Ulysses** runs per rank on its heads (selection and PARO / SVG2 reordering
  need no communication; calibrated per-head tables are read at the rank's head offset). Under ring
  attention each SDPA call sees one K/V chunk, so the attention feature runs dense there, with a warning.
* **Gates sit inside the split.** Where diffusers splits at a block (Wan: ``blocks.0``), our block gate
  is moved inside its split hook, so that it sees what the block sees (:func:`keep_inside_split`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CP_HOOK_PREFIXES = ("cp_input---", "cp_output---")  # diffusers' context-parallel hook names


@dataclass(frozen=True)
class ShardGroup:
    """The context-parallel group of one transformer (see the module docstring)."""

    group: Any
    world_size: int
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the group's ranks (one all-reduce; every rank gets the same tensor)."""
        out = values.detach().clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return out

    def head_slice(self, heads: int) -> slice:
        """The rank's share of ``heads`` attention heads after Ulysses' all-to-all (all of them otherwise)."""
        if self.ulysses_degree <= 1:
            return slice(0, heads)
        return slice(self.ulysses_rank * heads, (self.ulysses_rank + 1) * heads)


def shard_group(transformer: torch.nn.Module) -> ShardGroup | None:
    """The context-parallel group of ``transformer``, or None when it runs on one process."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or getattr(cp, "_flattened_mesh", None) is None:
        return None
    mesh = cp._flattened_mesh
    world = int(mesh.size())
    if world <= 1:
        return None
    return ShardGroup(group=mesh.get_group(), world_size=world, ulysses_degree=int(cp.ulysses_degree or 1),
                      ring_degree=int(cp.ring_degree or 1),
                      ulysses_rank=int(getattr(cp, "_ulysses_local_rank", 0) or 0))


def splits_text(transformer: torch.nn.Module) -> bool:
    """Whether diffusers' context-parallel plan splits the text tokens (``encoder_hidden_states``) of a call."""
    for module in (transformer, *transformer.children()):
        registry = getattr(module, "_diffusers_hook", None)
        for name in split_hook_names(module):
            if "encoder_hidden_states" in getattr(registry.hooks[name], "metadata", {}):
                return True
    return False


def split_hook_names(module: torch.nn.Module) -> list[str]:
    """The names of diffusers' context-parallel hooks in ``module``'s registry, innermost first."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    return [name for name in registry._hook_order if name.startswith(CP_HOOK_PREFIXES)]


def keep_inside_split(module: torch.nn.Module, name: str) -> None:
    """Put our hook ``name`` inside (innermost of) diffusers' context-parallel hooks on ``module``.

    diffusers wraps a module's forward hook by hook in registration order, the last one outermost. A
    split hook registered before ours (``enable_parallelism`` before ``accelerate``) would run *inside*
    our gate, which would then see the unsplit input the block never sees. Its hooks are taken off and
    put back around ours, unchanged (their ``initialize_hook`` only reads the module's signature)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return
    order = registry._hook_order
    ours = order.index(name)
    inner_cp = [n for n in order[:ours] if n.startswith(CP_HOOK_PREFIXES)]
    if not inner_cp:
        return
    outer = order[order.index(inner_cp[0]):]  # everything from the first split hook outwards, ours included
    hooks = {n: registry.hooks[n] for n in outer}
    for n in reversed(outer):
        registry.remove_hook(n, recurse=False)
    for n in [name, *[n for n in outer if n != name]]:
        registry.register_hook(hooks[n], n)
    last = registry.hooks[registry._hook_order[-1]]
    if hasattr(last, "_dit_accel_forward"):  # ours is outermost now: it wraps the forward as it is
        last._dit_accel_forward = module.forward
