"""Compositions where users deploy: caching + ``compile_repeated_blocks`` + FP8 linears, ours beside cache-dit.

A FLUX.1-dev-shaped ``FluxPipeline`` (random weights, bf16, 1024², 28 steps, latent out; text encoders
and VAE left out), every variant in one process: baseline eager and compiled, dit_accel FORA interval 3
compiled (bf16 and with ``quant: {linear: fp8_dynamic}``), and cache-dit 1.5.3's DBCache F1B0 with a
static mask on the same schedule, compiled (bf16 and with torchao FP8 on the same block linears).
Per variant: wall-clock of whole calls after a warm-up call (median and spread), PSNR of the latents
vs the eager baseline, dynamo recompiles after the first call, and one ``torch.profiler`` call:
summed CPU time of the profiled ops (host), summed kernel time (GPU), and the ``Torch-Compiled Region``
entries (how many times compiled code was entered). With compiled blocks, dit_accel decides each
block before its compiled code: a reused step enters no compiled region for its skipped blocks
(``dit_accel.runtime.blocks``).

    python benchmarks/bench_compose.py                # H200: results/compose_flux_h200.{md,json}
    python benchmarks/bench_compose.py --quick        # CPU, tiny FLUX config, seconds (tests run this)

Needs diffusers, torchao (FP8 rows) and cache-dit (peer rows); a missing one skips its rows, said so.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, median_spread, write_results  # noqa: E402

import dit_accel  # noqa: E402

TINY = dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def build(quick: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    device, dtype = ("cpu", torch.float32) if quick else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        tr = FluxTransformer2DModel(**(TINY if quick else {})).to(dtype).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 16 if quick else 512, tr.config.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, generator=g).to(device, dtype)
    res, steps = (64, 6) if quick else (1024, 28)

    def generate():
        with torch.inference_mode():
            return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=res, width=res,
                        num_inference_steps=steps, guidance_scale=3.5, generator=torch.Generator(device).manual_seed(0),
                        output_type="latent").images.float()

    return pipe, tr, generate, steps, device


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compile_blocks(tr, quick: bool) -> None:
    tr.compile_repeated_blocks(fullgraph=True, **({"backend": "eager"} if quick else {}))


def uncompile(tr) -> None:
    torch._dynamo.reset()
    for m in tr.modules():
        if m.__dict__.get("_compiled_call_impl") is not None:
            m._compiled_call_impl = None


def profile_call(generate, device: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        generate()
        sync(device)
    wall = time.perf_counter() - t0
    from torch.autograd import DeviceType

    events = prof.key_averages()
    regions = sum(e.count for e in events if "Torch-Compiled Region" in e.key)
    host = sum(e.self_cpu_time_total for e in events) / 1e6
    # kernel rows only: a CPU row's self device time repeats the kernels it launched (inside a compiled
    # region, the region's row holds every kernel the region launched), so summing every row counts twice
    gpu = sum(e.self_device_time_total for e in events if getattr(e, "device_type", None) == DeviceType.CUDA) / 1e6
    return {"profiled_wall_s": wall, "host_s": host, "gpu_s": gpu, "compiled_region_entries": regions}


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (out - ref).pow(2).mean().clamp_min(1e-20)
    return float(10 * torch.log10(ref.pow(2).max() / mse))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU, tiny FLUX config (a smoke run)")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per variant after the warm-up call")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    args = ap.parse_args(argv)
    quick = args.quick
    pipe, tr, generate, steps, device = build(quick)
    from torch._dynamo.utils import counters

    rows: list[dict] = []
    ref: list[torch.Tensor] = []
    name = "compose_flux_quick" if quick else "compose_flux_h200"

    def report() -> str:
        base = next((r["s"] for r in rows if r["variant"] == "baseline eager" and "s" in r), None)
        lines = [f"# Compositions on a FLUX.1-dev-shaped pipeline ({environment().get('gpu', 'cpu')})", "",
                 f"{'tiny config, CPU' if quick else '1024², 28 steps, bf16, random weights'}; whole-call wall-clock "
                 f"after one warm-up call, median of {args.rounds} (± half the range); host = summed CPU time of the "
                 "profiled ops, GPU = summed kernel time, regions = `Torch-Compiled Region` entries, all of one "
                 "profiled call.", "",
                 "| variant | s / call | vs eager | PSNR dB | host s | GPU s | regions | recompiles | first call s |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "s" not in r:
                lines.append(f"| {r['variant']} | {r.get('error', 'skipped')} | | | | | | | |")
                continue
            speed = f"{base / r['s']:.2f}×" if base else "—"
            lines.append(f"| {r['variant']} | {r['s']:.3f} ± {r['spread_s']:.3f} | {speed} | {r['psnr_db']:.1f} | "
                         f"{r.get('host_s', float('nan')):.2f} | {r.get('gpu_s', float('nan')):.2f} | "
                         f"{r.get('compiled_region_entries', '—')} | {r['recompiles']} | {r['first_call_s']:.1f} |")
        return "\n".join(lines) + "\n"

    def measure(variant: str, setup=None, teardown=None, profiled: bool = True) -> None:
        if args.only and variant not in args.only.split(","):
            return
        print(f"== {variant}", flush=True)
        row = {"variant": variant}
        try:
            t0 = time.perf_counter()
            if setup is not None:
                setup()
            sync(device)
            out = generate()
            sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            counters.clear()
            times = []
            for _ in range(args.rounds):
                sync(device)
                t = time.perf_counter()
                out = generate()
                sync(device)
                times.append(time.perf_counter() - t)
            row["s"], row["spread_s"] = median_spread(times)
            row["all_s"] = times
            row["recompiles"] = int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0
            if profiled:
                row.update(profile_call(generate, device))
            if not ref:
                ref.append(out)
            row["psnr_db"] = psnr(out, ref[0])
            if dit_accel.is_accelerated(pipe):
                s = dit_accel.stats(pipe)
                row["saved_share"] = s.saved_share
                row["compiled_blocks"] = dit_accel.inspect(pipe)["transformer"].compiled_blocks
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

    fora = {"name": "fora3", "cache": {"method": "fora", "interval": 3}}
    fora_fp8 = {**fora, "name": "fora3-fp8", "quant": {"linear": "fp8_dynamic"}}

    def ours(policy):
        def setup():
            dit_accel.accelerate(pipe, policy)
            compile_blocks(tr, quick)

        def teardown():
            dit_accel.remove(pipe)
            uncompile(tr)
        return setup, teardown

    fp8 = not quick and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    measure("baseline eager", profiled=False)
    if fp8:
        measure("dit_accel fora3 + fp8 compiled", *ours(fora_fp8))
    measure("dit_accel fora3 compiled", *ours(fora))
    measure("baseline compiled", lambda: compile_blocks(tr, quick), lambda: uncompile(tr))
    try:  # cache-dit last: its disable_cache leaves patched forwards behind
        import cache_dit
        from cache_dit import DBCacheConfig
    except ImportError as err:
        rows.append({"variant": "cache-dit", "error": f"not installed ({err})"})
        return 0
    mask = [1 if s % 3 == 0 else 0 for s in range(steps)]

    def cache_dit_on():
        cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=0, residual_diff_threshold=0.08,
            enable_separate_cfg=False, num_inference_steps=steps, steps_computation_mask=mask,
            steps_computation_policy="static"))
        compile_blocks(tr, quick)

    def torchao_fp8_on():  # on top of the cache-dit state of the row before, the same block linears as ours
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        uncompile(tr)
        for block in [*tr.transformer_blocks, *tr.single_transformer_blocks]:
            quantize_(block, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        compile_blocks(tr, quick)

    measure("cache-dit DBCache F1B0 static N=3 compiled", cache_dit_on)
    if fp8:
        measure("cache-dit F1B0 static N=3 + torchao fp8 compiled", torchao_fp8_on)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
