"""Caching, guidance and sparse attention under diffusers' context parallelism (Ulysses), 2 CPU processes.

Each rank runs the same calls; diffusers shards the sequence. Every result must equal the single-process
run of the same policy (to float tolerance), every rank must take the same decisions (the same blocks
reused), in either order of ``enable_parallelism`` and ``accelerate``, and ``remove`` must give the
parallel model back exactly. A gate that decided on its own shard hangs the ranks (mismatched
collectives): that surfaces here as a TimeoutError.
"""

from __future__ import annotations

import pytest
import torch

from dit_accel.testing.distributed import run_on_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

STEPS = 6
FLUX_POLICIES = {
    "none": None,
    "fora": {"cache": {"method": "fora", "interval": 2}},
    "taylorseer": {"cache": {"method": "taylorseer", "interval": 2, "warmup_steps": 1}},
    # gates at thresholds where some steps reuse and others do not (measured on these inputs)
    "fbcache": {"cache": {"method": "fbcache", "threshold": 0.5}},
    "teacache": {"cache": {"method": "teacache", "threshold": 0.1, "coefficients": [1.0, 0.0],
                           "compute_last_step": False}},
    "cg_taylor": {"cache": {"method": "cg_taylor", "threshold": 0.1, "warmup_steps": 2, "final_steps": 0}},
    "sparse": {"attention": {"sparse": {"method": "topp", "density": 0.5}, "block_size": 16, "warmup_steps": 1}},
    "sparse+fora": {"cache": {"method": "fora", "interval": 2},
                    "attention": {"sparse": {"method": "topp", "density": 0.5}, "block_size": 16, "warmup_steps": 1}},
}
WAN_POLICIES = {
    "fbcache": {"cache": {"method": "fbcache", "threshold": 0.3}},
    "guidance+fora": {"cache": {"method": "fora", "interval": 2},
                      "guidance": {"method": "adaptive", "threshold": -1.0, "min_steps": 2}},
}


