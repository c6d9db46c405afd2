"""Per-tile sweep of the attention kernels: every tile config launched pinned, no autotuning.

The autotuner keeps only the fastest config and reports nothing about the others; this script
times each ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])`` on its own, on the inputs of
``bench_block_sparse.py`` (B = 1, D = 128, bf16 ``randn``, random block masks with exactly
``round(density * nk)`` kv-blocks per row), so that an autotune space can be chosen from
evidence. It is how the one-stage 64-row tiles got into both spaces
(``benchmarks/results/kernel_variants_h200/cfg_sweep.json`` and its README, round 3).

Per (kernel, S, density) it reports, for each tile: median ms (CUDA events, each sample repeats the
call for ``--min-ms``), useful TFLOP/s = 4·D·(token pairs in kept blocks) / time, the ratio to dense
cuDNN attention, and the max |difference| to the first tile that ran (and, at density 1.0, to
cuDNN); then the tile the autotuned public function picked for the same call and its time, which
says whether the autotuner finds the fastest tile (it can miss when the GPU's clocks sag under
its power cap: time a few runs).

Kernels (``--kernels``): ``bsa`` — the bf16 block-sparse kernel
(:func:`dit_accel.kernels.block_sparse_attention`); ``int8`` / ``int8_pv8`` / ``fp8`` — the quantized
kernel (:func:`dit_accel.kernels.quant_attention.quant_attention`, INT8 QKᵀ with 16-bit P·V, INT8
with FP8 P·V, all-FP8; dense without a table at density 1.0, as ``bench_quant_attention.py``).
A quantized call's time includes its quantization passes. Tiles (``--tiles``): ``space`` is the
kernel's autotune space (``DIT_ACCEL_BSA_CONFIG`` / ``DIT_ACCEL_QATTN_CONFIG`` must be unset),
``maxnreg`` the register-capped tiles of the round-3 sweep, or explicit ``BM,BN,W,S[,MAXNREG]``
items; a tile whose sides do not divide the table block is listed as skipped.

    python benchmarks/bench_tile_sweep.py --out DIR                   # bsa, S = 32,760 / 75,600, density 1.0 / 0.25
    python benchmarks/bench_tile_sweep.py --kernels bsa,int8_pv8 --tiles space maxnreg --densities 0.25
    python benchmarks/bench_tile_sweep.py --tiles 64,128,4,1 64,128,4,1,168 --seq-lens 32760 --heads 12
    python benchmarks/bench_tile_sweep.py --quick --out /tmp/ts       # CPU: Triton interpreter, tiny shapes

``--quick`` (no GPU needed) runs S = 77 (tails in every block), H = 1, D = 32, table blocks of 32 and
the four tiles 16/32 x 16/32 through the Triton interpreter for ``bsa`` and ``int8_pv8``: it checks
that every pinned launch runs and agrees with the others. Its times measure the interpreter, not a
kernel.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

if "--quick" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: run the kernels on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KERNELS = ("bsa", "int8", "int8_pv8", "fp8")
QUANT = {"int8": ("int8", "fp16"), "int8_pv8": ("int8", "fp8"), "fp8": ("fp8", "fp8")}
#: the register-capped tiles of the round-3 sweep (none helped; kept to re-check on other GPUs / Tritons)
MAXNREG_TILES = ((64, 128, 4, 1, 168), (64, 64, 4, 1, 168), (64, 64, 4, 2, 128))
QUICK_TILES = ((16, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1), (32, 32, 4, 1))
LOG2E = 1.4426950408889634


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="bsa", help=f"comma-separated subset of {','.join(KERNELS)}")
    ap.add_argument("--seq-lens", default="32760,75600", help="comma-separated S values")
    ap.add_argument("--heads", default="12,24", help="comma-separated H, one per S")
    ap.add_argument("--densities", default="0.25,1.0", help="comma-separated kept-block fractions")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128, help="block-table granularity (block_m = block_n)")
    ap.add_argument("--tiles", nargs="+", default=["space"],
                    help="'space' (the autotune space), 'maxnreg' (register-capped tiles) or BM,BN,W,S[,MAXNREG]")
    ap.add_argument("--rounds", type=int, default=5, help="timed samples per tile (median reported)")
    ap.add_argument("--min-ms", type=float, default=20.0, help="each timed sample repeats a call to last this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="tile_sweep", help="result file stem")
    ap.add_argument("--out", default=None, help="directory for the JSON + Markdown results "
                    "(default: $OUT, else benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="CPU, Triton interpreter, tiny shapes: a smoke test")
    return ap.parse_args(argv)


def expand_tiles(words, kernel: str) -> list[tuple]:
    """The tiles ``--tiles`` names for ``kernel``, in order, without repeats."""
    tiles = []
    for word in words:
        if word == "space":
            if kernel == "bsa":
                from dit_accel.kernels._block_sparse_triton import hopper_configs
            else:
                from dit_accel.kernels._quant_attention_triton import hopper_configs
            tiles += [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in hopper_configs()]
        elif word == "maxnreg":
            tiles += list(MAXNREG_TILES)
        else:
            parts = tuple(int(x) for x in word.split(","))
            if len(parts) not in (4, 5):
                raise SystemExit(f"--tiles: {word!r} is not BM,BN,W,S[,MAXNREG]")
            tiles.append(parts)
    return list(dict.fromkeys(tiles))


def tile_name(tile) -> str:
    bm, bn, w, s, *rest = tile
    return f"{bm}x{bn} w{w} s{s}" + (f" maxnreg {rest[0]}" if rest and rest[0] else "")


def pinned_call(kernel: str, q, k, v, idx, cnt, block: int, tile, interpret: bool):
    """A zero-argument call of the launcher with ``tile`` pinned (``tile=None``: the autotuned public function)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    if kernel == "bsa":
        if tile is None:
            from dit_accel.kernels import block_sparse_attention

            return lambda: block_sparse_attention(q, k, v, idx, cnt, block_m=block, block_n=block)
        from dit_accel.kernels._block_sparse_triton import block_sparse_attention_triton

        return lambda: block_sparse_attention_triton(q, k, v, idx, cnt, block_m=block, block_n=block,
                                                     qk_scale=scale * LOG2E, interpret=interpret,
                                                     return_lse=False, tile=tile)[0]
    mode, pv = QUANT[kernel]
    bm, bn = (block, block) if idx is not None else (block, 64)   # dense: K quantized per 64 tokens
    if tile is None:
        from dit_accel.kernels.quant_attention import quant_attention

        return lambda: quant_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, mode=mode, pv=pv)
    from dit_accel.kernels._quant_attention_triton import quant_attention_triton

    return lambda: quant_attention_triton(q, k, v, idx, cnt, block_m=bm, block_n=bn, qk_scale=scale * LOG2E,
                                          sm_scale=scale, qk_fp8=mode == "fp8", pv_fp8=pv == "fp8", smooth_k=True,
                                          interpret=interpret, return_lse=False, tile=tile)[0]


