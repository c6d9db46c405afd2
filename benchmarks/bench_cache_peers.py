"""Caching policies vs. diffusers' built-in caches and cache-dit at a fixed compute ratio.

A full-size FLUX.1-dev-shaped transformer (diffusers ``FluxTransformer2DModel`` default config,
11.9B parameters, random weights, bf16), 1024×1024, 28 steps, driven by the real ``FluxPipeline``
loop with stub encoders (random prompt embeddings, latent output, no VAE). With random weights a
residual-difference gate never fires at a meaningful threshold, so every variant here runs a
*fixed schedule* of about one computed step in ``--interval`` (3): FORA / TaylorSeer intervals,
gates forced by their own knobs (thresholds that always pass plus a limit on consecutive reuse,
MagCache's ``max_skips``, a constant TeaCache polynomial), calibrated methods given schedules by
hand, diffusers' FirstBlockCache steered by setting its threshold per step, and cache-dit through
its ``steps_computation_mask``. The gates still compute their statistics (and host-sync) every
step: what is measured is the full cost of running each method.

Every variant's *compute share* is measured, identically for all, in an untimed warm-up call:
forward hooks on every ``nn.Linear`` of the transformer add up the multiply-accumulates actually
executed (rows × in × out), divided by the baseline's; the share of transformer blocks that ran
(blocks whose attention ``to_q`` projection was called) is shown beside it. The key number is the
**overhead per step**: measured ms/step − share × baseline ms/step, i.e. what a method costs on
top of the work it does. Variants are timed interleaved in rounds (CUDA events; median over
``--repeats`` rounds after the warm-up round) so drift hits all alike.

    python benchmarks/bench_cache_peers.py --out benchmarks/results      # H200/H100, under 4 minutes
    python benchmarks/bench_cache_peers.py --quick --out /tmp/peers      # tiny model on CPU, seconds

``--quick --depth 19,38 --interval 28`` keeps FLUX's 57 blocks with tiny widths and reuses almost every
step: what remains of each variant's time is mostly host work, i.e. the cost of skipping blocks.

``--profile REGEX`` adds, for the matching variants, one more call under ``torch.profiler``: host time,
summed GPU kernel time, GPU idle time (host − kernels), the synchronising CUDA runtime calls and the
ops that cost the host most — where an overhead comes from, not only how large it is.

cache-dit is optional: when it is not installed (or fails on this machine) its rows say
"skipped: <reason>".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import dit_accel  # noqa: E402

QUICK_CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                    axes_dims_rope=(4, 6, 6))


# ---- setup ----------------------------------------------------------------------------------------
def build_pipeline(quick: bool, device: str, depth: tuple[int, int] | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.device(device):
        torch.manual_seed(0)
        config = dict(QUICK_CONFIG) if quick else {}
        if quick and depth is not None:  # FLUX's real depth with tiny blocks: host cost per skipped block
            config.update(num_layers=depth[0], num_single_layers=depth[1])
        transformer = FluxTransformer2DModel(**config).to(torch.bfloat16).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compute_steps(steps: int, interval: int) -> list[int]:
    """The steps a FORA-style schedule computes: 0, N, 2N, ..."""
    return [s for s in range(steps) if s % interval == 0]


class ComputeCounter:
    """Multiply-accumulates of every ``nn.Linear`` and attention ``to_q`` calls of the blocks (hooks)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.macs = 0
        self.blocks = 0
        self.handles = []
        for module in transformer.modules():
            if isinstance(module, torch.nn.Linear):
                self.handles.append(module.register_forward_hook(self._linear))
        for group in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(transformer, group):
                self.handles.append(block.attn.to_q.register_forward_hook(self._block))

    def _linear(self, module: torch.nn.Linear, args: tuple, output: Any) -> None:
        self.macs += args[0].numel() // module.in_features * module.in_features * module.out_features

    def _block(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.blocks += 1

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@dataclass
class Variant:
    """One timed configuration: ``setup``/``teardown`` attach and detach it; ``on_step`` runs in the
    pipeline's step-end callback (to steer a peer's gate per step)."""

    name: str
    family: str  # "baseline" | "dit_accel" | "diffusers" | "cache-dit"
    schedule: str
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    on_step: Callable[[int], None] = lambda step: None
    pair: tuple[str, ...] = ()  # for a peer: the dit_accel variants it is compared with (same work first)
    skipped: str | None = None
    times_ms: list[float] = field(default_factory=list)
    share: float | None = None
    block_share: float | None = None
    rel_l2: float | None = None


def dit_variant(pipe, name: str, cache: dict, schedule: str) -> Variant:
    policy = {"name": name.replace(" ", "_"), "cache": cache}
    dit_accel.load_policy(policy)  # validate before timing anything
    return Variant(f"dit_accel {name}", "dit_accel", schedule, setup=lambda: dit_accel.accelerate(pipe, policy),
                   teardown=lambda: dit_accel.remove(pipe))


def our_variants(pipe, steps: int, n: int) -> list[Variant]:
    tr = pipe.transformer
    num_blocks = len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
    every = f"compute 1 step in {n}"
    computed = compute_steps(steps, n)
    reused = [s for s in range(steps) if s not in computed]
    ones = [1.0] * steps
    erta_scale = [1.0 if s in computed else 0.99 for s in range(steps)]
    erta_shift = [0.0 if s in computed else 1e-3 for s in range(steps)]
    erta_dt = [1.0 if s in computed else 0.98 for s in range(steps)]
    classes = ["fg" if i % 2 else "bg" for i in range(num_blocks)]
    return [
        dit_variant(pipe, f"fora N={n}", {"method": "fora", "interval": n}, f"{every}, all blocks reused"),
        dit_variant(pipe, f"fora N={n} F1", {"method": "fora", "interval": n, "fn_compute": 1},
                    f"{every}, block 0 always computed, one residual for the rest"),
        dit_variant(pipe, f"fora N={n} F1 per-block", {"method": "fora", "interval": n, "fn_compute": 1,
                                                       "granularity": "block"},
                    f"{every}, block 0 always computed, one residual per block"),
        dit_variant(pipe, "fbcache gate", {"method": "fbcache", "threshold": 10.0, "max_consecutive_reuse": n - 1},
                    f"gate every step (always passes), at most {n - 1} reuses in a row"),
        dit_variant(pipe, "teacache gate", {"method": "teacache", "threshold": 1.0, "coefficients": [1.0 / n + 1e-3],
                                             "warmup_steps": 1, "compute_last_step": False},
                    f"gate every step; constant polynomial 1/{n}: {every}"),
        dit_variant(pipe, f"magcache K={n - 1}", {"method": "magcache", "threshold": 100.0, "max_skips": n - 1,
                                                 "retention_ratio": 0.22, "mag_ratios": {"cond": ones}},
                    f"first 6 steps computed, then at most {n - 1} skips in a row"),
        dit_variant(pipe, f"taylorseer N={n} O1", {"method": "taylorseer", "interval": n, "order": 1,
                                                   "warmup_steps": 1, "granularity": "block"},
                    f"{every}, first-order forecast per block"),
        dit_variant(pipe, f"taylorseer N={n} O1 F1", {"method": "taylorseer", "interval": n, "order": 1,
                                                      "warmup_steps": 1, "fn_compute": 1},
                    f"{every}, block 0 always computed, first-order forecast of the rest"),
        dit_variant(pipe, "cg_taylor gate", {"method": "cg_taylor", "threshold": 10.0, "warmup_steps": 1,
                                             "final_steps": 0, "max_consecutive_forecast": n - 1},
                    f"block 0 every step + its forecast check; at most {n - 1} forecasts in a row"),
        dit_variant(pipe, "delta_dit", {"method": "delta_dit"}, "paper defaults (interval 2, 75% of blocks cached)"),
        dit_variant(pipe, "bac", {"method": "bac", "schedule": {"cond": [computed] * num_blocks},
                                  "calibrated_steps": steps}, f"per-block schedule, {every} for every block"),
        dit_variant(pipe, "ertacache static", {"method": "ertacache", "compute_steps": {"cond": computed},
                                               "scale": {"cond": ones}, "shift": {"cond": [0.0] * steps},
                                               "rectify": False, "timestep_adjust": False},
                    f"{every}; one whole-stack residual, plain reuse (no rectification, no step adjustment)"),
        dit_variant(pipe, "ertacache", {"method": "ertacache", "compute_steps": {"cond": computed},
                                        "scale": {"cond": erta_scale}, "shift": {"cond": erta_shift},
                                        "timestep_adjust": True, "step_scale": {"cond": erta_dt}},
                    f"{every}; rectified residuals and adjusted step size on the {len(reused)} reused steps"),
        dit_variant(pipe, "profiling_dit", {"method": "profiling_dit", "block_classes": classes,
                                            "background_interval": n, "warmup_steps": 1},
                    f"half the blocks 'background' (1 step in {n}), half recomputed every step"),
    ]


def diffusers_variants(pipe, steps: int, n: int) -> list[Variant]:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    tr = pipe.transformer
    computed = set(compute_steps(steps, n))

    def fbc_head():
        return tr.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")

    def fbc_setup():
        tr.enable_cache(FirstBlockCacheConfig(threshold=float("inf")))  # step 0 computes (no residual yet)

    def fbc_step(step: int) -> None:  # the threshold for the next step: -1 computes, inf reuses
        fbc_head().threshold = -1.0 if step + 1 in computed else float("inf")

    blocks_only = [r"^transformer_blocks\.\d+$", r"^single_transformer_blocks\.\d+$"]
    return [
        Variant("diffusers FirstBlockCache", "diffusers", f"gate every step; threshold set per step: compute 1 step "
                f"in {n}", setup=fbc_setup, teardown=tr.disable_cache, on_step=fbc_step,
                pair=("dit_accel fbcache gate",)),
        Variant(f"diffusers TaylorSeerCache N={n} (blocks)", "diffusers", f"compute steps 0, 2, 5, 8, …: "
                f"{len(compute_steps(steps, n))} of {steps}; first-order forecast per block output",
                setup=lambda: tr.enable_cache(TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=1,
                                                                    max_order=1, cache_identifiers=blocks_only)),
                teardown=tr.disable_cache, pair=(f"dit_accel taylorseer N={n} O1",)),
        Variant(f"diffusers MagCache K={n - 1}", "diffusers", f"first 6 steps computed, then at most {n - 1} skips "
                "in a row", setup=lambda: tr.enable_cache(MagCacheConfig(
                    threshold=100.0, max_skip_steps=n - 1, retention_ratio=0.22, num_inference_steps=steps,
                    mag_ratios=torch.ones(steps))), teardown=tr.disable_cache, pair=(f"dit_accel magcache K={n - 1}",)),
    ]


