"""The XAttention block-score and block-mass Triton kernels compiled ahead of time for sm_90 (no GPU needed).

Their numerics are tested under TRITON_INTERPRET=1 (tests/test_block_scores.py, tests/test_adaspa.py), which never
runs Triton's compiler: these tests compile every autotune config that each wrapper would try on CUDA (bfloat16,
contiguous inputs, head dim 128, the usual table blocks, stride 8) and check that each one compiles, issues
tensor-core MMA (wgmma), pipelines its loads (cp.async) and fits Hopper's shared memory. The compiler runs in a
fresh process without TRITON_INTERPRET, since this process may have imported Triton in interpreter mode.
"""

import pytest

from dit_accel.kernels import triton_available
from helpers import compile_ahead_of_time

#: usable shared memory per block on sm_90 (H100 / H200)
HOPPER_SHARED = 227 * 1024

_SCORES_SCRIPT = """
import sys
from dit_accel.kernels import _block_scores_triton as m
block_size, stride = int(sys.argv[1]), 8
for c in m._prune(m._configs(), {}, SUB=block_size // stride):
    k = m.aot_compile(head_dim=128, block_size=block_size, stride=stride, block_r=c.kwargs["BLOCK_R"],
                      block_c=c.kwargs["BLOCK_C"], num_warps=c.num_warps, num_stages=c.num_stages)
    ptx = k.asm["ptx"]
    print("RESULT", c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages,
          ptx.count("wgmma.mma_async"), ptx.count("cp.async"), k.metadata.shared, flush=True)
"""

_MASS_SCRIPT = """
import sys
from dit_accel.kernels import _block_mass_triton as m
table = int(sys.argv[1])
configs = m._prune(m._configs(), {}, TABLE_BM=table, TABLE_BN=table, HEAD_DIM=128)
for c in configs:
    for even in (False, True) if c is configs[-1] else (False,):
        k = m.aot_compile(head_dim=128, table_bm=table, table_bn=table, block_n=c.kwargs["BLOCK_N"],
                          num_warps=c.num_warps, num_stages=c.num_stages, even=even)
        ptx = k.asm["ptx"]
        print("RESULT", c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, int(even),
              ptx.count("wgmma.mma_async"), ptx.count("cp.async"), k.metadata.shared, flush=True)
"""


def _compile(script: str, *args: str) -> list[list[int]]:
    stdout = compile_ahead_of_time(script, *args)
    rows = [[int(x) for x in line.split()[1:]] for line in stdout.splitlines() if line.startswith("RESULT")]
    assert rows, stdout[-4000:]
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("block_size", [64])  # the default table block; 128 needs the same shared memory per tile
def test_block_scores_kernel_compiles_every_config_for_hopper(block_size):
    """Every (BLOCK_R, BLOCK_C, warps, stages) the autotuner tries at stride 8: wgmma, cp.async, in shared memory
    (the stride phases are a loop, so one phase of q and k is buffered per stage, not all of them)."""
    from dit_accel.kernels._block_scores_triton import _configs, _prune

    rows = _compile(_SCORES_SCRIPT, str(block_size))
    kept = _prune(_configs(), {}, SUB=block_size // 8)
    assert len(rows) == len(kept) and 0 < len(kept) < len(_configs())  # the spilling 128-row 4-warp tiles are pruned
    assert not any(c.kwargs["BLOCK_R"] == 128 and c.num_warps == 4 for c in kept)
    for br, bc, warps, stages, wgmma, cp_async, shared in rows:
        tile = (br, bc, warps, stages)
        assert wgmma > 0, tile
        assert cp_async > 0, tile
        assert shared <= HOPPER_SHARED, (tile, shared)


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("table", [128])  # the largest table: the largest tiles and shared memory
def test_block_mass_kernel_compiles_every_config_for_hopper(table):
    """Every (BLOCK_N, warps, stages) left after pruning to the kv-block, with tail masks (and the largest one
    without): wgmma, cp.async, in shared memory."""
    from dit_accel.kernels._block_mass_triton import _configs, _prune

    kept = _prune(_configs(), {}, TABLE_BM=table, TABLE_BN=table, HEAD_DIM=128)
    assert {c.kwargs["BLOCK_N"] for c in kept} == {bn for bn in (32, 64, 128) if bn <= table}
    rows = _compile(_MASS_SCRIPT, str(table))
    assert len(rows) == len(kept) + 1
    for bn, warps, stages, even, wgmma, cp_async, shared in rows:
        tile = (bn, warps, stages, even)
        assert wgmma > 0, tile
        assert cp_async > 0, tile
        assert shared <= HOPPER_SHARED, (tile, shared)