def last_autotuned(kernel: str):
    """The tile the autotuned kernel ran with last (None under the interpreter)."""
    from common import autotuned_tile

    if kernel == "bsa":
        from dit_accel.kernels._block_sparse_triton import _KERNELS

        return autotuned_tile(_KERNELS.get("cuda"))
    from dit_accel.kernels._quant_attention_triton import _KERNELS

    return autotuned_tile(_KERNELS.get("attn:cuda"))


def main(argv=None) -> dict:
    args = parse_args(argv)

    import torch
    import torch.nn.functional as F

    from bench_block_sparse import kept_pairs, make_block_mask
    from common import environment, median_spread, reps_for, time_call, write_results
    from dit_accel.kernels import mask_to_block_table

    cuda = torch.cuda.is_available()
    if args.quick:
        args.seq_lens, args.heads, args.densities, args.head_dim, args.block = "77", "1", "1.0,0.5", 32, 32
        args.rounds, args.min_ms = 1, 0.0
        if args.kernels == "bsa":
            args.kernels = "bsa,int8_pv8"
        if args.tiles == ["space"]:
            args.tiles = [",".join(map(str, t)) for t in QUICK_TILES]
        if args.name == "tile_sweep":
            args.name = "tile_sweep_quick"
    if not cuda:
        from dit_accel.kernels._block_sparse_triton import interpreter_ready

        if not args.quick:
            raise SystemExit("bench_tile_sweep.py needs a CUDA GPU (or --quick, on the CPU through the interpreter)")
        if os.environ.get("TRITON_INTERPRET") != "1" or not interpreter_ready():
            raise SystemExit("--quick on the CPU needs TRITON_INTERPRET=1 set before triton is imported")
    if args.out:
        os.environ["OUT"] = args.out
    interpret = not cuda
    device = "cuda" if cuda else "cpu"
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise SystemExit(f"--kernels: unknown {sorted(unknown)}; choose from {KERNELS}")
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    heads = [int(h) for h in args.heads.split(",")]
    if len(heads) != len(seq_lens):
        raise SystemExit("--heads needs one value per --seq-lens value")
    densities = [float(d) for d in args.densities.split(",")]
    D, blk = args.head_dim, args.block

    rows = []
    for S, H in zip(seq_lens, heads):
        g = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v = (torch.randn(1, H, S, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def dense():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
        else:
            def dense():
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        ref = dense()
        dense_ms = median_spread([time_call(dense, reps_for(dense, args.min_ms)) for _ in range(args.rounds)])[0]
        rows.append({"S": S, "H": H, "kernel": "dense", "tile": "cuDNN" if cuda else "SDPA (CPU)", "ms": dense_ms})
        print(rows[-1], flush=True)
        for density in densities:
            mask = make_block_mask(1, H, S, blk, density, args.seed, device)
            idx, cnt = mask_to_block_table(mask)
            flops = 4.0 * D * kept_pairs(mask, S, blk)
            for kernel in kernels:
                table = (None, None) if kernel != "bsa" and density >= 1.0 else (idx, cnt)
                first = None
                for tile in expand_tiles(args.tiles, kernel) + [None]:
                    row = {"S": S, "H": H, "kernel": kernel, "density": density,
                           "tile": tile_name(tile) if tile else "autotuned", "cfg": list(tile) if tile else None}
                    fn = pinned_call(kernel, q, k, v, *table, blk, tile, interpret)
                    try:
                        out = fn()   # compiles (and, for the autotuned call, tunes) the config
                        if cuda:
                            torch.cuda.synchronize()
                    except ValueError as exc:     # the tile does not fit this table
                        row["skipped"] = str(exc)
                        rows.append(row)
                        print(row, flush=True)
                        continue
                    except Exception as exc:      # e.g. out of shared memory for this config: report, go on
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                        rows.append(row)
                        print(row, flush=True)
                        continue
                    if tile is None:
                        row["tile"] = f"autotuned: {last_autotuned(kernel) or 'interpreter tile'}"
                    reps = reps_for(fn, args.min_ms)
                    ms, spread = median_spread([time_call(fn, reps) for _ in range(args.rounds)])
                    row.update(ms=ms, spread_ms=spread, useful_tflops=flops / ms / 1e9, vs_dense=dense_ms / ms)
                    if first is None:
                        first = out
                    row["maxdiff_vs_first"] = (out.float() - first.float()).abs().max().item()
                    if density >= 1.0:
                        row["maxdiff_vs_dense"] = (out.float() - ref.float()).abs().max().item()
                    rows.append(row)
                    print(row, flush=True)
                    del out
                del first
        q = k = v = ref = None
        if cuda:
            torch.cuda.empty_cache()

    env = environment()
    payload = {"environment": env, "args": vars(args), "rows": rows}
    write_results(args.name, payload, render_markdown(rows, args, env))
    return payload


def render_markdown(rows, args, env) -> str:
    """One table per kernel: every tile of every (S, density), the fastest in bold."""
    md = [f"# Attention kernels, one tile at a time ({env.get('gpu', 'cpu: Triton interpreter')})", "",
          f"B=1, D={args.head_dim}, bf16, table blocks {args.block}x{args.block}, median of {args.rounds} samples "
          f"(each ≥ {args.min_ms:g} ms); useful TFLOP/s = 4·D·(pairs in kept blocks) / time; vs dense = "
          "dense-attention ms / this ms. `autotuned` is the public function with the autotuner's pick.", ""]
    dense = {r["S"]: r["ms"] for r in rows if r["kernel"] == "dense"}
    md += ["| S | dense ms |", "|---|---|"] + [f"| {s:,} | {ms:.3f} |" for s, ms in dense.items()] + [""]
    for kernel in dict.fromkeys(r["kernel"] for r in rows if r["kernel"] != "dense"):
        md += [f"## {kernel}", "", "| S | H | density | tile | ms | useful TFLOP/s | vs dense | max diff vs first |",
               "|---|---|---|---|---|---|---|---|"]
        mine = [r for r in rows if r["kernel"] == kernel]
        for r in mine:
            if "ms" not in r:
                md.append(f"| {r['S']:,} | {r['H']} | {r['density']:.2f} | {r['tile']} | "
                          f"{'skipped' if 'skipped' in r else 'failed'}: {r.get('skipped', r.get('error'))} | | | |")
                continue
            group = [x for x in mine if x["S"] == r["S"] and x["density"] == r["density"] and "ms" in x and x["cfg"]]
            best = bool(r["cfg"]) and r["ms"] == min(x["ms"] for x in group)
            tile = f"**{r['tile']}**" if best else r["tile"]
            md.append(f"| {r['S']:,} | {r['H']} | {r['density']:.2f} | {tile} | {r['ms']:.3f} | "
                      f"{r['useful_tflops']:.3g} | {r['vs_dense']:.3g}x | {r['maxdiff_vs_first']:.1e} |")
        md.append("")
    md += ["```", *(f"{key}: {value}" for key, value in env.items()), "```", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
