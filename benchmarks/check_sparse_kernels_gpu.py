"""GPU check of the sparse seed methods' Triton paths: each variant on CUDA against the CPU reference path on the
same inputs, and the fused XAttention scoring kernel timed beside the PyTorch scorer.

1. For every variant of ``benchmarks/sparse_variants.py`` (PISA / centroid compensation fused in the block-sparse
   kernel, early stop, ProxyAttn, AdaSpa's block-mass kernel, PSA's pyramid kernel, error routing, PBS) at
   density 0.25 on structured bf16 inputs: relative L2 vs dense of the CUDA call and of the CPU reference call,
   and the CUDA-vs-CPU difference (bf16 rounding: ~1e-3; a broken kernel: the size of the error itself).
2. XAttention block scores at the Wan2.1-1.3B (32,760 tokens, 12 heads) and Wan2.1-14B (75,600 tokens, 40 heads)
   shapes: the fused kernel (``DIT_ACCEL_SCORE_KERNEL=1``) vs the PyTorch scorer vs dense SDPA, CUDA events.
   The selector uses the kernel only where this shows it faster.

    python benchmarks/check_sparse_kernels_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-timing", action="store_true", help="only the correctness part")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from common import environment, median_spread, time_call, write_results
    from dit_accel.attention import AttentionConfig, SparseRequest, sparse_self_attention
    from dit_accel.attention.select import _xattention_scores_torch
    from dit_accel.attention.synthetic import structured_qkv
    from dit_accel.kernels.block_scores import xattention_block_scores
    from sparse_variants import SEED_VARIANTS, TWO_CALL, section

    if not torch.cuda.is_available():
        raise SystemExit("check_sparse_kernels_gpu.py needs a CUDA GPU")
    if args.out:
        os.environ["OUT"] = args.out
    q, k, v = (t.to(torch.bfloat16) for t in structured_qkv((4, 16, 20), 4, 64, seed=0, device="cuda"))
    qc, kc, vc = (t.float().cpu() for t in (q, k, v))
    dense = F.scaled_dot_product_attention(qc, kc, vc)
    rows = []
    for name in SEED_VARIANTS:
        row = {"variant": name}
        try:
            cfg = AttentionConfig.from_dict(section(name, 0.25, {"block_size": 64, "warmup_steps": 0}))
            outs = {}
            for dev, inputs in (("cuda", (q, k, v)), ("cpu", (qc, kc, vc))):
                request = SparseRequest(cfg)
                with torch.no_grad():
                    result = sparse_self_attention(*inputs, request)
                    if name in TWO_CALL:
                        result = sparse_self_attention(*inputs, request)
                outs[dev] = result.out.float().cpu()
                row[f"density_{dev}"] = float(result.kept) / result.total
                row[f"rel_l2_{dev}"] = float((outs[dev] - dense).norm() / dense.norm())
            row["cuda_vs_cpu"] = float((outs["cuda"] - outs["cpu"]).norm() / dense.norm())
        except Exception as err:  # noqa: BLE001 — a failing variant is the finding; report it and go on
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
        print(row, flush=True)
    timing = []
    if not args.no_timing:
        for label, (b, h, s, d) in {"Wan2.1-1.3B 480p": (1, 12, 32760, 128),
                                     "Wan2.1-14B 720p": (1, 40, 75600, 128)}.items():
            qq = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
            kk = torch.randn_like(qq)
            scale = d ** -0.5
            fns = {"fused kernel": lambda: xattention_block_scores(qq, kk, 64, 8, scale),
                   "PyTorch scorer": lambda: _xattention_scores_torch(qq, kk, 64, 8, scale, 1 << 25),
                   "dense SDPA": lambda: F.scaled_dot_product_attention(qq, kk, qq)}
            err = float((fns["fused kernel"]() - fns["PyTorch scorer"]()).abs().max())
            for fn in fns.values():
                fn()
            for name, fn in fns.items():
                ms, spread = median_spread([time_call(fn) for _ in range(5)])
                timing.append({"shape": label, "what": name, "ms": ms, "spread_ms": spread,
                               "max_abs_vs_torch": err if name == "fused kernel" else None})
                print(timing[-1], flush=True)
    env = environment()
    md = [f"# Sparse seed methods on the GPU ({env.get('gpu')})", "",
          "Density 0.25, structured bf16 inputs (4 x 16 x 20 tokens, 4 heads, D 64, block 64): relative L2 vs dense "
          "on CUDA (Triton) and through the CPU reference path, and their difference.", "",
          "| variant | CUDA | CPU reference | CUDA vs CPU | density (CUDA / CPU) |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['variant']} | failed: {r['error']} | | | |")
        else:
            md.append(f"| {r['variant']} | {r['rel_l2_cuda']:.4f} | {r['rel_l2_cpu']:.4f} | {r['cuda_vs_cpu']:.4f} | "
                      f"{r['density_cuda']:.3f} / {r['density_cpu']:.3f} |")
    if timing:
        md += ["", "XAttention block scores (block 64, stride 8), ms (median ± half-range of 5):", "",
               "| shape | path | ms |", "|---|---|---|"]
        md += [f"| {t['shape']} | {t['what']} | {t['ms']:.2f} ± {t['spread_ms']:.2f} |" for t in timing]
    md += ["", "```", *(f"{k}: {v}" for k, v in env.items()), "```", ""]
    write_results("sparse_kernels_gpu_check", {"environment": env, "rows": rows, "timing": timing}, "\n".join(md))


if __name__ == "__main__":
    main()
