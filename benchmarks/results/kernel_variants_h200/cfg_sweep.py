"""Scratch: per-config timings of the block-sparse kernel (commit 555f6ee) incl. configs outside the autotune space
(num_stages=1, maxnreg caps for 3 CTAs/SM). Same inputs/masks as bench_block_sparse.py."""
import sys, os, json
import torch, triton
from triton.tools.tensor_descriptor import TensorDescriptor
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from bench_block_sparse import make_block_mask
from common import time_call, reps_for
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from dit_accel.kernels import mask_to_block_table
import dit_accel.kernels._block_sparse_triton as m

kern = triton.jit(m._bsa_fwd_kernel)
CFGS = [(64, 64, 4, 1, None), (64, 64, 4, 2, None), (64, 64, 4, 3, None), (64, 128, 4, 1, None), (64, 128, 4, 1, 168),
        (64, 128, 4, 2, None), (64, 128, 4, 3, None), (64, 64, 4, 1, 168), (128, 64, 8, 2, None), (128, 64, 8, 3, None),
        (128, 128, 8, 2, None), (128, 128, 8, 3, None), (64, 64, 4, 2, 128)]
res = []
def log(**kw):
    print(json.dumps(kw), flush=True); res.append(kw)
for S, H in [(32760, 12), (75600, 24)]:
    D, blk = 128, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cud = lambda: F.scaled_dot_product_attention(q, k, v)
        ref = cud(); torch.cuda.synchronize()
        t_c = sorted(time_call(cud, reps_for(cud, 20)) for _ in range(3))[1]
    log(S=S, what="cudnn", ms=t_c)
    for density in (0.25, 1.0):
        mask = make_block_mask(1, H, S, blk, density, 0, "cuda")
        idx, cnt = mask_to_block_table(mask)
        nk = idx.shape[-1]
        from bench_block_sparse import kept_pairs
        flops = 4.0 * D * kept_pairs(mask, S, blk)
        qk_scale = D ** -0.5 * 1.4426950408889634
        out = torch.empty_like(q); lse = torch.empty(1, device="cuda")
        base = None
        for bm, bn, w, st, mr in CFGS:
            kd, vd = m.tma_descriptor(k, bn), m.tma_descriptor(v, bn)
            args = (q, kd, vd, out, lse, idx, cnt, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                    *idx.stride(), *cnt.stride(), H, S, qk_scale, triton.next_power_of_2(nk))
            meta = dict(HEAD_DIM=D, TABLE_BM=blk, TABLE_BN=blk, EVEN_M=S % blk == 0, EVEN_N=S % blk == 0, STORE_LSE=False,
                        DOT_PRECISION="tf32", DOT_F32=False, USE_TMA=True, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            if mr:
                meta["maxnreg"] = mr
            fn = lambda: kern[(triton.cdiv(S, bm), H)](*args, **meta)
            try:
                fn(); torch.cuda.synchronize()
                if density == 1.0:
                    err = (out.float() - ref.float()).abs().max().item()
                else:
                    if base is None:
                        base = out.clone()
                    err = (out.float() - base.float()).abs().max().item()
                r = reps_for(fn, 20)
                t = sorted(time_call(fn, r) for _ in range(5))[2]
                log(S=S, density=density, cfg=[bm, bn, w, st, mr], ms=t, tflops=flops / t / 1e9, vs_cudnn=t_c / t, maxerr=err)
            except Exception as e:
                log(S=S, density=density, cfg=[bm, bn, w, st, mr], error=repr(e)[:200])
    del q, k, v, ref; torch.cuda.empty_cache()
if os.environ.get("OUT"):
    json.dump(res, open(os.path.join(os.environ["OUT"], "cfg_sweep.json"), "w"), indent=1)
