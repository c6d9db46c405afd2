"""Block-sparse attention forward: dit_accel's Triton kernel vs FlexAttention vs cuDNN dense SDPA.

Shapes of the block-sparse attention issue (B=1, D=128, bf16, 128x128 blocks):

* S = 4,608  (FLUX.1 1024x1024 image + 512 text tokens),  H = 24;
* S = 32,760 (CogVideoX/Hunyuan-class video latents),     H = 12;
* S = 75,600 (Wan 2.1 720p, 81 frames),                   H = 24;

at block densities 1.0 / 0.5 / 0.25 / 0.15. Each (b, h, q-block) row keeps the same number of
kv-blocks, ``max(1, round(density * nk))``, chosen at random (seeded), so the load is even
across programs; the same masks go to both sparse implementations:

* ``dit_accel`` — ``dit_accel.kernels.block_sparse_attention`` (autotuned on the first call);
* ``flex`` — ``torch.compile(flex_attention)`` with a ``BlockMask.from_kv_blocks`` built from
  the same table (all blocks passed as *full* blocks: no mask_mod is evaluated inside them);
* ``cudnn`` — dense ``scaled_dot_product_attention`` under
  ``sdpa_kernel([SDPBackend.CUDNN_ATTENTION])`` (density has no effect on it: the bar to beat).

Reported: the tile the autotuner chose (JSON ``dit_accel_tile``: it can differ between runs when
the GPU's clocks vary), median milliseconds (CUDA events, variants interleaved per round after warm-up),
*useful* TFLOP/s = 4·D·(token pairs in the kept blocks) / time (so the dense baseline's useful
rate falls with density while its time does not), speedups, and the max |difference| of
dit_accel to flex (same mask) and, at density 1.0, to cuDNN.

    python benchmarks/bench_block_sparse.py                       # full sweep, on a GPU
    python benchmarks/bench_block_sparse.py --seq-lens 4608 --heads 24 --densities 1.0,0.25
    python benchmarks/bench_block_sparse.py --check-cpu           # tiny mask/plumbing check, no GPU
    python benchmarks/bench_block_sparse.py --quick --out /tmp/bs  # tiny shapes, any device, seconds

The sparse-attention issue's kernel target (25% density, S = 32,760 and 75,600, D = 128):

    python benchmarks/bench_block_sparse.py --seq-lens 32760,75600 --heads 12,24 --densities 1.0,0.25 --out DIR

``--quick`` runs S = 512 with 2 heads of 128 channels at densities 1.0 / 0.25; on a CPU the
dit_accel variant is the PyTorch reference (the Triton interpreter when TRITON_INTERPRET=1), flex
runs eagerly and ``sdpa`` (default backend) replaces cuDNN.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_SEQ_LENS = "4608,32760,75600"
DEFAULT_HEADS = "24,12,24"
DEFAULT_DENSITIES = "1.0,0.5,0.25,0.15"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default=DEFAULT_SEQ_LENS, help="comma-separated S values")
    ap.add_argument("--heads", default=DEFAULT_HEADS, help="comma-separated H, one per S")
    ap.add_argument("--densities", default=DEFAULT_DENSITIES, help="comma-separated kept-block fractions")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128, help="block-table granularity (block_m = block_n)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per variant (includes autotune/compile)")
    ap.add_argument("--rounds", type=int, default=10, help="timed samples per variant, interleaved")
    ap.add_argument("--min-ms", type=float, default=20.0, help="each timed sample repeats a call to last this long")
    ap.add_argument("--variants", default="dit_accel,flex,cudnn",
                    help="subset of dit_accel,flex,cudnn,sdpa (sdpa: the default SDPA backend)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="block_sparse_attention", help="result file stem")
    ap.add_argument("--out", default=None, help="directory for the JSON + Markdown results "
                    "(default: $OUT, else benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (S=512, H=2), any device, seconds: a smoke test")
    ap.add_argument("--check-cpu", action="store_true",
                    help="tiny CPU run: check that the kernel/reference and FlexAttention agree on the masks")
    return ap.parse_args(argv)


def make_block_mask(B, H, S, block, density, seed, device):
    """Random block mask [B, H, nq, nk] with exactly max(1, round(density * nk)) kv-blocks per row."""
    import torch

    nq = nk = math.ceil(S / block)
    keep = nk if density >= 1.0 else max(1, round(density * nk))
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(B, H, nq, nk, generator=g)
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(B, H, nq, nk, dtype=torch.bool).scatter_(-1, top, True)
    return mask.to(device)


def kept_pairs(mask, S, block) -> int:
    """Query-key token pairs inside the kept blocks (partial tail blocks counted exactly)."""
    import torch

    n = mask.shape[-1]
    sizes = torch.full((n,), block, dtype=torch.float64, device=mask.device)
    sizes[-1] = S - block * (n - 1)
    return int(torch.einsum("bhqk,q,k->", mask.double(), sizes, sizes).item())


def flex_block_mask(kv_indices, kv_counts, S, block, block_mask):
    """FlexAttention BlockMask with the table's blocks as *full* blocks, so compiled flex never
    evaluates the mask_mod inside them. The mask_mod still states the same block mask because
    eager flex (the CPU check) ignores the block lists and applies only the mask_mod."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    def mask_mod(b, h, q_idx, kv_idx):
        return block_mask[b, h, q_idx // block, kv_idx // block]

    nk = math.ceil(S / block)
    pad = nk - kv_indices.shape[-1]
    full_idx = torch.nn.functional.pad(kv_indices, (0, pad)) if pad > 0 else kv_indices
    return BlockMask.from_kv_blocks(torch.zeros_like(kv_counts), torch.zeros_like(full_idx), kv_counts,
                                    full_idx.contiguous(), BLOCK_SIZE=(block, block), mask_mod=mask_mod,
                                    seq_lengths=(S, S))


def check_cpu(args) -> None:
    """Plumbing check without a GPU: reference (and the interpreted kernel when TRITON_INTERPRET=1)
    vs eager FlexAttention with the BlockMask this script builds, on tiny shapes."""
    import warnings

    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from dit_accel.kernels import block_sparse_attention, block_sparse_attention_reference, mask_to_block_table

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    B, H, S, D, block = 1, 2, 77, 32, 16
    g = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    worst = 0.0
    for density in (1.0, 0.5, 0.25):
        mask = make_block_mask(B, H, S, block, density, args.seed, "cpu")
        idx, cnt = mask_to_block_table(mask)
        ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_m=block, block_n=block)
        ours = block_sparse_attention(q, k, v, idx, cnt, block_m=block, block_n=block)
        flex = flex_attention(q, k, v, block_mask=flex_block_mask(idx, cnt, S, block, mask))
        err = max((ours - ref).abs().max().item(), (flex - ref).abs().max().item())
        worst = max(worst, err)
        print(f"density {density}: kept pairs {kept_pairs(mask, S, block)}/{B * H * S * S}, max |diff| {err:.2e}")
    if worst > 1e-4:
        raise SystemExit(f"check failed: max |diff| {worst:.2e}")
    print("check ok")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check_cpu:
        check_cpu(args)
        return

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from common import environment, median_spread, reps_for, time_call, write_results
    from dit_accel.kernels import block_sparse_attention, mask_to_block_table

    cuda = torch.cuda.is_available()
    if args.quick:
        args.seq_lens, args.heads, args.densities, args.rounds, args.warmup = "512", "2", "1.0,0.25", 2, 1
        args.block = 64
        if args.name == "block_sparse_attention":
            args.name = "block_sparse_attention_quick"
        if not cuda:
            args.variants = "dit_accel,flex,sdpa"
    elif not cuda:
        raise SystemExit("bench_block_sparse.py needs a CUDA GPU (use --quick or --check-cpu on a CPU)")
    if args.out:
        os.environ["OUT"] = args.out
    device = "cuda" if cuda else "cpu"
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    heads = [int(h) for h in args.heads.split(",")]
    if len(heads) != len(seq_lens):
        raise SystemExit("--heads needs one value per --seq-lens value")
    densities = [float(d) for d in args.densities.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    dtype = getattr(torch, args.dtype)
    B, D, blk = args.batch, args.head_dim, args.block
    flex_compiled = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    if not cuda:
        import warnings

        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    rows = []
    for S, H in zip(seq_lens, heads):
        g = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        dense_flops = 4.0 * D * B * H * S * S

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v)

        for density in densities:
            mask = make_block_mask(B, H, S, blk, density, args.seed, device)
            idx, cnt = mask_to_block_table(mask)
            flops = 4.0 * D * kept_pairs(mask, S, blk)
            bm = flex_block_mask(idx, cnt, S, blk, mask) if "flex" in variants else None
            fns = {"dit_accel": lambda: block_sparse_attention(q, k, v, idx, cnt, block_m=blk, block_n=blk),
                   "flex": lambda: flex_compiled(q, k, v, block_mask=bm),
                   "cudnn": cudnn, "sdpa": sdpa}
            fns = {name: fns[name] for name in variants}
            outs, errors = {}, {}
            for name, fn in list(fns.items()):
                try:
                    for _ in range(max(1, args.warmup)):
                        outs[name] = fn()
                    if cuda:
                        torch.cuda.synchronize()
                except Exception as exc:  # e.g. no cuDNN attention for this shape: report, go on
                    errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                    print(f"{name} failed at S={S}, density={density}: {errors[name]}", flush=True)
                    del fns[name]
            reps = {name: reps_for(fn, args.min_ms) for name, fn in fns.items()}
            times = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(time_call(fn, reps[name]))
            row = {"S": S, "H": H, "B": B, "D": D, "block": blk, "density": density,
                   "actual_density": float(mask.float().mean()), "useful_gflop": flops / 1e9, "errors": errors,
                   "dit_accel_tile": _last_tile() if "dit_accel" in fns else None}
            for name in fns:
                med, spread = median_spread(times[name])
                row[f"{name}_ms"], row[f"{name}_spread_ms"] = med, spread
                row[f"{name}_useful_tflops"] = flops / med / 1e9
                if name in ("cudnn", "sdpa"):
                    row[f"{name}_dense_tflops"] = dense_flops / med / 1e9
            if "dit_accel" in outs and "flex" in outs:
                row["maxdiff_vs_flex"] = (outs["dit_accel"].float() - outs["flex"].float()).abs().max().item()
            for dense in ("cudnn", "sdpa"):
                if "dit_accel" in outs and dense in outs and density >= 1.0:
                    row[f"maxdiff_vs_{dense}"] = (outs["dit_accel"].float() - outs[dense].float()).abs().max().item()
            for other in ("flex", "cudnn", "sdpa"):
                if "dit_accel" in fns and other in fns:
                    row[f"speedup_vs_{other}"] = row[f"{other}_ms"] / row["dit_accel_ms"]
            rows.append(row)
            print(row, flush=True)
            del outs
        q = k = v = None  # free before the next shape
        if cuda:
            torch.cuda.empty_cache()

    env = environment()
    write_results(args.name, {"environment": env, "args": vars(args), "rows": rows},
                  render_markdown(rows, variants, args, env))


