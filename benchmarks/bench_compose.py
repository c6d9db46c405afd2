"""Compositions where users deploy: caching + sparse attention + regional compile + FP8, ours beside cache-dit.

Two pipelines (random weights, bf16, latent out; text encoders and VAE left out), every variant of one
pipeline in one process:

* ``--model flux``: a FLUX.1-dev-shaped ``FluxPipeline``, 1024², 28 steps. Baseline eager and compiled,
  dit_accel FORA interval 3 compiled (bf16; with ``quant: {linear: fp8_dynamic}``; and that with
  ``mode="reduce-overhead"``, i.e. CUDA graphs per computed block), cache-dit 1.5.3's DBCache F1B0 with a
  static mask on the same schedule, compiled (bf16 and with torchao FP8 on the same block linears).
* ``--model wan``: a Wan2.1-T2V-1.3B-shaped ``WanPipeline``, 480×832×81 (32,760 tokens), UniPC, CFG 5 as
  two transformer calls. Baseline eager and compiled; dit_accel top-p sparse attention at density 0.25
  + FORA interval 2 (2 warm-up steps), eager and compiled, + FP8 linears (attention projections
  quantized, or kept in bf16), + INT8 attention, FP8 alone, the ``wan-fast`` preset (its own compile section);
  cache-dit F1B0 on the same static schedule, compiled, + torchao FP8.

Per variant: wall-clock of whole calls after a warm-up call (median and spread), PSNR of the latents
vs the eager baseline, graph breaks while compiling, dynamo recompiles after the first call, and one
``torch.profiler`` call: summed CPU time of the profiled ops (host), summed kernel time (GPU), the
``Torch-Compiled Region`` entries (how many times compiled code was entered) and, with
``--top-kernels N``, the most expensive kernels. With compiled blocks, dit_accel decides each block
before its compiled code: a reused step enters no compiled region for its skipped blocks
(``dit_accel.runtime.blocks``).

    python benchmarks/bench_compose.py                       # H200: results/compose_flux_h200.{md,json}
    python benchmarks/bench_compose.py --model wan           # H200: results/compose_wan_h200.{md,json}
    python benchmarks/bench_compose.py --quick [--model wan] # CPU, tiny config, seconds (tests run this)

Needs diffusers, torchao (FP8 rows) and cache-dit (peer rows); a missing one skips its rows, said so.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, median_spread, write_results  # noqa: E402

import dit_accel  # noqa: E402

FLUX_TINY = dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=64,
                num_layers=2, rope_max_seq_len=64)


@dataclass
class Bench:
    """One pipeline under test: ``generate()`` runs a whole call and returns the latents as float32."""

    model: str
    pipe: object
    transformer: torch.nn.Module
    generate: Callable[[], torch.Tensor]
    steps: int
    device: str
    blocks: list[torch.nn.Module]
    shape: str


def build_flux(quick: bool, steps: int | None) -> Bench:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    device, dtype = ("cpu", torch.float32) if quick else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        tr = FluxTransformer2DModel(**(FLUX_TINY if quick else {})).to(dtype).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 16 if quick else 512, tr.config.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, generator=g).to(device, dtype)
    res, steps = (64, steps or 6) if quick else (1024, steps or 28)

    def generate():
        with torch.inference_mode():
            return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=res, width=res,
                        num_inference_steps=steps, guidance_scale=3.5, generator=torch.Generator(device).manual_seed(0),
                        output_type="latent").images.float()

    shape = "tiny config, CPU" if quick else f"FLUX.1-dev-shaped, 1024², {steps} steps, guidance-distilled"
    return Bench("flux", pipe, tr, generate, steps, device, [*tr.transformer_blocks, *tr.single_transformer_blocks],
                 shape)


def build_wan(quick: bool, steps: int | None) -> Bench:
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    device, dtype = ("cpu", torch.float32) if quick else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        tr = WanTransformer3DModel(**(WAN_TINY if quick else WAN_1_3B)).to(dtype).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tr, vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    text = (1, 16 if quick else 512, tr.config.text_dim)
    emb, neg = (torch.randn(*text, generator=g).to(device, dtype) for _ in range(2))
    (h, w, f), steps = ((64, 64, 9), steps or 6) if quick else ((480, 832, 81), steps or 50)

    def generate():
        with torch.inference_mode():
            return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=h, width=w, num_frames=f,
                        num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator(device).manual_seed(0),
                        output_type="latent").frames.float()

    shape = ("tiny config, CPU" if quick else
             f"Wan2.1-T2V-1.3B-shaped, 480×832×81 (32,760 tokens), {steps} steps UniPC, CFG 5 as two calls")
    return Bench("wan", pipe, tr, generate, steps, device, list(tr.blocks), shape)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compile_blocks(tr, quick: bool, mode: str | None = None, fullgraph: bool = True) -> None:
    kwargs = {"backend": "eager"} if quick else ({"mode": mode} if mode else {})
    tr.compile_repeated_blocks(fullgraph=fullgraph, **kwargs)


def uncompile(tr) -> None:
    torch._dynamo.reset()
    for m in tr.modules():
        if m.__dict__.get("_compiled_call_impl") is not None:
            m._compiled_call_impl = None


def profile_call(generate, device: str, top: int = 0) -> dict:
    """Host and GPU time of one profiled call; ``top`` > 0 adds the most expensive kernels (diagnosis)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        generate()
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    regions = sum(e.count for e in events if "Torch-Compiled Region" in e.key)
    host = sum(e.self_cpu_time_total for e in events) / 1e6
    # kernel rows only: a CPU row's self device time repeats the kernels it launched (inside a compiled
    # region, the region's row holds every kernel the region launched), so summing every row counts twice
    kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in kernels) / 1e6
    row = {"profiled_wall_s": wall, "host_s": host, "gpu_s": gpu, "compiled_region_entries": regions}
    if top:
        kernels.sort(key=lambda e: -e.self_device_time_total)
        row["top_kernels"] = [(e.key[:90], round(e.self_device_time_total / 1e6, 4), e.count) for e in kernels[:top]]
    return row


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (out - ref).pow(2).mean().clamp_min(1e-20)
    return float(10 * torch.log10(ref.pow(2).max() / mse))


