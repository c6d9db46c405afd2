"""Scratch: kernel variant sweep on the GPU (decides defaults; not a committed benchmark)."""
import json, math, os, statistics, sys, time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), ".incx"))
import dit_accel.kernels._block_sparse_triton as bst
import dit_accel.kernels._quant_attention_triton as qat
import old_qattn
from dit_accel.kernels import block_sparse_attention, mask_to_block_table
from dit_accel.kernels.quant_attention import quant_attention

OUT = os.environ.get("OUT", "/tmp")
rows = []
LOG2E = 1.4426950408889634

def bench(fn, min_ms=25.0, reps=5):
    fn(); fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record(); fn(); e.record(); torch.cuda.synchronize()
    n = max(1, math.ceil(min_ms / max(s.elapsed_time(e), 1e-3)))
    ts = []
    for _ in range(reps):
        s.record()
        for _ in range(n): fn()
        e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / n)
    return statistics.median(ts)

def rel_l1(a, b):
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()

def cfgs(jitted):
    c = getattr(jitted, "configs_timings", None) or {}
    return {f"{k.kwargs['BLOCK_M']}x{k.kwargs['BLOCK_N']}w{k.num_warps}s{k.num_stages}": round(float(v[0] if isinstance(v, (list, tuple)) else v), 3) for k, v in c.items()}

def rec(**r):
    rows.append(r); print(json.dumps(r), flush=True)
    json.dump(rows, open(os.path.join(OUT, "sweep.json"), "w"), indent=1)

which = sys.argv[1] if len(sys.argv) > 1 else "all"
shapes = [(32760, 12), (75600, 24)]
for S, H in shapes:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops_dense = 4 * H * S * S * 128
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = F.scaled_dot_product_attention(q, k, v)
        t = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    rec(S=S, H=H, kernel="cudnn", ms=t, tflops=flops_dense / t / 1e9)
    nb = math.ceil(S / 128)
    g = torch.Generator().manual_seed(0)
    keep = round(0.25 * nb)
    top = torch.rand(1, H, nb, nb, generator=g).topk(keep, -1).indices
    mask = torch.zeros(1, H, nb, nb, dtype=torch.bool).scatter_(-1, top, True).cuda()
    idx, cnt = mask_to_block_table(mask)
    sizes = torch.full((nb,), 128.0, device="cuda"); sizes[-1] = S - 128 * (nb - 1)
    pairs = torch.einsum("bhqk,q,k->", mask.double(), sizes.double(), sizes.double()).item()
    didx, dcnt = mask_to_block_table(torch.ones(1, H, nb, nb, dtype=torch.bool, device="cuda"))
    if which in ("all", "bsa"):
        for tma in (False, True):
            bst.USE_TMA = tma
            for dens, (ii, cc) in (("1.0", (didx, dcnt)), ("0.25", (idx, cnt))):
                try:
                    f = lambda: block_sparse_attention(q, k, v, ii, cc)
                    o = f(); t = bench(f)
                    fl = flops_dense if dens == "1.0" else 4 * 128 * pairs
                    rec(S=S, H=H, kernel="bsa", tma=tma, density=dens, ms=t, tflops=fl / t / 1e9,
                        vs_cudnn_dense=rows[0]["ms"] / t if False else None,
                        err=rel_l1(o, ref) if dens == "1.0" else None, cfg=cfgs(bst._KERNELS["cuda"]))
                except Exception as ex:
                    rec(S=S, H=H, kernel="bsa", tma=tma, density=dens, error=repr(ex)[:300])
    if which in ("all", "quant", "emu"):
        scale = 1 / math.sqrt(128)
        mods = (("old", old_qattn), ("new", qat)) if which != "emu" else (("new", qat),)
        for mod_name, mod in mods:
            for mode, pv in (("int8", "fp16"), ("int8", "fp8"), ("fp8", "fp8")):
                variants = [dict()] if mod_name == "old" else [dict(tma=True, pack=False, emu=False), dict(tma=True, pack=False, emu=True)] if which == "emu" else (
                    [dict(tma=False, pack=False), dict(tma=True, pack=False), dict(tma=False, pack=True), dict(tma=True, pack=True)]
                    if pv == "fp16" else [dict(tma=False, pack=False), dict(tma=True, pack=False)])
                for var in variants:
                    if mod_name == "new":
                        qat.USE_TMA, qat.P_INT_PACK, qat.EXP_EMU = var["tma"], var["pack"], var.get("emu", False)
                    for dens, (ii, cc) in (("1.0", (None, None)), ("0.25", (idx, cnt))):
                        try:
                            f = lambda: mod.quant_attention_triton(q, k, v, ii, cc, block_m=128, block_n=64 if ii is None else 128,
                                    qk_scale=scale * LOG2E, sm_scale=scale, qk_fp8=mode == "fp8", pv_fp8=pv == "fp8",
                                    smooth_k=True, interpret=False, return_lse=False)[0]
                            o = f(); t = bench(f)
                            fl = flops_dense if dens == "1.0" else 4 * 128 * pairs
                            rec(S=S, H=H, kernel=f"q_{mod_name}", mode=mode, pv=pv, **var, density=dens, ms=t,
                                tflops=fl / t / 1e9, err=rel_l1(o, ref) if dens == "1.0" else None,
                                cfg=cfgs(mod._KERNELS["attn:cuda"]))
                        except Exception as ex:
                            rec(S=S, H=H, kernel=f"q_{mod_name}", mode=mode, pv=pv, **var, density=dens, error=repr(ex)[:300])
    del q, k, v, ref
    torch.cuda.empty_cache()