def cache_dit_variants(pipe, steps: int, n: int) -> list[Variant]:
    names = [(f"cache-dit DBCache F1B0 static mask N={n}", (f"dit_accel fora N={n} F1", "dit_accel ertacache static")),
             (f"cache-dit DBCache F1B0 + TaylorSeer O1 static mask N={n}", (f"dit_accel taylorseer N={n} O1 F1",))]
    try:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    except Exception as err:  # noqa: BLE001 — any import failure makes the peer optional
        reason = f"skipped: cache-dit not importable ({type(err).__name__}: {err})"
        return [Variant(name, "cache-dit", "—", pair=pair, skipped=reason) for name, pair in names]
    mask = [1 if s % n == 0 else 0 for s in range(steps)]

    def config() -> Any:
        return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=0, residual_diff_threshold=0.08,
                             enable_separate_cfg=False, num_inference_steps=steps, steps_computation_mask=mask,
                             steps_computation_policy="static")

    modules = list(pipe.transformer.modules())
    saved: list[dict] = []

    def enable(taylor: bool) -> Callable[[], None]:
        def setup() -> None:
            saved[:] = [{id(m): dict(m.__dict__) for m in modules}, {id(m): list(m._modules) for m in modules}]
            calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylor else None
            cache_dit.enable_cache(pipe, cache_config=config(), calibrator_config=calibrator)
        return setup

    def disable() -> None:
        # cache-dit's disable_cache removes its hooks but leaves its patched forwards (transformer and
        # single blocks) and flags in place, and its per-call mock.patch of the block lists re-inserts
        # them, reordering the transformer's children (diffusers' FirstBlockCache then picks a single
        # block as its head block and fails): put the modules' own attributes and child order back so
        # later variants (and the baseline) run the untouched model
        cache_dit.disable_cache(pipe)
        before, order = saved
        for m in modules:
            for key in [k for k in m.__dict__ if k not in before[id(m)]]:
                delattr(m, key)
            if m.__dict__.get("forward") is not before[id(m)].get("forward"):
                if before[id(m)].get("forward") is None:
                    del m.__dict__["forward"]
                else:
                    m.__dict__["forward"] = before[id(m)]["forward"]
            if list(m._modules) != order[id(m)]:
                children = dict(m._modules)
                m._modules.clear()
                m._modules.update((k, children[k]) for k in order[id(m)])

    schedule = f"mask: compute 1 step in {n}, block 0 always computed"
    return [Variant(names[0][0], "cache-dit", schedule, setup=enable(False), teardown=disable, pair=names[0][1]),
            Variant(names[1][0], "cache-dit", schedule + ", first-order forecast of the rest", setup=enable(True),
                    teardown=disable, pair=names[1][1])]


