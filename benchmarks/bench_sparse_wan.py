"""Per-step time of a Wan2.1-1.3B-shaped transformer with dit_accel sparse attention vs dense cuDNN.

Random weights, bf16, diffusers ``WanTransformer3DModel`` with the Wan2.1-T2V-1.3B config (30 layers,
dim 1536 = 12 heads x 128, FFN 8960, patch (1, 2, 2), text dim 4096), one 480p / 81-frame call:
latent 16 x 21 x 60 x 104 -> 21 x 30 x 52 = 32,760 visual tokens, 512 text tokens (cross-attention).

Variants (every call sparse: ``warmup_steps: 0``; block size 128; each at a fixed density, i.e. every
q-block keeps that share of kv-blocks plus its diagonal block):

* ``dense`` — the model's own processors, SDPA restricted to cuDNN attention;
* ``topp`` — top-p selector over mean-pooled block scores, natural token order;
* ``xattention`` — XAttention antidiagonal scoring (stride 8), natural order;
* ``svg2`` — SVG2 k-means permutation (100 / 500 clusters, warm-started across calls) + centroid scores;
* a suffix ``_int8`` / ``_fp8`` (e.g. ``topp_int8``) runs the kept blocks with the quantized kernel
  (``dit_accel.kernels.quant_attention``);
* the seed methods of ``benchmarks/sparse_variants.py`` by name (``proxy``, ``xattention+pisa``, ``adaspa@10``,
  ``psa``, ...): ``--variants seed`` runs all of them (AdaSpa with its search every 10 steps, timed over them).

Reported: median ms per transformer call (CUDA events; calls after warm-up, which includes the
kernel's autotuning), speedup vs dense, and the density the calls actually used (``dit_accel.stats``).

    python benchmarks/bench_sparse_wan.py --out DIR            # on the GPU (about 2 minutes on an H200)
    python benchmarks/bench_sparse_wan.py --quick --out DIR    # tiny config, CPU, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for JSON + Markdown (default $OUT, else benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="tiny 2-layer config and latent, any device (smoke test)")
    ap.add_argument("--densities", default="0.5,0.25,0.15")
    ap.add_argument("--variants", default="topp,xattention,svg2,xattention@4,svg2@4",
                    help="comma-separated: topp | xattention | svg2, optional _int8/_fp8 (quantized kernel) and "
                         "@N (re-select every N steps, timed as N consecutive steps)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per variant")
    ap.add_argument("--name", default="sparse_wan_1_3b")
    return ap.parse_args(argv)


def refresh_of(variant: str) -> int:
    """``name@N``: re-select blocks every N steps (``sparse.refresh_interval``); 1 without a suffix."""
    return int(variant.partition("@")[2] or 1)


def attention_policy(variant: str, density: float, block_size: int, quick: bool) -> dict:
    from sparse_variants import SEED_VARIANTS, section

    refresh = refresh_of(variant)
    variant = variant.partition("@")[0]
    head, _, tail = variant.rpartition("_")
    variant, quant = (head, tail) if tail in ("int8", "fp8") else (variant, "")
    base = {"block_size": block_size, "warmup_steps": 0, "quant": quant or "none"}
    if variant in ("topp", "xattention", "svg2"):
        section_ = {**base, "sparse": {"method": "xattention" if variant == "xattention" else "topp",
                                       "density": density}}
        if variant == "svg2":
            section_["reorder"] = "svg2"
    elif variant in SEED_VARIANTS:
        section_ = section(variant, density, base)
    else:
        raise SystemExit(f"unknown variant {variant!r}: topp, xattention, svg2 or one of {sorted(SEED_VARIANTS)}")
    if refresh != 1 or "refresh_interval" not in section_["sparse"]:
        section_["sparse"]["refresh_interval"] = refresh
    if quick and section_.get("reorder") == "svg2":
        section_["svg2"] = {"q_clusters": 8, "k_clusters": 16}
    if quick and section_["sparse"]["method"] == "proxy":
        section_["sparse"]["proxy_heads"] = 2
    return {"name": f"{variant}-{density}", "attention": section_}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import dit_accel
    from common import environment, median_spread, time_call, write_results

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        raise SystemExit("bench_sparse_wan.py needs a CUDA GPU (use --quick on a CPU)")
    if args.out:
        os.environ["OUT"] = args.out
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = TINY if args.quick else WAN_1_3B
    latent = (4, 16, 16) if args.quick else (21, 60, 104)
    text_len, block = (16, 32) if args.quick else (512, args.block_size)
    if args.quick:
        args.name += "_quick"
        args.warmup, args.rounds = 1, 2
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    hidden = torch.randn(1, config["in_channels"], *latent, device=device, dtype=dtype)
    text = torch.randn(1, text_len, config["text_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)

    @torch.no_grad()
    def call():
        return model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    def dense():
        if not cuda:
            return call()
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return call()

    def measure(fn):
        for _ in range(args.warmup):
            fn()
        return median_spread([time_call(fn) for _ in range(args.rounds)])

    rows = []
    reference = dense()
    ms, spread = measure(dense)
    dense_ms = ms
    rows.append({"variant": "dense (cuDNN)" if cuda else "dense (sdpa)", "density": 1.0, "ms": ms,
                 "spread_ms": spread, "speedup": 1.0, "used_density": 1.0, "rel_l2_vs_dense": 0.0})
    print(rows[-1], flush=True)
    from sparse_variants import SEED_VARIANTS

    names = [v for v in args.variants.split(",") if v]
    if "seed" in names:
        i = names.index("seed")
        names[i:i + 1] = [n + "@10" if n == "adaspa" else n for n in SEED_VARIANTS if n != "xattention"]
    for density in [float(d) for d in args.densities.split(",")]:
        for variant in names:
            dit_accel.accelerate(model, attention_policy(variant, density, block, args.quick))
            n = refresh_of(variant)  # time n consecutive steps per sample: selection amortised over its interval
            try:
                out = call()
                ms, spread = measure(lambda: [call() for _ in range(n)])
                ms, spread = ms / n, spread / n
                used = dit_accel.stats(model).extra["attention"]["sparse_density"]
            finally:
                dit_accel.remove(model)
            err = float((out.float() - reference.float()).norm() / reference.float().norm())
            rows.append({"variant": variant, "density": density, "ms": ms, "spread_ms": spread,
                         "speedup": dense_ms / ms, "used_density": used, "rel_l2_vs_dense": err})
            print(rows[-1], flush=True)
    env = environment()
    md = [f"# Wan2.1-1.3B-shaped transformer, sparse attention per step ({env.get('gpu', 'cpu')})", "",
          f"{'tiny config (--quick)' if args.quick else 'Wan2.1-T2V-1.3B config'}, random weights, {str(dtype)[6:]}, "
          f"latent {latent} -> {tokens:,} visual tokens, {text_len} text tokens, block {block}; median of "
          f"{args.rounds} calls after {args.warmup} warm-up calls. rel. L2 = output vs the dense call "
          "(random weights: a plumbing check, not a quality measure).", "",
          "| variant | density asked | density used | ms / step | speedup vs dense | rel. L2 vs dense |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['density']:.2f} | {r['used_density']:.3f} | {r['ms']:.1f} ± "
                  f"{r['spread_ms']:.1f} | {r['speedup']:.2f}x | {r['rel_l2_vs_dense']:.3f} |")
    md += ["", "```", *(f"{k}: {v}" for k, v in env.items()), "```", ""]
    write_results(args.name, {"environment": env, "args": vars(args), "config": config, "latent": latent,
                              "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
