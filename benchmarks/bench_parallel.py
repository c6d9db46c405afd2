"""Context parallel + caching + sparse attention on several GPUs, ours beside cache-dit's context parallel.

Run with ``torchrun --nproc-per-node N benchmarks/bench_parallel.py`` (N = 2 or 4; Ulysses over all ranks,
``--ring`` for ring attention over 2). A Wan2.1-1.3B-shaped ``WanPipeline`` (random weights, bf16,
480×832, 81 frames, CFG as separate calls, 50 steps unless ``--steps``): per variant, rank 0 first runs the
policy on one GPU (the reference), then all ranks run it context-parallel; wall-clock per generation
(median of ``--rounds`` after a warm-up call), PSNR of the parallel latents vs the one-GPU run, and whether
every rank reused the same blocks (gathered from each rank's ``dit_accel.stats``). Scaling efficiency =
one-GPU time / (N · parallel time).

    python benchmarks/bench_parallel.py --quick     # 2 CPU processes, tiny Wan: the logic in seconds

Writes ``bench_parallel_{quick,h200xN}.{md,json}`` under $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, write_results  # noqa: E402

VARIANTS = {
    "dense": None,
    "fora2": {"cache": {"method": "fora", "interval": 2}},
    "fbcache": {"cache": {"method": "fbcache", "threshold": 0.08}},
    "fora2 + sparse 25%": {"cache": {"method": "fora", "interval": 2},
                           "attention": {"sparse": {"method": "topp", "density": 0.25}, "warmup_steps": 2}},
}


def build(quick: bool, device: str):
    if quick:
        from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

        pipe = tiny_pipeline("wan")
        return pipe, lambda: pipe(**tiny_call_kwargs("wan", num_inference_steps=6)).frames.float()  # fresh seed
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                   in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                   num_layers=30, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)
        tr = tr.to(torch.bfloat16).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan(), transformer=tr,
                       scheduler=UniPCMultistepScheduler(flow_shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16)
    neg = torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16)

    def generate():
        with torch.inference_mode():
            return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=480, width=832, num_frames=81,
                        num_inference_steps=ARGS.steps, guidance_scale=5.0, output_type="latent",
                        generator=torch.Generator(device).manual_seed(0)).frames.float()
    return pipe, generate


def timed(generate, device: str, rounds: int) -> tuple[torch.Tensor, list[float]]:
    out = generate()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, times


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (out - ref).pow(2).mean().clamp_min(1e-20)
    return float(10 * torch.log10(ref.pow(2).max() / mse))


def worker(rank: int, world: int, quick: bool, rounds: int, ring: bool) -> list[dict]:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import dit_accel

    device = "cpu" if quick else "cuda"
    if not quick:
        torch.cuda.set_device(rank)
    pipe, generate = build(quick, device)
    rows, single = [], {}
    for name, policy in VARIANTS.items():  # one-GPU references first (parallelism cannot be undone)
        if rank == 0:
            with dit_accel.accelerated(pipe, policy) if policy else _null():
                out, times = timed(generate, device, rounds)
                reused = dit_accel.stats(pipe).reused if policy else None
            single[name] = (out, statistics.median(times), reused)
        dist.barrier()
    cp = ContextParallelConfig(ring_degree=world) if ring else ContextParallelConfig(ulysses_degree=world)
    if quick:
        pipe.transformer.set_attention_backend("native")
    pipe.transformer.enable_parallelism(config=cp)
    for name, policy in VARIANTS.items():
        with dit_accel.accelerated(pipe, policy) if policy else _null():
            out, times = timed(generate, device, rounds)
            reused = dit_accel.stats(pipe).reused if policy else None
        gathered = [None] * world
        dist.all_gather_object(gathered, reused)
        if rank == 0:
            ref, one_gpu_s, ref_reused = single[name]
            s = statistics.median(times)
            rows.append({"variant": name, "gpus": world, "s": s, "all_s": times, "one_gpu_s": one_gpu_s,
                         "speedup_vs_one_gpu": one_gpu_s / s, "efficiency": one_gpu_s / (world * s),
                         "psnr_vs_one_gpu_db": psnr(out, ref), "same_decisions_on_all_ranks":
                         all(r == gathered[0] for r in gathered), "decisions_as_one_gpu": gathered[0] == ref_reused})
    return rows


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def report(rows: list[dict], env: dict) -> str:
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    lines = [f"# Context parallel on {env.get('gpu', 'cpu')} ×{rows[0]['gpus'] if rows else '?'}", "",
             "| variant | s / call | vs its 1-GPU run | efficiency | vs 1-GPU dense | PSNR vs 1 GPU | same decisions |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_dense = f"{dense['one_gpu_s'] / r['s']:.2f}×" if dense else "—"
        lines.append(f"| {r['variant']} | {r['s']:.3f} | {r['speedup_vs_one_gpu']:.2f}× | {100 * r['efficiency']:.0f}% "
                     f"| {vs_dense} | {r['psnr_vs_one_gpu_db']:.1f} dB | "
                     f"{'yes' if r['same_decisions_on_all_ranks'] and r['decisions_as_one_gpu'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 CPU processes, tiny Wan pipeline")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ring", action="store_true", help="ring attention instead of Ulysses")
    ARGS = args = ap.parse_args(argv)
    if args.quick:
        from dit_accel.testing.distributed import run_on_ranks

        rows = run_on_ranks(worker, world_size=2, args=(True, args.rounds, args.ring), timeout=600)[0]
        name = "bench_parallel_quick"
    else:
        import torch.distributed as dist

        dist.init_process_group("nccl")
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = worker(rank, world, False, args.rounds, args.ring)
        dist.destroy_process_group()
        if rank != 0:
            return 0
        name = f"bench_parallel_h200x{world}" + ("_ring" if args.ring else "")
    env = environment()
    write_results(name, {"env": env, "args": vars(args), "rows": rows}, report(rows, env))
    return 0


ARGS = argparse.Namespace(steps=50)

if __name__ == "__main__":
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    raise SystemExit(main())