def _flux_inputs():
    """A call per step whose two sequence halves change at very different rates (their shards' statistics
    differ: per-shard gates would disagree)."""
    g = torch.Generator().manual_seed(0)
    tokens, text = 64, 8  # 8x8 latent tokens: four 16-token blocks for sparse attention
    base, drift = torch.randn(1, tokens, 16, generator=g), torch.randn(1, tokens, 16, generator=g)
    drift[:, : tokens // 2] *= 0.01
    fixed = dict(encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                 pooled_projections=torch.randn(1, 16, generator=g), guidance=torch.tensor([3.5]),
                 img_ids=torch.stack([torch.zeros(tokens), torch.arange(tokens) // 8, torch.arange(tokens) % 8], 1),
                 txt_ids=torch.zeros(text, 3))
    return [dict(hidden_states=base + 0.3 * s * drift, timestep=torch.tensor([1 - s / STEPS]), **fixed)
            for s in range(STEPS)]


def _run_flux(tr) -> tuple[list[torch.Tensor], list[int] | None]:
    import dit_accel

    dit_accel.reset(tr, num_inference_steps=STEPS) if dit_accel.is_accelerated(tr) else None
    with torch.no_grad():
        outs = [tr(return_dict=False, **kw)[0] for kw in _flux_inputs()]
    return outs, (dit_accel.stats(tr).reused if dit_accel.is_accelerated(tr) else None)


def _parallel(tr, world_size: int) -> None:
    from diffusers import ContextParallelConfig

    tr.set_attention_backend("native")
    tr.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def flux_worker(rank: int, world_size: int) -> dict:
    import dit_accel
    from dit_accel.testing import tiny_transformer

    single, out = {}, {}
    tr = tiny_transformer("flux")
    for name, policy in FLUX_POLICIES.items():  # single process first: parallelism cannot be undone
        if policy:
            dit_accel.accelerate(tr, policy)
        single[name] = _run_flux(tr)
        if policy:
            dit_accel.remove(tr)
    _parallel(tr, world_size)
    plain_parallel, _ = _run_flux(tr)
    for name, policy in FLUX_POLICIES.items():  # enable_parallelism, then accelerate
        if policy:
            dit_accel.accelerate(tr, policy)
        outs, reused = _run_flux(tr)
        if policy:
            dit_accel.remove(tr)
        out[name] = {"err": _max_diff(outs, single[name][0]), "reused": reused, "single_reused": single[name][1]}
    after_remove, _ = _run_flux(tr)
    out["remove_exact"] = all(torch.equal(a, b) for a, b in zip(after_remove, plain_parallel))
    other = tiny_transformer("flux")  # accelerate, then enable_parallelism
    dit_accel.accelerate(other, FLUX_POLICIES["fbcache"])
    _parallel(other, world_size)
    outs, reused = _run_flux(other)
    dit_accel.remove(other)
    out["fbcache, accelerate first"] = {"err": _max_diff(outs, single["fbcache"][0]), "reused": reused,
                                        "single_reused": single["fbcache"][1]}
    return out


def _wan(pipe):
    from dit_accel.testing import tiny_call_kwargs

    out = pipe(**tiny_call_kwargs("wan", num_inference_steps=STEPS))
    return out.frames.float()


def wan_worker(rank: int, world_size: int) -> dict:
    import dit_accel
    from dit_accel.testing import tiny_pipeline

    single, out = {}, {}
    pipe = tiny_pipeline("wan")
    for name, policy in WAN_POLICIES.items():
        with dit_accel.accelerated(pipe, policy):
            single[name] = (_wan(pipe), dit_accel.stats(pipe))
    first = tiny_pipeline("wan")  # accelerate, then enable_parallelism (the split hook lands outside the gate)
    dit_accel.accelerate(first, WAN_POLICIES["fbcache"])
    _parallel(first.transformer, world_size)
    got, stats = _wan(first), dit_accel.stats(first)
    dit_accel.remove(first)
    out["fbcache, accelerate first"] = {"err": float((got - single["fbcache"][0]).abs().max()),
                                        "reused": stats.reused, "single_reused": single["fbcache"][1].reused}
    _parallel(pipe.transformer, world_size)  # enable_parallelism, then accelerate (the gate is moved inside)
    for name, policy in WAN_POLICIES.items():
        with dit_accel.accelerated(pipe, policy):
            got, stats = _wan(pipe), dit_accel.stats(pipe)
        ref_out, ref_stats = single[name]
        out[name] = {"err": float((got - ref_out).abs().max()), "reused": stats.reused,
                     "single_reused": ref_stats.reused, "skipped": stats.guidance_skipped_calls,
                     "single_skipped": ref_stats.guidance_skipped_calls}
    return out


def _check(results: list[dict], tolerance: float) -> None:
    rank0, rank1 = results
    for name, r0 in rank0.items():
        if name == "remove_exact":
            assert r0 and rank1[name], "remove did not give the parallel model back exactly"
            continue
        r1 = rank1[name]
        assert r0["reused"] == r1["reused"], f"{name}: the ranks took different decisions: {r0} {r1}"
        assert r0["reused"] == r0["single_reused"], f"{name}: decisions differ from one process: {r0}"
        assert r0.get("skipped") == r0.get("single_skipped"), name
        assert r0["err"] < tolerance and r1["err"] < tolerance, f"{name}: outputs differ from one process: {r0} {r1}"


def test_flux_caching_and_sparse_attention_under_ulysses_equal_one_process():
    results = run_on_ranks(flux_worker, world_size=2, timeout=240)
    _check(results, tolerance=1e-4)
    assert any(sum(r["reused"] or [0]) > 0 for r in results[0].values() if isinstance(r, dict)), "nothing reused"
    assert sum(results[0]["fbcache"]["reused"]) > 0, "the gate must reuse somewhere for the test to mean anything"


def test_wan_pipeline_gate_and_guidance_under_ulysses_equal_one_process():
    results = run_on_ranks(wan_worker, world_size=2, timeout=240)
    _check(results, tolerance=1e-4)
    assert results[0]["guidance+fora"]["skipped"] > 0


def test_ring_attention_runs_sparse_attention_dense_with_a_warning(caplog):
    """Under ring attention each SDPA call sees one K/V chunk: block selection would be wrong, so the
    attention feature runs dense there (one process suffices to check the decision)."""
    import dit_accel
    from dit_accel.context import StepContext
    from dit_accel.runtime.attention import AttentionFeature, AttentionState, local_heads
    from dit_accel.runtime.parallel import ShardGroup

    policy = dit_accel.load_policy(FLUX_POLICIES["sparse"])
    feature = AttentionFeature(policy.attention, num_blocks=4)
    ring = ShardGroup(group=None, world_size=2, ulysses_degree=1, ring_degree=2, ulysses_rank=0)
    ctx = StepContext("default", (1, 64, 16), step=3, shards=ring)
    feature.layout = object()  # any layout: the ring check comes first
    with caplog.at_level("WARNING", logger="dit_accel"):
        assert feature.dense_reason(1, AttentionState(ctx)) == "dense_unhandled"
    assert "ring attention" in caplog.text
    ulysses = ShardGroup(group=None, world_size=2, ulysses_degree=2, ring_degree=1, ulysses_rank=1)
    assert feature.dense_reason(1, AttentionState(StepContext("default", (1, 64, 16), step=3, shards=ulysses))) \
        is None, "Ulysses keeps sparse attention: each rank has whole sequences of its heads"
    assert local_heads(["a", "b", "c", "d"], heads=2, shards=ulysses) == ["c", "d"]  # rank 1 of a 4-head table
    assert local_heads(["a", "b"], heads=2, shards=None) == ["a", "b"]
