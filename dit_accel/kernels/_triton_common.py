"""What the Triton kernel modules share (imported only when Triton is used): the interpreter check, the lazily
jitted kernel cache and the ahead-of-time compile for a GPU target without a GPU.

Kernels are jitted lazily (:func:`lazy_kernel`), so whether Triton interprets them is decided by
``TRITON_INTERPRET`` when a kernel is first needed, not when its module is imported; a ``@triton.jit`` helper
that a kernel calls is looked up in the kernel module's globals when the kernel is compiled, so it is jitted
lazily too, in place (:func:`jit_helpers`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreter_ready() -> bool:
    """Whether Triton was imported in interpreter mode (TRITON_INTERPRET=1 set before its import):
    only then are the ``triton.language`` helpers (``tl.zeros``, ``tl.sum``...) interpretable."""
    from triton.runtime.jit import JITFunction

    return bool(triton.knobs.runtime.interpret) and not isinstance(tl.zeros, JITFunction)


def jit_helpers(module_globals: dict, *names: str) -> None:
    """Replace the plain functions ``names`` of a kernel module (``globals()``) by their ``triton.jit`` versions,
    once: the kernel finds its helpers there when it is compiled."""
    for name in names:
        if not hasattr(module_globals[name], "fn"):
            module_globals[name] = triton.jit(module_globals[name])


def lazy_kernel(cache: dict, fn, interpret: bool, autotune: bool = True, *, error: str, configs, key: list[str],
                prune, module_globals: dict | None = None, helpers: tuple[str, ...] = ()):
    """The jitted kernel ``fn``, made once per mode and kept in ``cache``: under the interpreter (RuntimeError
    ``error`` unless :func:`interpreter_ready`), on CUDA autotuned over ``configs()`` keyed by ``key`` and pruned
    by ``prune``, or on CUDA plain (``autotune=False``: the launch names the tile). ``helpers``: the jitted
    helpers in ``module_globals`` that ``fn`` calls (:func:`jit_helpers`)."""
    mode = "interpret" if interpret else ("cuda" if autotune else "cuda-pinned")
    if mode not in cache:
        if interpret and not interpreter_ready():
            raise RuntimeError(error)
        if helpers:
            jit_helpers(module_globals, *helpers)
        jitted = triton.jit(fn)
        if mode == "cuda":
            jitted = triton.autotune(configs=configs(), key=key, prune_configs_by={"early_config_prune": prune})(jitted)
        cache[mode] = jitted
    return cache[mode]


def launch_rows(kernel, args: tuple, meta: dict, pinned: dict | None, *, rows: int, programs: int, interpret: bool,
                device) -> None:
    """Launch a kernel whose programs own ``BLOCK_M`` of ``rows`` query rows each, times ``programs`` (batch x
    heads): with the tile ``pinned`` (``BLOCK_M``, ``BLOCK_N`` and on CUDA the launch options) when given, else
    autotuned (``kernel`` from :func:`lazy_kernel` with ``autotune`` on). ``meta``: the other compile-time
    arguments."""
    if pinned is not None:
        grid = (triton.cdiv(rows, pinned["BLOCK_M"]), programs)
        if interpret:
            kernel[grid](*args, **meta, **pinned)
        else:
            with torch.cuda.device(device):
                kernel[grid](*args, **meta, **pinned)
        return

    def grid(m):
        return (triton.cdiv(rows, m["BLOCK_M"]), programs)

    with torch.cuda.device(device):
        kernel[grid](*args, **meta)


def aot_compile_kernel(fn, *, constexprs: dict, pointers: dict[str, str], unit: tuple[str, ...],
                       floats: tuple[str, ...] = ("qk_scale",), aligned_strides: tuple[str, ...] = ("stride",),
                       num_warps: int, num_stages: int, arch: int = 90):
    """Compile the kernel function ``fn`` ahead of time for ``sm_<arch>`` without a GPU (for inspection and tests),
    specialised as the JIT would for contiguous inputs on CUDA.

    ``constexprs``: the compile-time arguments; ``unit``: strides equal to 1 (compile-time too); ``pointers``: each
    pointer argument's type (``"*bf16"``...); ``floats``: the float32 scalar arguments (every other argument is an
    ``i32``). Pointers and the strides whose names start with one of ``aligned_strides`` (not unit) are marked
    16-divisible, as the JIT marks them: without it the pipeliner does not issue async copies. Returns the
    compiled kernel: ``.asm["ttgir"]``, ``.asm["ptx"]``, ``.metadata.shared``. Needs Triton imported in compiled
    mode (``TRITON_INTERPRET`` unset)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = triton.runtime.jit.JITFunction(fn)
    names = jit_fn.arg_names
    constexprs = {**constexprs, **{n: 1 for n in unit}}
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
                 for n in names}
    aligned = [n for n in names if n in pointers or (n.startswith(aligned_strides) and n not in unit)]
    src = ASTSource(fn=jit_fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