def assert_untouched(transformer: torch.nn.Module, after: str, children: list[str]) -> None:
    """No forward override, hook or reordered child list may outlive a variant (the next one would
    measure it)."""
    if list(transformer._modules) != children:
        raise RuntimeError(f"{after} reordered the transformer's children: {list(transformer._modules)}")
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)  # pipelines' cache_context creates empty ones
        forward = module.__dict__.get("forward")  # diffusers' disable_cache leaves the bound original: fine
        if (forward is not None and getattr(forward, "__func__", None) is not type(module).forward) \
                or (registry is not None and registry.hooks) or module._forward_hooks or module._forward_pre_hooks:
            raise RuntimeError(f"{after} left a forward override or hook on {name or 'transformer'}")


# ---- measurement --------------------------------------------------------------------------------
def environment(device: str) -> dict:
    env = common.environment()
    env["device"] = env.get("gpu", platform.processor() or "cpu") if device == "cuda" else platform.processor() or "cpu"
    try:
        import cache_dit

        env["cache_dit"] = cache_dit.__version__
    except Exception as err:  # noqa: BLE001
        env["cache_dit"] = f"not available ({type(err).__name__})"
    return env


def timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """CUDA events on the GPU (``common.time_call``), the host clock for the CPU smoke run."""
    def host_time(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return common.time_call if device == "cuda" else host_time


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    steps = args.steps or (7 if args.quick else 28)
    resolution = args.resolution or (32 if args.quick else 1024)
    repeats = args.repeats or (2 if args.quick else 3)
    n = args.interval
    depth = tuple(int(x) for x in args.depth.split(",")) if args.depth else None
    pipe = build_pipeline(args.quick, device, depth)
    tr = pipe.transformer
    g = torch.Generator(device)
    text_dim = tr.config.joint_attention_dim
    embeds = torch.randn(1, 8 if args.quick else 512, text_dim, device=device,
                         generator=g.manual_seed(1)).to(torch.bfloat16)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, device=device,
                         generator=g.manual_seed(2)).to(torch.bfloat16)
    current: list[Variant] = []

    def callback(pipeline, step: int, timestep, kwargs: dict) -> dict:
        current[0].on_step(step)
        return kwargs

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=resolution, width=resolution,
                        num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                        generator=torch.Generator(device).manual_seed(0), callback_on_step_end=callback).images

    variants = [Variant("baseline", "baseline", f"all {steps} steps computed")]
    variants += our_variants(pipe, steps, n) + diffusers_variants(pipe, steps, n) + cache_dit_variants(pipe, steps, n)
    if args.only:
        keep = re.compile(args.only)
        variants = [v for v in variants if v.family == "baseline" or keep.search(v.name)]
    time_it = timer(device)
    children = list(tr._modules)
    reference, base_macs, base_blocks = None, None, None
    t_start = time.perf_counter()
    timed_rounds = 0
    for rnd in range(repeats + 1):
        round_start = time.perf_counter()
        for v in variants:
            if v.skipped:
                continue
            current[:] = [v]
            try:
                v.setup()
            except Exception as err:  # noqa: BLE001 — a peer that cannot attach is reported, not fatal
                v.skipped = f"skipped: setup failed ({type(err).__name__}: {err})"
                traceback.print_exc()
                continue
            try:
                if rnd == 0:  # warm-up: also counts the work done and compares the output
                    counter = ComputeCounter(tr)
                    try:
                        out = call().float()
                    finally:
                        counter.close()
                    if v.family == "baseline":
                        reference, base_macs, base_blocks = out, counter.macs, counter.blocks
                    v.share, v.block_share = counter.macs / base_macs, counter.blocks / base_blocks
                    v.rel_l2 = float((out - reference).norm() / reference.norm())
                else:
                    v.times_ms.append(time_it(call))
            except Exception as err:  # noqa: BLE001
                if v.family == "baseline":
                    raise
                v.skipped = f"skipped: failed while running ({type(err).__name__}: {err})"
                traceback.print_exc()
            finally:
                try:
                    v.teardown()
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                assert_untouched(tr, v.name, children)
        now = time.perf_counter()
        timed_rounds += rnd > 0
        print(f"round {rnd} done after {now - t_start:.1f} s", flush=True)
        if rnd >= 2 and rnd < repeats and (now - t_start) + (now - round_start) > args.max_seconds:
            print(f"stopping after {timed_rounds} timed rounds: another would pass --max-seconds "
                  f"{args.max_seconds:.0f}", flush=True)
            break
    profiles = {}
    if args.profile:
        which = re.compile(args.profile)
        for v in variants:
            if not v.skipped and which.search(v.name):
                current[:] = [v]
                profiles[v.name] = profile_variant(v, call, device, steps)
                assert_untouched(tr, v.name, children)
    return {"env": environment(device), "args": {**vars(args), "steps": steps, "resolution": resolution,
                                                  "repeats": timed_rounds, "device": device},
            "variants": variants, "profiles": profiles, "wall_s": time.perf_counter() - t_start}


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "cudaMalloc", "cudaFree", "cudaHostAlloc")


