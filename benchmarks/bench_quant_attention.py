"""Quantized attention (dit_accel, SageAttention-style) vs cuDNN bf16 SDPA vs sageattention 1.0.6,
sparse+quant vs bf16 block-sparse, and torchao FP8 linears on a FLUX-shaped transformer — one run.

Attention (B=1, D=128, bf16 in/out, non-causal), at S = 4,608 (FLUX 1024², H=24), 32,760 (Wan
480p, H=12) and 75,600 (HunyuanVideo 720p, H=24):

* ``cudnn``      — ``scaled_dot_product_attention`` under ``sdpa_kernel([CUDNN_ATTENTION])`` (the bar);
* ``int8``       — ``quant_attention(mode="int8")``: INT8 QKᵀ (smoothed K), 16-bit P·V (default);
* ``int8_pv8``   — ``quant_attention(mode="int8", pv="fp8")``: INT8 QKᵀ, FP8 P·V;
* ``fp8``        — ``quant_attention(mode="fp8")``: FP8 Q, K, V;
* ``sage1``      — ``sageattention.sageattn`` 1.0.6 (Triton INT8 QK, FP16 PV), when importable;
* at 25% block density (128×128 blocks, random, the same mask for both): ``bsa_bf16`` (dit_accel's
  bf16 block-sparse kernel) vs ``sparse_int8`` / ``sparse_int8_pv8`` (the quantized kernel with the table).

Reported per variant: median ms (CUDA events, variants interleaved per round after warm-up, which
includes Triton autotuning), TFLOP/s (dense: 4·B·H·S²·D / time; sparse: *useful*, the kept pairs
only), speed ratio vs cuDNN (and vs ``bsa_bf16`` for the sparse rows), and accuracy: mean relative
L1 of the output vs cuDNN's bf16 output (sparse rows: vs ``bsa_bf16`` with the same mask).

FLUX.1-dev-shaped transformer (diffusers ``FluxTransformer2DModel`` default config: 19 double + 38
single blocks, random weights, bf16, 1024² = 4,096 image + 512 text tokens): one forward (= one
denoising step) for ``bf16`` (cuDNN attention), ``fp8_linear`` (torchao ``fp8_dynamic`` per-row
on the block linears through :func:`dit_accel.quant.quantize_linears`), ``int8_attn`` (our
INT8 attention routed in for ``F.scaled_dot_product_attention`` — a benchmark-only
``TorchFunctionMode``; the package's attention integration lives in ``dit_accel/attention``) and
``fp8_linear+int8_attn``; plus the relative L1 of each output vs ``bf16``. ``--compile`` also
times each variant with diffusers' ``compile_repeated_blocks()`` (torchao's FP8 needs inductor to
fuse the activation quantization; eager FP8 pays unfused casts).

    python benchmarks/bench_quant_attention.py --out OUT_DIR            # everything, H100/H200, < 5 min
    python benchmarks/bench_quant_attention.py --skip-flux --seq-lens 4608 --heads 24
    python benchmarks/bench_quant_attention.py --quick                  # tiny shapes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if "--quick" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: run the kernels on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import reps_for, time_call  # noqa: E402

DENSE_VARIANTS = ("cudnn", "int8", "int8_pv8", "fp8", "sage1")
SPARSE_VARIANTS = ("bsa_bf16", "sparse_int8", "sparse_int8_pv8")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="4608,32760,75600")
    ap.add_argument("--heads", default="24,12,24", help="one H per S")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.25, help="kept block share of the sparse rows")
    ap.add_argument("--block", type=int, default=128, help="block-table granularity of the sparse rows")
    ap.add_argument("--variants", default=",".join(DENSE_VARIANTS + SPARSE_VARIANTS))
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per variant (include autotuning)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per variant, interleaved")
    ap.add_argument("--min-ms", type=float, default=20.0, help="each timed sample repeats a call to last this long")
    ap.add_argument("--skip-flux", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time compiled FLUX variants (compile_repeated_blocks)")
    ap.add_argument("--flux-rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for quant_attention.json / .md (default: $OUT or "
                                                "benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (interpreted kernels), seconds")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_lens, args.heads, args.head_dim, args.block = "136", "1", 64, 32
        args.warmup, args.rounds, args.min_ms, args.flux_rounds = 1, 1, 0.0, 1
    return args


# ----------------------------------------------------------------------------- helpers


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().sum() / b.abs().sum().clamp_min(1e-30)).item()


def run_interleaved(fns: dict, warmup: int, rounds: int, min_ms: float) -> tuple[dict, dict, dict]:
    """Warm up each variant (errors are reported, not fatal), then time them interleaved per round."""
    outs, errors = {}, {}
    for name, fn in list(fns.items()):
        try:
            for _ in range(max(1, warmup)):
                outs[name] = fn()
            sync()
        except Exception as exc:  # a variant that cannot run here: report and go on
            errors[name] = f"{type(exc).__name__}: {exc}"[:400]
            print(f"  {name} failed: {errors[name]}", flush=True)
            del fns[name]
    reps = {name: reps_for(fn, min_ms) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_call(fn, reps[name]))
    return {n: statistics.median(s) for n, s in samples.items()}, outs, errors


def timed_row(row: dict, fns: dict, flops: float, ref: str, baselines: dict, args) -> dict:
    """Time ``fns`` interleaved into ``row`` (``errors`` and one entry per variant: ms, TFLOP/s, speed-up
    ``vs_<name>`` over ``baselines`` (name -> ms) and ``ref``, relative L1 vs ``ref``'s output); returns ms."""
    ms, outs, errors = run_interleaved(fns, args.warmup, args.rounds, args.min_ms)
    row["errors"] = errors
    speeds = {**baselines, **({ref: ms[ref]} if ref in ms else {})}
    for name, t in ms.items():
        row[name] = {"ms": t, "tflops": flops / t / 1e9, **{f"vs_{b}": base / t for b, base in speeds.items()}}
        if ref in outs and name != ref:
            row[name][f"rel_l1_vs_{ref}"] = rel_l1(outs[name], outs[ref])
    outs.clear()
    return ms


def environment(args) -> dict:
    import diffusers

    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for mod in ("triton", "torchao", "sageattention"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", None) or _dist_version(mod)
        except Exception:
            env[mod] = "not installed"
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    return env


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "?"


# ----------------------------------------------------------------------------- attention


def attention_rows(args, variants, device) -> list[dict]:
    from bench_block_sparse import kept_pairs, make_block_mask
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dit_accel.kernels import block_sparse_attention, mask_to_block_table
    from dit_accel.kernels.quant_attention import quant_attention

    sage = None
    if "sage1" in variants and device == "cuda":
        try:
            from sageattention import sageattn as sage
        except Exception as exc:
            print(f"sageattention not importable: {exc}", flush=True)
    rows = []
    dtype = torch.bfloat16
    for S, H in zip([int(s) for s in args.seq_lens.split(",")], [int(h) for h in args.heads.split(",")]):
        B, D = 1, args.head_dim
        g = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        flops = 4.0 * B * H * S * S * D
        bm, bn = (32, 16) if args.quick else (128, 64)

        def cudnn():
            if device != "cuda":
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)

        dense = {"cudnn": cudnn,
                 "int8": lambda: quant_attention(q, k, v, block_m=bm, block_n=bn, mode="int8", pv="fp16"),
                 "int8_pv8": lambda: quant_attention(q, k, v, block_m=bm, block_n=bn, mode="int8", pv="fp8"),
                 "fp8": lambda: quant_attention(q, k, v, block_m=bm, block_n=bn, mode="fp8", pv="fp8")}
        if sage is not None:
            dense["sage1"] = lambda: sage(q, k, v, tensor_layout="HND", is_causal=False)
        dense = {n: f for n, f in dense.items() if n in variants}
        print(f"S={S} H={H}: dense {list(dense)}", flush=True)
        row = {"S": S, "H": H, "B": B, "D": D, "kind": "dense", "density": 1.0}
        ms = timed_row(row, dense, flops, "cudnn", {}, args)
        rows.append(row)
        print(json.dumps(row), flush=True)

        sparse_names = [n for n in SPARSE_VARIANTS if n in variants]
        if sparse_names:
            blk = args.block
            mask = make_block_mask(B, H, S, blk, args.density, args.seed, device)
            idx, cnt = mask_to_block_table(mask)
            useful = 4.0 * D * kept_pairs(mask, S, blk)
            sparse = {"bsa_bf16": lambda: block_sparse_attention(q, k, v, idx, cnt, block_m=blk, block_n=blk),
                      "sparse_int8": lambda: quant_attention(q, k, v, idx, cnt, block_m=blk, block_n=blk,
                                                             mode="int8", pv="fp16"),
                      "sparse_int8_pv8": lambda: quant_attention(q, k, v, idx, cnt, block_m=blk, block_n=blk,
                                                                 mode="int8", pv="fp8")}
            sparse = {n: sparse[n] for n in sparse_names}
            print(f"S={S} H={H}: sparse {list(sparse)} at density {args.density}", flush=True)
            srow = {"S": S, "H": H, "B": B, "D": D, "kind": "sparse", "density": args.density,
                    "actual_density": float(mask.float().mean()), "block": blk}
            timed_row(srow, sparse, useful, "bsa_bf16", {"cudnn": ms["cudnn"]} if "cudnn" in ms else {}, args)
            rows.append(srow)
            print(json.dumps(srow), flush=True)
        q = k = v = None  # free before the next shape
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- FLUX


class QuantSDPA(torch.overrides.TorchFunctionMode):
    """Benchmark-only: send plain ``F.scaled_dot_product_attention`` calls (no mask, no dropout, not
    causal, one q/kv length) to ``quant_attention``; everything else passes through."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            a = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
            q, k, v = a.get("query"), a.get("key"), a.get("value")
            plain = (a.get("attn_mask") is None and not a.get("dropout_p") and not a.get("is_causal")
                     and not a.get("enable_gqa") and q.shape == k.shape == v.shape and q.dim() == 4
                     and q.shape[-1] in (32, 64, 128) and q.dtype in (torch.float16, torch.bfloat16))
            if plain:
                from dit_accel.kernels.quant_attention import quant_attention

                self.calls += 1
                # Outside any torch.compile graph (--compile): the Triton launch stays eager.
                return torch.compiler.disable(quant_attention)(q, k, v, sm_scale=a.get("scale"), **self.kwargs)
        return func(*args, **kwargs)


def flux_rows(args, device) -> list[dict]:
    from diffusers import FluxTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dit_accel.quant import quantize_linears

    dtype = torch.bfloat16
    if args.quick:  # a tiny Flux: plumbing only
        config = dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                      joint_attention_dim=64, pooled_projection_dim=32, in_channels=16, axes_dims_rope=(8, 12, 12))
        img, txt, linear_mode, qblocks = 64, 16, "int8_weight_only", dict(block_m=32, block_n=16)
    else:  # FLUX.1-dev: diffusers' default config
        config, img, txt, linear_mode, qblocks = {}, 4096, 512, "fp8_dynamic", {}
    with torch.device(device):
        torch.manual_seed(args.seed)
        tr = FluxTransformer2DModel(**config).to(dtype).eval()
    cfg = tr.config
    g = torch.Generator(device=device).manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, img, cfg.in_channels, device=device, dtype=dtype, generator=g),
                  encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, device=device, dtype=dtype,
                                                    generator=g),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype,
                                                 generator=g),
                  timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                  img_ids=torch.zeros(img, 3, device=device, dtype=dtype),
                  txt_ids=torch.zeros(txt, 3, device=device, dtype=dtype),
                  guidance=torch.full((1,), 3.5, device=device, dtype=dtype) if cfg.guidance_embeds else None,
                  return_dict=False)
    side = int(math.isqrt(img))
    inputs["img_ids"][:, 1] = torch.arange(img, device=device) // side
    inputs["img_ids"][:, 2] = torch.arange(img, device=device) % side

    def forward(quant_attn: bool):
        def call():
            with torch.inference_mode():
                if quant_attn:
                    with QuantSDPA(mode="int8", **qblocks):
                        return tr(**inputs)[0]
                if device == "cuda":
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                      SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
                        return tr(**inputs)[0]
                return tr(**inputs)[0]
        return call

    rows = []
    params = sum(p.numel() for p in tr.parameters())
    for compiled in ([False, True] if args.compile else [False]):
        if compiled:
            tr.compile_repeated_blocks(fullgraph=False)
        results = {}
        outs = {}
        for quant_linear in (False, True):
            handle = None
            lin = "int8wo_linear" if args.quick else "fp8_linear"
            if quant_linear:
                t0 = time.perf_counter()
                try:
                    handle = quantize_linears(tr, linear_mode, keep_originals="device")
                except Exception as exc:  # e.g. torchao missing or incompatible: report, keep the rest
                    err = f"{type(exc).__name__}: {exc}"[:400]
                    print(f"linear quantization failed: {err}", flush=True)
                    results.update({lin: {"error": err}, f"{lin}+int8_attn": {"error": err}})
                    continue
                print(f"quantized {len(handle.quantized)} linears ({linear_mode}) in {time.perf_counter() - t0:.1f}s; "
                      f"{len(handle.skipped)} skipped", flush=True)
            if quant_linear:
                fns = {lin: forward(False), f"{lin}+int8_attn": forward(True)}
            else:
                fns = {"bf16": forward(False), "int8_attn": forward(True)}
            ms, o, errors = run_interleaved(fns, args.warmup, args.flux_rounds, 0.0)
            results.update({n: {"ms": t} for n, t in ms.items()})
            results.update({n: {"error": e} for n, e in errors.items()})
            outs.update(o)
            if handle is not None:
                handle.restore()
        base = outs.get("bf16")
        for name, r in results.items():
            if base is not None and name in outs:
                r["rel_l1_vs_bf16"] = rel_l1(outs[name], base)
            if "ms" in r and "bf16" in results and "ms" in results["bf16"]:
                r["speedup_vs_bf16"] = results["bf16"]["ms"] / r["ms"]
        row = {"kind": "flux", "compiled": compiled, "params": params, "image_tokens": img, "text_tokens": txt,
               "variants": results}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- report


def render_markdown(rows, env, args) -> str:
    md = [f"# Quantized attention and FP8 linears ({env['gpu']})", "",
          f"bf16 inputs, B=1, D={args.head_dim}; median of {args.rounds} interleaved rounds after {args.warmup} "
          "warm-up calls (autotuning included in the warm-up); TFLOP/s = 4·B·H·S²·D / time (sparse: kept pairs "
          "only); accuracy = mean relative L1 vs cuDNN bf16 (sparse: vs dit_accel's bf16 block-sparse kernel, "
          "same mask).", ""]
    if any(r["kind"] in ("dense", "sparse") for r in rows):
        md += ["| S | H | kind | variant | ms | TFLOP/s | vs cuDNN | vs bf16 sparse | rel L1 |",
               "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "flux":
            continue
        kind = "dense" if r["kind"] == "dense" else f"sparse {r['density']:.2f}"
        for name in DENSE_VARIANTS + SPARSE_VARIANTS:
            if name in r:
                v = r[name]
                err = v.get("rel_l1_vs_cudnn", v.get("rel_l1_vs_bsa_bf16"))
                cells = [f"{r['S']:,}", str(r["H"]), kind, name, f"{v['ms']:.3f}", f"{v['tflops']:.0f}",
                         f"{v['vs_cudnn']:.2f}x" if "vs_cudnn" in v else "—",
                         f"{v['vs_bsa_bf16']:.2f}x" if "vs_bsa_bf16" in v else "—",
                         f"{err:.4f}" if err is not None else "—"]
                md.append("| " + " | ".join(cells) + " |")
            elif name in r.get("errors", {}):
                md.append(f"| {r['S']:,} | {r['H']} | {kind} | {name} | failed: {r['errors'][name][:80]} | | | | |")
    md += [f"\nFLUX part failed: {r['error']}" for r in rows if r["kind"] == "flux_error"]
    flux = [r for r in rows if r["kind"] == "flux"]
    if flux:
        md += ["", f"## FLUX-shaped transformer, one step ({flux[0]['params'] / 1e9:.1f}B params, "
                   f"{flux[0]['image_tokens']} image + {flux[0]['text_tokens']} text tokens)", "",
               "| compiled | variant | ms/step | speedup vs bf16 | rel L1 vs bf16 |", "|---|---|---|---|---|"]
        for r in flux:
            for name, v in r["variants"].items():
                if "ms" in v:
                    md.append(f"| {r['compiled']} | {name} | {v['ms']:.2f} | {v.get('speedup_vs_bf16', 1.0):.2f}x | "
                              f"{v.get('rel_l1_vs_bf16', 0.0):.4f} |")
                else:
                    md.append(f"| {r['compiled']} | {name} | failed: {v['error'][:100]} | | |")
    md += ["", "```", *(f"{k}: {v}" for k, v in env.items()), "```", ""]
    return "\n".join(md)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu" and not args.quick:
        raise SystemExit("bench_quant_attention.py needs a CUDA GPU (use --quick for a CPU plumbing check)")
    variants = set(args.variants.split(","))
    t0 = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    name = "quant_attention_quick" if args.quick else "quant_attention"

    def save(rows) -> str:
        env = environment(args)
        env["wall_s"] = round(time.perf_counter() - t0, 1)
        (out / f"{name}.json").write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows},
                                                     indent=2))
        md = render_markdown(rows, env, args)
        (out / f"{name}.md").write_text(md)
        return md

    rows = []
    if not args.skip_attention:
        rows += attention_rows(args, variants, device)
        save(rows)  # kept if the FLUX part fails
    if not args.skip_flux:
        try:
            rows += flux_rows(args, device)
        except Exception as exc:
            rows.append({"kind": "flux_error", "error": f"{type(exc).__name__}: {exc}"[:1000]})
            print(f"FLUX part failed: {rows[-1]['error']}", flush=True)
    print(save(rows))


if __name__ == "__main__":
    main()