def fp8_available(quick: bool) -> bool:
    return not quick and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def variants(bench: Bench, quick: bool) -> list[tuple[str, Callable | None, Callable | None]]:
    """(name, setup, teardown) per variant, in the order they run; cache-dit rows last (its
    ``disable_cache`` leaves patched forwards behind)."""
    tr, pipe = bench.transformer, bench.pipe
    fp8 = fp8_available(quick)

    def ours(policy: dict | str, compiled: bool = True, mode: str | None = None):
        def setup():
            dit_accel.accelerate(pipe, policy)
            if compiled:
                compile_blocks(tr, quick, mode)

        def teardown():
            dit_accel.remove(pipe)
            uncompile(tr)
        return setup, teardown

    compiled = (lambda: compile_blocks(tr, quick), lambda: uncompile(tr))
    out: list = [("baseline eager", None, None)]
    if bench.model == "flux":
        fora = {"name": "fora3", "cache": {"method": "fora", "interval": 3}}
        fora_fp8 = {**fora, "name": "fora3-fp8", "quant": {"linear": "fp8_dynamic"}}
        if fp8:
            out.append(("dit_accel fora3 + fp8 compiled", *ours(fora_fp8)))
            out.append(("dit_accel fora3 + fp8 compiled + CUDA graphs", *ours(fora_fp8, mode="reduce-overhead")))
        out += [("dit_accel fora3 compiled", *ours(fora)), ("baseline compiled", *compiled)]
        interval = 3
    else:
        sparse = {"sparse": {"method": "topp", "density": 0.25, "refresh_interval": 4},
                  "block_size": 16 if quick else 128}
        fora = {"method": "fora", "interval": 2, "warmup_steps": 2}
        composed = {"name": "sparse25-fora2", "attention": sparse, "cache": fora}
        fp8_all = {"linear": "fp8_dynamic"}
        with_fp8 = {**composed, "name": "sparse25-fora2-fp8", "quant": fp8_all}
        bf16_proj = {**composed, "name": "sparse25-fora2-fp8-bf16proj", "quant": {"linear": "fp8_dynamic",
                                                                                  "skip": ["blocks.*.attn1.*"]}}
        with_int8 = {**with_fp8, "name": "sparse25int8-fora2-fp8", "attention": {**sparse, "quant": "int8"}}
        out += [("dit_accel sparse25 + fora2 eager", *ours(composed, compiled=False)),
                ("dit_accel sparse25 + fora2 compiled", *ours(composed))]
        if fp8:
            out += [("dit_accel sparse25 + fora2 + fp8 compiled", *ours(with_fp8)),
                    ("dit_accel sparse25 + fora2 + fp8 (attention projections bf16) compiled", *ours(bf16_proj)),
                    ("dit_accel sparse25 int8 + fora2 + fp8 compiled", *ours(with_int8)),
                    ("dit_accel fp8 compiled (dense)", *ours({"name": "fp8", "quant": fp8_all})),
                    ("dit_accel wan-fast preset (compile section)", *ours("wan-fast", compiled=False))]
        out.append(("baseline compiled", *compiled))
        interval = 2
    try:
        import cache_dit
        from cache_dit import DBCacheConfig
    except ImportError as err:
        out.append((f"cache-dit: not installed ({err})", None, None))
        return out
    warmup = 0 if bench.model == "flux" else 2
    mask = [1 if s < warmup or (s - warmup) % interval == 0 else 0 for s in range(bench.steps)]

    def cache_dit_on():
        cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=0, residual_diff_threshold=0.08,
            enable_separate_cfg=bench.model == "wan", num_inference_steps=bench.steps, steps_computation_mask=mask,
            steps_computation_policy="static"))
        compile_blocks(tr, quick)

    def torchao_fp8_on():  # on top of the cache-dit state of the row before, the same block linears as ours
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        uncompile(tr)
        for block in bench.blocks:
            quantize_(block, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        compile_blocks(tr, quick)

    out.append((f"cache-dit DBCache F1B0 static N={interval} compiled", cache_dit_on, None))
    if fp8:
        out.append((f"cache-dit F1B0 static N={interval} + torchao fp8 compiled", torchao_fp8_on, None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("flux", "wan"), default="flux")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny config (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: FLUX 28, Wan 50; quick 6)")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per variant after the warm-up call")
    ap.add_argument("--baseline-rounds", type=int, default=None,
                    help="timed calls of the eager baseline (default: --rounds; its calls are the longest)")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--top-kernels", type=int, default=0, help="record the N most expensive kernels per variant")
    ap.add_argument("--name", default=None, help="result file name (default compose_<model>_{h200,quick})")
    args = ap.parse_args(argv)
    quick = args.quick
    bench = (build_flux if args.model == "flux" else build_wan)(quick, args.steps)
    device = bench.device
    from torch._dynamo.utils import counters

    rows: list[dict] = []
    ref: list[torch.Tensor] = []
    name = args.name or f"compose_{args.model}_{'quick' if quick else 'h200'}"

    def report() -> str:
        base = next((r["s"] for r in rows if r["variant"] == "baseline eager" and "s" in r), None)
        lines = [f"# Compositions on a {bench.shape} pipeline ({environment().get('gpu', 'cpu')})", "",
                 f"Random weights, {'float32' if quick else 'bf16'}, latent out; whole-call wall-clock after one "
                 f"warm-up call, median of {args.rounds} (eager baseline: {args.baseline_rounds or args.rounds}; "
                 "± half the range); host = summed CPU time of the profiled "
                 "ops, GPU = summed kernel time, regions = `Torch-Compiled Region` entries, all of one profiled "
                 "call; graph breaks counted by dynamo while compiling (warm-up call).", "",
                 "| variant | s / call | vs eager | PSNR dB | host s | GPU s | regions | graph breaks | recompiles "
                 "| first call s |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "s" not in r:
                lines.append(f"| {r['variant']} | {r.get('error', 'skipped')} | | | | | | | | |")
                continue
            speed = f"{base / r['s']:.2f}×" if base else "—"
            lines.append(f"| {r['variant']} | {r['s']:.3f} ± {r['spread_s']:.3f} | {speed} | {r['psnr_db']:.1f} | "
                         f"{r.get('host_s', float('nan')):.2f} | {r.get('gpu_s', float('nan')):.2f} | "
                         f"{r.get('compiled_region_entries', '—')} | {r['graph_breaks']} | {r['recompiles']} | "
                         f"{r['first_call_s']:.1f} |")
        return "\n".join(lines) + "\n"

    def measure(variant: str, setup=None, teardown=None) -> None:
        if args.only and variant not in args.only.split(","):
            return
        print(f"== {variant}", flush=True)
        row = {"variant": variant}
        if variant.startswith("cache-dit:"):
            rows.append({"variant": "cache-dit", "error": variant.partition(": ")[2]})
            return
        try:
            t0 = time.perf_counter()
            counters.clear()
            if setup is not None:
                setup()
            sync(device)
            out = generate()
            sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            row["graph_breaks"] = int(sum(counters["graph_break"].values())) if "graph_break" in counters else 0
            counters.clear()
            times = []
            rounds = args.baseline_rounds if variant == "baseline eager" and args.baseline_rounds else args.rounds
            for _ in range(rounds):
                sync(device)
                t = time.perf_counter()
                out = generate()
                sync(device)
                times.append(time.perf_counter() - t)
            row["s"], row["spread_s"] = median_spread(times)
            row["all_s"] = times
            row["recompiles"] = int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0
            if variant != "baseline eager":  # the eager baseline is the slowest call: not profiled
                row.update(profile_call(generate, device, args.top_kernels))
            if not ref:
                ref.append(out)
            row["psnr_db"] = psnr(out, ref[0])
            if dit_accel.is_accelerated(bench.pipe):
                s = dit_accel.stats(bench.pipe)
                row["saved_share"] = s.saved_share
                row["compiled_blocks"] = dit_accel.inspect(bench.pipe)["transformer"].compiled_blocks
        except Exception as err:  # noqa: BLE001 - one failed variant must not lose the others
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            traceback.print_exc()
        finally:
            if teardown is not None:
                try:
                    teardown()
                except Exception as err:  # noqa: BLE001
                    row["teardown_error"] = str(err)[:200]
        print(row, flush=True)
        rows.append(row)
        write_results(name, {"env": environment(), "args": vars(args), "rows": rows}, report())

    generate = bench.generate
    for variant, setup, teardown in variants(bench, quick):
        measure(variant, setup, teardown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