def profile_variant(v: Variant, call: Callable[[], Any], device: str, steps: int) -> dict:
    """One attached call under ``torch.profiler`` (after an unprofiled one): where the time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    v.setup()
    try:
        call()
        sync()
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            call()
            sync()
            host_ms = (time.perf_counter() - t0) * 1e3
    finally:
        v.teardown()
    events = prof.events()
    kernel_us = sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA)
    runtime: dict[str, int] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith(SYNC_CALLS):
            runtime[e.name] = runtime.get(e.name, 0) + 1
    top = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"host_ms_per_step": host_ms / steps, "kernel_ms_per_step": kernel_us / 1e3 / steps,
            "idle_ms_per_step": (host_ms - kernel_us / 1e3) / steps, "runtime_calls": runtime,
            "kernels": sum(1 for e in events if e.device_type == DeviceType.CUDA),
            "top_host_ops": [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                             for e in top]}


# ---- report -------------------------------------------------------------------------------------
def summarise(result: dict) -> dict:
    steps = result["args"]["steps"]
    variants: list[Variant] = result["variants"]
    base = variants[0]
    base_step = statistics.median(base.times_ms) / steps
    rows = []
    for v in variants:
        row = {"variant": v.name, "family": v.family, "schedule": v.schedule, "pair": list(v.pair),
               "skipped": v.skipped}
        if not v.skipped and v.times_ms:
            ms = statistics.median(v.times_ms) / steps
            expected = v.share * base_step
            row.update(ms_per_step=ms, spread_ms_per_step=(max(v.times_ms) - min(v.times_ms)) / 2 / steps,
                       speedup=base_step / ms, compute_share=v.share, block_share=v.block_share,
                       overhead_ms_per_step=ms - expected, overhead_pct_of_step=100 * (ms - expected) / base_step,
                       rel_l2_vs_baseline=v.rel_l2, times_ms=v.times_ms)
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    pairs = []
    for r in rows:
        for i, name in enumerate(r["pair"]):
            ours = by_name.get(name)
            if ours is None:
                continue
            entry = {"peer": r["variant"], "ours": name, "same_work": i == 0}
            if r.get("overhead_ms_per_step") is not None and ours.get("overhead_ms_per_step") is not None:
                entry.update(peer_overhead=r["overhead_ms_per_step"], ours_overhead=ours["overhead_ms_per_step"],
                             ours_minus_peer=ours["overhead_ms_per_step"] - r["overhead_ms_per_step"],
                             peer_ms=r["ms_per_step"], ours_ms=ours["ms_per_step"],
                             peer_share=r["compute_share"], ours_share=ours["compute_share"])
            else:
                entry["note"] = r["skipped"] or ours.get("skipped") or "not measured"
            pairs.append(entry)
    return {"base_ms_per_step": base_step, "rows": rows, "pairs": pairs, "profiles": result.get("profiles", {})}


def markdown(result: dict, summary: dict) -> str:
    env, a = result["env"], result["args"]
    model_size = "full size, 11.9B" if not a["quick"] else (
        f"tiny quick config, {a['depth']} double,single blocks" if a.get("depth") else "tiny quick config")
    lines = [f"# Caching policies vs. diffusers and cache-dit at a fixed compute ratio ({env['device']})", "",
             f"{env['date']}; torch {env['torch']}, diffusers {env['diffusers']}, cache-dit {env['cache_dit']}, "
             f"CUDA {env['cuda']}, Python {env['python']}. FLUX.1-dev-shaped transformer "
             f"({model_size}; random weights, bf16), "
             f"{a['resolution']}², {a['steps']} steps, real `FluxPipeline` loop with stub encoders; "
             f"{a['repeats']} interleaved timed rounds after a warm-up round (median; ± half range); "
             f"benchmark wall time {result['wall_s']:.0f} s. Command: `{env['command']}`", "",
             "*compute share*: multiply-accumulates of all `nn.Linear` layers executed, relative to the baseline "
             "(same hooks for every variant, counted in the untimed warm-up call); *blocks*: share of transformer "
             "blocks whose attention ran. *overhead/step* = ms/step − compute share × baseline ms/step: what a "
             "method costs on top of the work it does. Random weights: the relative L2 error says only that the "
             "schedule ran, nothing about quality.", "",
             "| variant | schedule | ms/step | ± | speedup | compute share | blocks | overhead/step (ms) | "
             "overhead (% of step) | rel. L2 vs baseline |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if r.get("ms_per_step") is None:
            lines.append(f"| {r['variant']} | {r['schedule']} | {r['skipped'] or 'not measured'} | | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['schedule']} | {r['ms_per_step']:.2f} | {r['spread_ms_per_step']:.2f} | "
                     f"{r['speedup']:.3f}× | {r['compute_share']:.3f} | {r['block_share']:.3f} | "
                     f"{r['overhead_ms_per_step']:+.2f} | {r['overhead_pct_of_step']:+.2f}% | "
                     f"{r['rel_l2_vs_baseline']:.3g} |")
    lines += ["", "## Overhead per step, ours vs. each peer", "",
              "The first row of each peer is our variant doing the same work (equal compute share); a second row "
              "compares a different mechanism at the same schedule (overheads are share-normalised).", "",
              "| peer | ours | peer overhead (ms/step) | ours (ms/step) | ours − peer | compute share peer / ours |",
              "|---|---|---|---|---|---|"]
    for p in summary["pairs"]:
        if "ours_minus_peer" not in p:
            lines.append(f"| {p['peer']} | {p['ours']} | {p['note']} | | | |")
            continue
        lines.append(f"| {p['peer']} | {p['ours']} | {p['peer_overhead']:+.2f} | {p['ours_overhead']:+.2f} | "
                     f"{p['ours_minus_peer']:+.2f} | {p['peer_share']:.3f} / {p['ours_share']:.3f} |")
    if summary.get("profiles"):
        lines += ["", "## Profiles (one more call each, under `torch.profiler`; its own overhead inflates host time)",
                  "",
                  "*idle* = host time − summed kernel time: the GPU waiting for the host.", "",
                  "| variant | host ms/step | kernel ms/step | idle ms/step | kernels | sync-type runtime calls | "
                  "top host ops (self ms) |", "|---|---|---|---|---|---|---|"]
        for name, p in summary["profiles"].items():
            calls = ", ".join(f"{k} {n}" for k, n in sorted(p["runtime_calls"].items())) or "none"
            ops = ", ".join(f"{o['name']} {o['self_cpu_ms']:.0f}" for o in p["top_host_ops"][:5])
            lines.append(f"| {name} | {p['host_ms_per_step']:.2f} | {p['kernel_ms_per_step']:.2f} | "
                         f"{p['idle_ms_per_step']:.2f} | {p['kernels']} | {calls} | {ops} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for cache_peers.json / .md (default: $OUT, else benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="tiny FLUX config on CPU: a smoke test in seconds")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; 7 with --quick)")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default 1024; 32 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 3; 2 quick)")
    ap.add_argument("--interval", type=int, default=3, help="one computed step in N for every schedule")
    ap.add_argument("--max-seconds", type=float, default=200.0,
                    help="stop timing further rounds (after at least 2) once another would end past this many "
                         "seconds of benchmark time (model build and imports not counted)")
    ap.add_argument("--depth", default=None,
                    help="with --quick: DOUBLE,SINGLE block counts (19,38 is FLUX's depth; default 2,4)")
    ap.add_argument("--profile", default=None,
                    help="regex: profile one more call of the matching variants (torch.profiler; slow on CPU)")
    ap.add_argument("--only", default=None, help="regex: time only the variants whose name matches (+ baseline)")
    args = ap.parse_args(argv)
    result = run(args)
    summary = summarise(result)
    md = markdown(result, summary)
    out = args.out or Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    name = "cache_peers_quick" if args.quick else "cache_peers"
    args_out = {k: str(v) if isinstance(v, Path) else v for k, v in result["args"].items()}
    payload = {"env": result["env"], "args": args_out, "wall_s": result["wall_s"], **summary}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
