"""Peak activation memory and time of one Wan2.1-1.3B-shaped transformer forward with and without ``memory:``
(Feature Slicer / Operator Grouping, ``dit_accel.runtime.memory``).

Random weights built from the Wan2.1-T2V-1.3B config (no download: ``benchmarks/bench_sparse_wan.py``'s
``WAN_1_3B``: 30 layers, dim 1536, FFN 8960), bf16, one 480p / 81-frame call: latent 16 x 21 x 60 x 104 ->
21 x 30 x 52 = 32,760 visual tokens, 512 text tokens. Peak activation memory = ``torch.cuda.max_memory_allocated``
during the call minus the memory allocated before it (weights and inputs); on CPU the peak of live tensors made
during the call (``dit_accel.testing.memory.PeakTensorMemory``). Time: median of ``--rounds`` calls (CUDA events)
after ``--warmup`` calls. ``--compile`` adds the same variants with every block compiled (``compile:`` section,
inductor). The issue's target: >= 30 % lower peak activation memory at < 5 % time cost.

    python benchmarks/bench_memory.py                                # H200: eager and --compile variants
    python benchmarks/bench_memory.py --device cpu --tiny --out DIR  # tiny long-sequence config, CPU, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# the tiny config keeps Wan 2.1's FFN ratio (8960 / 1536 = 5.8) at 2,048 tokens
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=373, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny 2-layer config, 2,048 tokens (smoke test)")
    ap.add_argument("--slice-tokens", default=None, help="comma-separated memory.slice_tokens values "
                                                         "(default 8192,4096; --tiny: 512)")
    ap.add_argument("--compile", action="store_true", help="also measure with regionally compiled blocks (inductor)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    ap.add_argument("--rounds", type=int, default=5, help="timed calls per variant")
    ap.add_argument("--out", default=None, help="directory for JSON + Markdown (default $OUT, else benchmarks/results)")
    ap.add_argument("--name", default=None, help="result file name (default memory_wan_1_3b_<device>[_tiny])")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from diffusers import WanTransformer3DModel

    import dit_accel
    from bench_sparse_wan import WAN_1_3B
    from common import environment, median_spread, time_call, write_results
    from dit_accel.testing.memory import PeakTensorMemory

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu --tiny)")
    if not cuda and not args.tiny:
        raise SystemExit("the full Wan2.1-1.3B shape needs a GPU; on a CPU use --tiny")
    if args.compile and not cuda:
        raise SystemExit("--compile: the CPU peak is counted by a dispatch mode, which torch.compile does not trace; "
                         "measure compiled variants on CUDA")
    if args.out:
        os.environ["OUT"] = args.out
    dtype = torch.bfloat16 if cuda else torch.float32
    config = TINY if args.tiny else WAN_1_3B
    latent = (8, 32, 32) if args.tiny else (21, 60, 104)
    text_len = 16 if args.tiny else 512
    slices = [int(s) for s in (args.slice_tokens or ("512" if args.tiny else "8192,4096")).split(",") if s]
    name = args.name or f"memory_wan_1_3b_{'h200' if cuda and 'H200' in torch.cuda.get_device_name() else device}" \
                        f"{'_tiny' if args.tiny else ''}"
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(1, config["in_channels"], *latent, device=device, dtype=dtype, generator=g)
    text = torch.randn(1, text_len, config["text_dim"], device=device, dtype=dtype, generator=g)
    timestep = torch.tensor([500.0], device=device)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)

    @torch.no_grad()
    def call():
        return model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    def peak_activation() -> tuple[torch.Tensor, int]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = call()
            torch.cuda.synchronize()
            return out, torch.cuda.max_memory_allocated() - before
        with PeakTensorMemory() as mem:
            out = call()
        return out, mem.peak

    def measure(variant: str, policy: dict | None, reference: torch.Tensor | None) -> dict:
        if policy is not None:
            dit_accel.accelerate(model, policy)
        try:
            for _ in range(args.warmup):
                call()
            out, peak = peak_activation()
            ms, spread = median_spread([time_call(call) for _ in range(args.rounds)])
        finally:
            if policy is not None:
                dit_accel.remove(model)
            if cuda:
                torch.cuda.empty_cache()
        err = 0.0 if reference is None else float((out.float() - reference.float()).norm() / reference.float().norm())
        row = {"variant": variant, "peak_activation_mib": peak / 2**20, "ms": ms, "spread_ms": spread,
               "rel_l2_vs_unsliced": err, "output": out}
        print({k: v for k, v in row.items() if k != "output"}, flush=True)
        return row

    rows = []
    modes = [("eager", None)] + ([("compiled", {"mode": "regional", "backend": "inductor"})] if args.compile else [])
    for mode, compile_section in modes:
        extra = {} if compile_section is None else {"compile": compile_section}
        base = measure(f"{mode}, no memory section", extra or None, None)
        base.update(mode=mode, slice_tokens=None, peak_reduction=0.0, time_cost=0.0)
        rows.append(base)
        for size in slices:
            row = measure(f"{mode}, memory.slice_tokens={size}", {"memory": {"slice_tokens": size}, **extra},
                          base["output"])
            row.update(mode=mode, slice_tokens=size,
                       peak_reduction=1 - row["peak_activation_mib"] / base["peak_activation_mib"],
                       time_cost=row["ms"] / base["ms"] - 1)
            rows.append(row)
        if compile_section is not None:
            torch._dynamo.reset()
    for row in rows:
        row.pop("output")
    env = environment()
    gpu = env.get("gpu", "cpu")
    what = "tiny config (--tiny)" if args.tiny else "Wan2.1-T2V-1.3B config"
    how = ("torch.cuda.max_memory_allocated during the call minus the memory allocated before it" if cuda
           else "peak of the live tensors made during the call")
    md = [f"# Peak activation memory of one Wan2.1-1.3B-shaped transformer forward, `memory:` on and off ({gpu})", "",
          "```", *(f"{k}: {v}" for k, v in env.items()), "```", "",
          f"{what}, random weights, {str(dtype)[6:]}, latent {latent} -> {tokens:,} visual tokens, {text_len} text "
          f"tokens. Peak activation = {how}; time = median of {args.rounds} calls after {args.warmup} warm-up calls"
          f"{'' if cuda else ' (CPU times on a shared machine: not a speed measurement)'}. Target (issue 22): "
          ">= 30 % lower peak activation memory at < 5 % time cost.", "",
          "| variant | peak activation (MiB) | reduction | ms / call | time cost | rel. L2 vs unsliced |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['peak_activation_mib']:.1f} | {100 * r['peak_reduction']:.1f} % | "
                  f"{r['ms']:.1f} ± {r['spread_ms']:.1f} | {100 * r['time_cost']:+.1f} % | "
                  f"{r['rel_l2_vs_unsliced']:.2e} |")
    md.append("")
    payload = {"environment": env, "args": vars(args), "config": config, "latent": latent, "tokens": tokens,
               "text_tokens": text_len, "dtype": str(dtype), "rows": rows}
    write_results(name, payload, "\n".join(md))
    return payload


if __name__ == "__main__":
    main()
