"""Hook overhead and fixed-schedule speedup on a full-size FLUX.1-dev-shaped transformer.

Random weights (diffusers ``FluxTransformer2DModel`` default config, 11.9B parameters), bf16,
1024×1024, 28 steps through the real ``FluxPipeline`` loop (no text encoders / VAE; random
prompt embeddings; latent output). Variants run interleaved in rounds so drift hits all alike:

* baseline — untouched pipeline;
* dit_accel none — step hook only;
* baseline + 1 host sync/step — a torch hook syncs after block 0: what any dynamic gate pays;
* dit_accel fbcache thr=0 — gate evaluated every step, never reuses: pure overhead incl. the sync;
* dit_accel fbcache thr=0 gate_lag=1 — the same, the verdict read one block later;
* diffusers FirstBlockCache thr=0 — the peer, same meaning;
* dit_accel fora interval=3 — deterministic schedule, 2/3 of steps reuse every block.

    python benchmarks/bench_flux_hooks.py --rounds 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dit_accel  # noqa: E402
from common import environment, median_spread, time_call, write_results  # noqa: E402


def build_pipeline(resolution: int, layers: int | None, single_layers: int | None):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    kwargs = {}
    if layers is not None:
        kwargs.update(num_layers=layers, num_single_layers=single_layers)
    with torch.device("cuda"):
        torch.manual_seed(0)
        tr = FluxTransformer2DModel(**kwargs).to(torch.bfloat16).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--rounds", type=int, default=5, help="timed calls per variant (interleaved), after one warm-up")
    ap.add_argument("--layers", type=int, default=None, help="smaller model for a quick check (double blocks)")
    ap.add_argument("--single-layers", type=int, default=None)
    args = ap.parse_args()

    from diffusers.hooks import FirstBlockCacheConfig

    pipe = build_pipeline(args.resolution, args.layers, args.single_layers)
    tr = pipe.transformer
    g = torch.Generator("cuda")
    embeds = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g.manual_seed(1))
    pooled = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16, generator=g.manual_seed(2))

    def call():
        with torch.inference_mode():
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=args.resolution,
                        width=args.resolution, num_inference_steps=args.steps, guidance_scale=3.5,
                        generator=torch.Generator("cuda").manual_seed(0), output_type="latent").images

    def with_dit(policy):
        def setup():
            dit_accel.accelerate(pipe, policy)

        def teardown():
            dit_accel.remove(pipe)
        return setup, teardown

    def with_diffusers_fbc():
        def setup():
            tr.enable_cache(FirstBlockCacheConfig(threshold=0.0))

        def teardown():
            tr.disable_cache()
        return setup, teardown

    def with_sync_after_first_block():
        handle = []

        def setup():
            handle.append(tr.transformer_blocks[0].register_forward_hook(lambda *a: torch.cuda.synchronize()))

        def teardown():
            handle.pop().remove()
        return setup, teardown

    variants = {
        "baseline": (lambda: None, lambda: None),
        "baseline + 1 host sync/step (diagnostic)": with_sync_after_first_block(),
        "dit_accel none (step hook only)": with_dit("none"),
        "dit_accel fbcache thr=0": with_dit({"name": "fbcache-thr0", "cache": {"method": "fbcache", "threshold": 0.0}}),
        "dit_accel fbcache thr=0 gate_lag=1": with_dit(
            {"name": "fbcache-thr0-lag1", "cache": {"method": "fbcache", "threshold": 0.0, "gate_lag": 1}}),
        "diffusers FirstBlockCache thr=0": with_diffusers_fbc(),
        "dit_accel fora interval=3": with_dit("fora"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    stats: dict[str, dict] = {}
    reference = None
    for rnd in range(args.rounds + 1):
        for name, (setup, teardown) in variants.items():
            setup()
            try:
                ms = time_call(call)
                out = call() if rnd == 0 else None
                if rnd == 0 and dit_accel.is_accelerated(pipe):
                    stats[name] = dit_accel.stats(pipe).to_dict()
            finally:
                teardown()
            if rnd == 0:
                if name == "baseline":
                    reference = out.float()
                elif out is not None:
                    err = ((out.float() - reference).norm() / reference.norm()).item()
                    stats.setdefault(name, {})["rel_l2_vs_baseline"] = err
                continue  # warm-up round
            times[name].append(ms)
            print(f"round {rnd} {name}: {ms / args.steps:.2f} ms/step", flush=True)

    base_med, _ = median_spread(times["baseline"])
    rows = []
    for name, values in times.items():
        med, spread = median_spread(values)
        s = stats.get(name, {})
        rows.append({"variant": name, "ms_per_step": med / args.steps, "spread_ms_per_step": spread / args.steps,
                     "vs_baseline_pct": 100 * (med / base_med - 1), "speedup": base_med / med,
                     "blocks_saved_pct": 100 * s.get("saved_share", 0.0),
                     "rel_l2_vs_baseline": s.get("rel_l2_vs_baseline", 0.0 if name == "baseline" else None)})
    env = environment()
    md = [f"# FLUX-shaped transformer: hook overhead and FORA speedup ({env.get('gpu', 'cpu')})", "",
          f"{env['date']}, torch {env['torch']}, diffusers {env['diffusers']}, CUDA {env['cuda']}; "
          f"{args.resolution}², {args.steps} steps, bf16, random weights, {args.rounds} interleaved rounds "
          f"(median; ± half range). Command: `{env['command']}`", "",
          "| variant | ms/step | ± | vs baseline | speedup | blocks saved | rel. L2 vs baseline |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "—" if r["rel_l2_vs_baseline"] is None else f"{r['rel_l2_vs_baseline']:.3g}"
        md.append(f"| {r['variant']} | {r['ms_per_step']:.2f} | {r['spread_ms_per_step']:.2f} | "
                  f"{r['vs_baseline_pct']:+.2f}% | {r['speedup']:.3f}× | {r['blocks_saved_pct']:.1f}% | {err} |")
    write_results("flux_hooks", {"env": env, "args": vars(args), "rows": rows, "stats": stats, "times_ms": times},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
