"""Scratch, same-run A/B: v0 = HEAD kernels, v1 = tail-tile-only masking, v2 = v1 + kv index loaded one iteration ahead."""
import sys, os, json, time, importlib
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "v"))
import torch, triton
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from benchmarks.common import time_call, reps_for
mods = {n: importlib.import_module(n) for n in ("bsa_v0", "bsa_v1", "bsa_v2", "qa_v0", "qa_v1")}
res = []
def log(**kw):
    print(json.dumps(kw), flush=True); res.append(kw)
def med(fn, r, n=5):
    return sorted(time_call(fn, r) for _ in range(n))[n // 2]

for S, H, dens in [(32760, 12, (1.0, 0.25)), (75600, 24, (1.0, 0.25)), (4608, 24, (0.25,))]:
    D = 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sm = D ** -0.5; qk_scale = sm * 1.4426950408889634
    nb = triton.cdiv(S, 128)
    fl = 4 * H * S * S * D
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        f_cudnn = lambda: F.scaled_dot_product_attention(q, k, v)
        ref = f_cudnn()
    fns = {"cudnn": (f_cudnn, fl)}
    for d in dens:
        keep = max(1, round(d * nb))
        g = torch.Generator(device="cuda").manual_seed(2)
        idx = torch.rand(1, H, nb, nb, generator=g, device="cuda").argsort(-1)[..., :keep].sort(-1).values.int().contiguous()
        cnt = torch.full((1, H, nb), keep, dtype=torch.int32, device="cuda")
        kept = keep / nb
        for n in ("bsa_v0", "bsa_v1", "bsa_v2"):
            m = mods[n]
            fns[f"{n}_d{d}"] = ((lambda m=m, idx=idx, cnt=cnt: m.block_sparse_attention_triton(
                q, k, v, idx, cnt, block_m=128, block_n=128, qk_scale=qk_scale, interpret=False, return_lse=False)[0]),
                fl * kept)
        if d < 1.0:
            for n in ("qa_v0", "qa_v1"):
                m = mods[n]
                fns[f"{n}_int8pv8_d{d}"] = ((lambda m=m, idx=idx, cnt=cnt: m.quant_attention_triton(
                    q, k, v, idx, cnt, block_m=128, block_n=128, qk_scale=qk_scale, sm_scale=sm, qk_fp8=False,
                    pv_fp8=True, smooth_k=True, interpret=False, return_lse=False)[0]), fl * kept)
    if S != 4608:
        for n in ("qa_v0", "qa_v1"):
            m = mods[n]
            for mode, qf, pf in (("int8", False, False), ("int8pv8", False, True), ("fp8", True, True)):
                fns[f"{n}_{mode}_dense"] = ((lambda m=m, qf=qf, pf=pf: m.quant_attention_triton(
                    q, k, v, None, None, block_m=128, block_n=64, qk_scale=qk_scale, sm_scale=sm, qk_fp8=qf,
                    pv_fp8=pf, smooth_k=True, interpret=False, return_lse=False)[0]), fl)
    else:  # where the time of the 25% sparse+quant call goes at 4,608 tokens
        m = mods["qa_v1"]
        fns["qa_v1_quant_passes_only"] = ((lambda: (m.quantize_kv_triton(k, v, kgran=128, k_fp8=False, v_fp8=True,
            smooth_k=True, interpret=False), m.quantize_q_triton(q, k.new_zeros(H, D, dtype=torch.float32), nb * 128,
            qk_scale=qk_scale, sm_scale=sm, q_fp8=False, with_km=False, interpret=False))), 0)
    t0 = time.time()
    for name, (fn, f) in fns.items():
        out = fn()
        torch.cuda.synchronize()
        if isinstance(out, torch.Tensor) and "d0.25" not in name and "sparse" not in name:
            err = ((out.float() - ref.float()).abs().mean() / ref.float().abs().mean()).item()
            log(S=S, what=name, rel_l1_vs_cudnn=err)
    log(S=S, warm_s=time.time() - t0)
    reps = {name: reps_for(fn, 30) for name, (fn, f) in fns.items()}
    times = {name: [] for name in fns}
    for rnd in range(3):
        for name, (fn, f) in fns.items():
            times[name].append(med(fn, reps[name], 3))
    base = sorted(times["cudnn"])[1]
    for name, (fn, f) in fns.items():
        t = sorted(times[name])[1]
        # host-side cost per call (wall time of 50 launches without sync, then sync)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(20): fn()
        host = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        log(S=S, H=H, what=name, ms=t, spread=[min(times[name]), max(times[name])], tflops=(f / t / 1e9) if f else None,
            vs_cudnn=base / t, host_ms_per_call=host)
    del q, k, v, ref, fns
    torch.cuda.empty_cache()
if os.environ.get("OUT"):
    json.dump(res, open(os.path.join(os.environ["OUT"], "var_exp.json"), "w"), indent=1)
