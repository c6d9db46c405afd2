"""Accuracy of block-sparse attention vs dense, per selection method, reordering and density.

Queries and keys with video-DiT-like 3-D-local structure come from
:func:`dit_accel.attention.synthetic.structured_qkv` (heads that attend along frames, within a frame, along
a row, or in a 3-D neighbourhood, plus semantic objects). PARO orders and static masks are calibrated on
a *different* draw (seed + 1) of the same head kinds, as ``dit_accel.calibrate`` would on other prompts.

For every method (XAttention antidiagonals, top-p over pooled/centroid scores, static calibrated masks),
reordering (none, PARO, SVG2 — static masks only with fixed orders) and SVG-EAR compensation (off/on), at
fixed densities (each q-block keeps that share of kv-blocks, plus its self block): the relative L2 error
``|out - dense| / |dense|`` and the density actually used. Also each method in its threshold mode
(tau = 0.9 / top-p 0.9), which picks its own density.

    python benchmarks/bench_sparse_accuracy.py --out DIR          # Wan 480p: 21x30x52 tokens, 12 heads, D=128 (GPU)
    python benchmarks/bench_sparse_accuracy.py --quick --out DIR     # 4x8x16 tokens, 5 heads, D=32: CPU, seconds

``--zoo cifar10_dit`` adds a table on *real* attention: the post-RoPE q, k, v of every self-attention
layer of the project's trained reference model (``dit_accel.zoo``) at step ``--zoo-step`` of a
``--zoo-steps``-step generation (classes 0, 3, 5, 8 — labels, or the class prompts of text models such as
``digits_wan`` — seed 0), PARO orders calibrated with ``dit_accel.calibrate`` on other classes (1, 7, seed 1);
errors are averaged over layers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for JSON + Markdown (default $OUT, else benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="small shape on any device (seconds on a CPU)")
    ap.add_argument("--grid", default="21,30,52", help="F,H,W token grid")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--densities", default="0.5,0.25,0.15")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="q/k/v dtype; auto = bfloat16 on CUDA (the Triton kernel's fast path; float32 there "
                         "runs an FMA-dot kernel whose autotuning alone takes minutes), float32 on the CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="sparse_accuracy")
    ap.add_argument("--zoo", default=None, help="also measure a trained reference model's attention (e.g. cifar10_dit)")
    ap.add_argument("--zoo-steps", type=int, default=20)
    ap.add_argument("--zoo-step", type=int, default=10, help="the step whose attention is recorded")
    ap.add_argument("--zoo-block-size", type=int, default=16)
    ap.add_argument("--zoo-frames", type=int, default=4, help="digits_wan: frames per clip (4: 1,024 tokens)")
    ap.add_argument("--seed-variants", default=None,
                    help="comma-separated seed-method variants (benchmarks/sparse_variants.py; default all, '' none)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from common import environment, write_results
    from dit_accel.attention import AttentionConfig, SparseRequest, sparse_self_attention
    from dit_accel.calibration.attention import AttentionRecorder
    from dit_accel.attention.reorder_paro import head_permutations
    from dit_accel.attention.select import select_blocks
    from dit_accel.attention.synthetic import KINDS, structured_qkv

    if args.quick:
        args.grid, args.heads, args.head_dim, args.block_size = "4,8,16", 5, 32, 32
        args.name += "_quick"
    if args.out:
        os.environ["OUT"] = args.out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = tuple(int(x) for x in args.grid.split(","))
    bs, heads, d = args.block_size, args.heads, args.head_dim
    densities = [float(x) for x in args.densities.split(",")]
    svg2 = {"q_clusters": 16, "k_clusters": 32} if args.quick else {}
    t0 = time.perf_counter()

    def stage(what: str) -> None:  # progress on stderr: where a slow run spends its time
        print(f"[{time.perf_counter() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)

    q, k, v = structured_qkv(grid, heads, d, seed=args.seed, device=device)
    auto = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    cq, ck, _ = structured_qkv(grid, heads, d, seed=args.seed + 1, device=device)  # calibration draw
    stage(f"inputs {tuple(q.shape)} {q.dtype} on {device}")
    with torch.no_grad():
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())   # exact for these inputs
    stage("dense reference")

    base = AttentionConfig.from_dict({"block_size": bs, "warmup_steps": 0})
    recorder = AttentionRecorder(base, threshold=0.9)
    recorder.observe(0, cq, ck, grid, None)
    orders = recorder.paro_orders(1, {0: heads})
    perm = head_permutations(grid, orders[0], bs, device)
    stage("PARO orders calibrated")
    maps = {}
    for reorder, layer_orders in (("none", None), ("paro", orders)):
        rec = AttentionRecorder(base, threshold=0.9, orders=layer_orders, record_maps=True)
        rec.observe(0, cq, ck, grid, None)
        mean = rec.maps[0][0].to(device)
        maps[reorder] = mean / mean.sum(-1, keepdim=True)
    stage("static maps recorded")

    def run(method: str, reorder: str, compensate: bool, density: float | None):
        sparse = {"method": method}
        if method == "static":
            sparse["masks"] = {"grid": list(grid), "block_size": bs, "layers": {}}  # masks passed directly below
        elif density is not None:
            sparse["density"] = density
        cfg = AttentionConfig.from_dict({"block_size": bs, "warmup_steps": 0, "reorder": reorder,
                                         "compensate": compensate, "sparse": sparse, "svg2": svg2})
        request = SparseRequest(cfg, head_perm=perm if reorder == "paro" else None)
        if method == "static":
            eye = torch.eye(maps[reorder].shape[-1], dtype=torch.bool, device=device)
            request.static_mask = select_blocks(maps[reorder], threshold=0.9, density=density, always=eye)
        with torch.no_grad():
            result = sparse_self_attention(q, k, v, request)
        diff = (result.out.float() - dense.float()).pow(2).sum(dim=(0, 2, 3))
        per_head = (diff / dense.float().pow(2).sum(dim=(0, 2, 3))).sqrt().tolist()
        err = float((result.out.float() - dense.float()).norm() / dense.float().norm())
        return err, float(result.kept) / result.total, per_head

    rows = []
    for density in [*densities, None]:
        for method in ("xattention", "topp", "static"):
            for reorder in ("none", "paro", "svg2"):
                if method == "static" and reorder == "svg2":
                    continue  # static masks need a fixed token order
                for compensate in (False, True):
                    err, used, per_head = run(method, reorder, compensate, density)
                    rows.append({"method": method, "reorder": reorder, "compensate": compensate,
                                 "density": density, "used_density": used, "rel_l2": err,
                                 "rel_l2_per_head": per_head})
                    print(rows[-1], flush=True)
                    stage(f"row {len(rows)}")

    seed_rows, seed_md = seed_method_rows(args, q, k, v, dense, densities, perm, svg2, stage)

    def find(method, reorder, compensate, density):
        return next(r for r in rows if (r["method"], r["reorder"], r["compensate"], r["density"]) ==
                    (method, reorder, compensate, density))

    env = environment()
    md = [f"# Block-sparse attention accuracy vs dense ({env.get('gpu', 'cpu')})", "",
          f"Structured Q/K/V (`dit_accel.attention.synthetic.structured_qkv`, seed {args.seed}): grid {grid} = "
          f"{q.shape[2]:,} tokens, {heads} heads (kinds cycle temporal / spatial / row / local / semantic), D={d}, "
          f"block {bs}, "
          f"{str(q.dtype).replace('torch.', '')} (dense reference in float32 on the same values). "
          f"PARO orders and static masks calibrated on seed {args.seed + 1}: orders {list(orders[0])}.", "",
          "Relative L2 error of the output vs dense SDPA (lower is better); `+c` = SVG-EAR compensation. "
          "Fixed-density rows: every q-block keeps that share of kv-blocks plus its self block (the density "
          "used is a little higher).", "",
          "| density | method | none | none+c | paro | paro+c | svg2 | svg2+c | used density (none / paro / svg2) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for density in [*densities, None]:
        for method in ("xattention", "topp", "static"):
            cells, used = [], []
            for reorder in ("none", "paro", "svg2"):
                for compensate in (False, True):
                    if method == "static" and reorder == "svg2":
                        cells.append("—")
                        continue
                    r = find(method, reorder, compensate, density)
                    cells.append(f"{r['rel_l2']:.4f}")
                    if not compensate:
                        used.append(f"{r['used_density']:.3f}")
            label = f"{density:.2f}" if density is not None else "threshold 0.9"
            md.append(f"| {label} | {method} | " + " | ".join(cells) + f" | {' / '.join(used)} |")
    kinds = [KINDS[i % len(KINDS)] for i in range(heads)]
    mid = densities[min(1, len(densities) - 1)]   # the middle density of the default 0.5 / 0.25 / 0.15
    md += ["", f"Per head kind (mean relative L2 over the heads of that kind), top-p at density {mid:.2f}:", "",
           "| head kind | none | paro | svg2 |", "|---|---|---|---|"]
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        cells = [sum(find("topp", r, False, mid)["rel_l2_per_head"][i] for i in idx) / len(idx)
                 for r in ("none", "paro", "svg2")]
        md.append(f"| {kind} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    wins = []
    for density in densities:
        for method in ("xattention", "topp", "static"):
            none = find(method, "none", False, density)["rel_l2"]
            best = min(find(method, r, False, density)["rel_l2"] for r in ("paro", "svg2")
                       if not (method == "static" and r == "svg2"))
            wins.append(best < none)
    md += ["", f"Reordering (best of PARO / SVG2) beats the natural order at equal density in {sum(wins)} of "
               f"{len(wins)} (method, density) cases."]
    md += seed_md
    payload = {"environment": env, "args": vars(args), "paro_orders": list(orders[0]), "rows": rows,
               "seed_rows": seed_rows}
    if args.zoo:
        zoo_rows, zoo_md = zoo_accuracy(args, densities)
        payload["zoo_rows"] = zoo_rows
        md += zoo_md
    md += ["", "```", *(f"{k}: {v}" for k, v in env.items()), "```", ""]
    write_results(args.name, payload, "\n".join(md))


def seed_method_rows(args, q, k, v, dense, densities, perm, svg2, stage):
    """Every seed-method variant (``sparse_variants.SEED_VARIANTS``) at each density, natural order and PARO."""
    import torch

    from dit_accel.attention import AttentionConfig, SparseRequest, sparse_self_attention
    from dit_accel.config import PolicyError
    from sparse_variants import SEED_VARIANTS, TWO_CALL, section

    names = list(SEED_VARIANTS) if args.seed_variants is None else [n for n in args.seed_variants.split(",") if n]
    rows = []
    for density in [*densities, None]:
        for name in names:
            for reorder in ("none", "paro"):
                base = {"block_size": args.block_size, "warmup_steps": 0, "svg2": svg2}
                cfg_dict = section(name, density, base)
                if reorder == "paro":
                    if cfg_dict.get("reorder", "none") != "none":
                        continue  # the variant brings its own order (PBS)
                    cfg_dict["reorder"] = "paro"
                try:
                    cfg = AttentionConfig.from_dict(cfg_dict)
                    request = SparseRequest(cfg, head_perm=perm if reorder == "paro" else None)
                    with torch.no_grad():
                        result = sparse_self_attention(q, k, v, request)
                        if name in TWO_CALL:  # the first call searched (and was dense); measure the reuse
                            result = sparse_self_attention(q, k, v, request)
                except (PolicyError, ValueError) as err:
                    print(f"seed {name} {reorder} {density}: not run ({err})", file=sys.stderr, flush=True)
                    continue
                err = float((result.out.float() - dense.float()).norm() / dense.float().norm())
                rows.append({"variant": name, "reorder": reorder, "density": density, "rel_l2": err,
                             "used_density": float(result.kept) / result.total})
                print(rows[-1], flush=True)
        stage(f"seed methods at density {density}")
    md = ["", "## Seed methods (issue #23 variants, `benchmarks/sparse_variants.py`)", "",
          "Relative L2 vs dense and the density used (pooled PSA pairs count 1/factor), natural order and PARO. "
          "AdaSpa: the second call on the same inputs (the first searched with a dense pass).", "",
          "| density asked | variant | none | paro | used (none / paro) |", "|---|---|---|---|---|"]
    for density in [*densities, None]:
        for name in names:
            got = {r["reorder"]: r for r in rows if (r["variant"], r["density"]) == (name, density)}
            if not got:
                continue
            cell = lambda r: "—" if r is None else f"{r['rel_l2']:.4f}"  # noqa: E731
            used = " / ".join(f"{got[r]['used_density']:.3f}" for r in ("none", "paro") if r in got)
            label = f"{density:.2f}" if density is not None else "own threshold"
            md.append(f"| {label} | {name} | {cell(got.get('none'))} | {cell(got.get('paro'))} | {used} |")
    best = [r for r in rows if r["density"] == 0.25]
    if best:
        top = min(best, key=lambda r: r["rel_l2"])
        md += ["", f"Best at density 0.25: {top['variant']} ({top['reorder']}) {top['rel_l2']:.4f} "
                   f"(used {top['used_density']:.3f})."]
    return rows, md


def record_zoo_attention(pipe, step: int, steps: int, block_size: int, call: dict) -> dict:
    """{layer: (q, k, v, grid)} of every self-attention call at ``step`` of one generation."""
    import torch

    from dit_accel.calibration.attention import observe_attention

    seen = {}

    def capture(layer, at, q, k, v, grid, scale):
        if at == step:
            seen[layer] = (q.clone(), k.clone(), v.clone(), tuple(grid))

    with observe_attention(pipe, capture, block_size=block_size), torch.no_grad():
        pipe(num_inference_steps=steps, **call)
    return seen


def zoo_accuracy(args, densities):
    """Relative L2 of sparse vs dense attention on a trained model's recorded q, k, v (mean over layers)."""
    import torch
    import torch.nn.functional as F

    import dit_accel
    from dit_accel import zoo
    from dit_accel.attention import AttentionConfig, SparseRequest, sparse_self_attention
    from dit_accel.attention.reorder_paro import head_permutations

    pipe = zoo.load(args.zoo)
    pipe.set_progress_bar_config(disable=True)
    video = {"num_frames": args.zoo_frames} if args.zoo == "digits_wan" else {}  # text-conditioned: class prompts
    bs = args.zoo_block_size
    layers = record_zoo_attention(pipe, args.zoo_step, args.zoo_steps, bs,
                                  {**zoo.class_conditions(pipe, [0, 3, 5, 8]), **video,
                                   "generator": torch.Generator().manual_seed(0)})
    policy = {"name": "paro", "attention": {"reorder": "paro", "block_size": bs, "warmup_steps": 1,
                                            "sparse": {"method": "topp"}}}
    calibrated = dit_accel.calibrate(pipe, [zoo.class_conditions(pipe, [1, 7])], policy,
                                     num_inference_steps=args.zoo_steps, generator=torch.Generator().manual_seed(1),
                                     **video)
    orders = calibrated.attention.paro_orders
    rows = []
    for density in densities:
        for method in ("xattention", "topp"):
            for reorder in ("none", "paro", "svg2"):
                errs, used = [], []
                for layer, (q, k, v, grid) in sorted(layers.items()):
                    cfg = AttentionConfig.from_dict({"block_size": bs, "warmup_steps": 0, "reorder": reorder,
                                                     "sparse": {"method": method, "density": density,
                                                                "stride": min(8, bs)},
                                                     "svg2": {"q_clusters": 16, "k_clusters": 32}})
                    perm = head_permutations(grid, orders[layer], bs, q.device) if reorder == "paro" else None
                    with torch.no_grad():
                        result = sparse_self_attention(q, k, v, SparseRequest(cfg, head_perm=perm))
                        # exact for these inputs
                        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                    errs.append(float((result.out - dense).norm() / dense.norm()))
                    used.append(float(result.kept) / result.total)
                rows.append({"method": method, "reorder": reorder, "density": density,
                             "rel_l2": sum(errs) / len(errs), "used_density": sum(used) / len(used)})
                print("zoo", rows[-1], flush=True)
    from sparse_variants import SEED_VARIANTS, TWO_CALL, section

    names = list(SEED_VARIANTS) if args.seed_variants is None else [n for n in args.seed_variants.split(",") if n]
    seed_rows = []
    for density in densities:
        for name in names:
            for reorder in ("none", "paro"):
                cfg_dict = section(name, density, {"block_size": bs, "warmup_steps": 0,
                                                   "svg2": {"q_clusters": 16, "k_clusters": 32}})
                cfg_dict["sparse"].setdefault("stride", min(8, bs))
                if reorder == "paro":
                    if cfg_dict.get("reorder", "none") != "none" or cfg_dict["sparse"]["method"] == "proxy":
                        continue
                    cfg_dict["reorder"] = "paro"
                errs, used = [], []
                for layer, (q, k, v, grid) in sorted(layers.items()):
                    cfg = AttentionConfig.from_dict(cfg_dict)
                    if cfg.sparse.method == "proxy":
                        cfg = cfg.replace(sparse={**cfg.sparse.to_dict(), "proxy_heads": min(cfg.sparse.proxy_heads,
                                                                                             q.shape[1])})
                    perm = head_permutations(grid, orders[layer], bs, q.device) if reorder == "paro" else None
                    request = SparseRequest(cfg, head_perm=perm)
                    with torch.no_grad():
                        result = sparse_self_attention(q, k, v, request)
                        if name in TWO_CALL:
                            result = sparse_self_attention(q, k, v, request)
                        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                    errs.append(float((result.out.float() - dense).norm() / dense.norm()))
                    used.append(float(result.kept) / result.total)
                seed_rows.append({"variant": name, "reorder": reorder, "density": density,
                                  "rel_l2": sum(errs) / len(errs), "used_density": sum(used) / len(used)})
                print("zoo seed", seed_rows[-1], flush=True)
    rows += [{**r, "seed": True} for r in seed_rows]  # seed rows: "variant" instead of "method"
    grid = next(iter(layers.values()))[3]
    md = ["", f"## Real attention: `{args.zoo}` (trained reference model)", "",
          f"Self-attention q, k, v of its {len(layers)} layers at step {args.zoo_step} of {args.zoo_steps} "
          "(labels 0, 3, "
          f"5, 8 with CFG: batch 8), grid {grid}, block {args.zoo_block_size}; PARO orders calibrated on labels 1, 7: "
          f"{[list(o) for o in orders]}. Mean relative L2 over layers.", "",
          "| density | method | none | paro | svg2 | used density (none / paro / svg2) |", "|---|---|---|---|---|---|"]
    for density in densities:
        for method in ("xattention", "topp"):
            sel = [next(r for r in rows if (r.get("method"), r["reorder"], r["density"]) == (method, reorder, density))
                   for reorder in ("none", "paro", "svg2")]
            md.append(f"| {density:.2f} | {method} | " + " | ".join(f"{r['rel_l2']:.4f}" for r in sel)
                      + " | " + " / ".join(f"{r['used_density']:.3f}" for r in sel) + " |")
    if seed_rows:
        md += ["", f"Seed methods on `{args.zoo}`'s attention (mean relative L2 over layers; AdaSpa: the second call "
                   "on the same q, k, v):", "",
               "| density asked | variant | none | paro | used (none / paro) |", "|---|---|---|---|---|"]
        for density in densities:
            for name in names:
                got = {r["reorder"]: r for r in seed_rows if (r["variant"], r["density"]) == (name, density)}
                cell = lambda r: "—" if r is None else f"{r['rel_l2']:.4f}"  # noqa: E731
                used = " / ".join(f"{got[r]['used_density']:.3f}" for r in ("none", "paro") if r in got)
                md.append(f"| {density:.2f} | {name} | {cell(got.get('none'))} | {cell(got.get('paro'))} | {used} |")
    return rows, md


if __name__ == "__main__":
    main()