def _last_tile():
    """The tile dit_accel's autotuned kernel last ran with (None on the CPU paths)."""
    from common import autotuned_tile

    try:
        from dit_accel.kernels._block_sparse_triton import _KERNELS
    except ImportError:
        return None
    return autotuned_tile(_KERNELS.get("cuda"))


def render_markdown(rows, variants, args, env) -> str:
    """The results table (one row per shape and density, variants side by side)."""
    B, D, blk = args.batch, args.head_dim, args.block
    md = [f"# Block-sparse attention forward ({env.get('gpu', 'cpu')})", "",
          f"B={B}, D={D}, {args.dtype}, blocks {blk}x{blk}, median of {args.rounds} rounds after "
          f"{args.warmup} warm-up calls; useful TFLOP/s = 4·D·(pairs in kept blocks) / time.", "",
          "| S | H | density | " + " | ".join(f"{n} ms | {n} useful TFLOP/s" for n in variants)
          + (" | vs flex | vs dense |" if "dit_accel" in variants else " |"),
          "|" + "---|" * (3 + 2 * len(variants) + (2 if "dit_accel" in variants else 0))]
    for r in rows:
        cells = [f"{r['S']:,}", str(r["H"]), f"{r['density']:.2f}"]
        for n in variants:
            cells += [f"{r[f'{n}_ms']:.3f}", f"{r[f'{n}_useful_tflops']:.0f}"] if f"{n}_ms" in r else ["failed", ""]
        if "dit_accel" in variants:
            dense = r.get("speedup_vs_cudnn", r.get("speedup_vs_sdpa"))
            cells += [f"{r['speedup_vs_flex']:.2f}x" if "speedup_vs_flex" in r else "",
                      f"{dense:.2f}x" if dense is not None else ""]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "```", *(f"{k}: {v}" for k, v in env.items()), "```", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
