"""Shared test helpers (imported by test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

import dit_accel
from dit_accel.demo import psnr
from dit_accel.testing import FAMILIES, get_family, tiny_generate, tiny_pipeline

# The diffusers transformer class of each tiny family, from its record in dit_accel/testing/families.py
# (written out there independently of the adapters, which the tests check against it).
TRANSFORMER_CLASSES = {family: get_family(family).transformer_class for family in FAMILIES}


@functools.lru_cache(maxsize=None)
def tiny_baseline(family: str):
    """A tiny pipeline of ``family`` and its unaccelerated output (built once per test session)."""
    pipe = tiny_pipeline(family)
    return pipe, tiny_generate(pipe, family)


def zoo_versus_fora(policy: dict, steps: int = 20, extra=None) -> dict[str, tuple[float, float]]:
    """Calibrate ``policy`` on the reference model (labels 1, 7, seed 1), then generate labels 0, 3
    (seed 0) with it (``"policy"``), with FORA interval 3 (``"fora"``) and with the policies
    ``extra(calibrated)`` returns by name: {name: (PSNR vs baseline, saved share)}."""
    from dit_accel import zoo

    pipe = zoo.load("cifar10_dit")
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(class_labels=[0, 3], generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                    output_type="pt").images

    baseline = generate()
    calibrated = dit_accel.calibrate(pipe, [{"class_labels": [1, 7]}], policy, num_inference_steps=steps,
                                     generator=torch.Generator().manual_seed(1))
    variants = {"fora": {"cache": {"method": "fora", "interval": 3}}, "policy": calibrated,
                **(extra(calibrated) if extra is not None else {})}
    results = {}
    for name, p in variants.items():
        with dit_accel.accelerated(pipe, p):
            out = generate()
            results[name] = (psnr(out, baseline), dit_accel.stats(pipe).saved_share)
    return results


def interpreter_ready(cpu_only: bool = True) -> bool:
    """Triton is importable and runs under ``TRITON_INTERPRET=1`` (set by tests/conftest.py on CPU machines);
    ``cpu_only``: and no CUDA device (where the kernels would run compiled instead)."""
    from dit_accel.kernels import triton_available

    if not triton_available() or (cpu_only and torch.cuda.is_available()):
        return False
    from dit_accel.kernels._block_sparse_triton import interpreter_ready as ready

    return ready()


def qkv(B, H, S, D, dtype=torch.float32, seed=0):
    """Seeded random q, k, v ``[B, H, S, D]`` (drawn in float32, then cast to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3))


# ----------------------------------------------------------------------------- Triton kernel test modules
# A kernel test module sets TRITON_INTERPRET=1 before anything imports Triton (which reads it when its language
# helpers are decorated), keeping the previous value:
#     _PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET"); os.environ["TRITON_INTERPRET"] = "1"
# then, after its imports, ``INTERPRETER_READY, requires_triton, _interpreter = interpreter_gate(_PREVIOUS_INTERPRET)``.
# In a full pytest run an earlier module has usually imported Triton already (diffusers imports it) in compiled
# mode; then its kernel tests run in a fresh subprocess instead (``run_in_fresh_process``).

#: the skip reason of kernel tests that the fresh-process test covers (it checks the child did not skip them)
FRESH_PROCESS_REASON = "triton was imported before TRITON_INTERPRET=1: covered by test_kernel_tests_in_fresh_process"


def _restore_env(name: str, previous: str | None) -> None:
    if previous is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = previous


def interpreter_gate(previous: str | None, interpret: bool = True):
    """``(ready, requires_triton, fixture)`` for a kernel test module, called right after its imports:
    ``ready`` whether the kernels run under the interpreter in this process, ``requires_triton`` the skip mark of
    its kernel tests, ``fixture`` an autouse module fixture (bind it to a module-level name) that sets
    TRITON_INTERPRET=1 (unless ``interpret`` is false) while the module's tests run. TRITON_INTERPRET goes
    back to ``previous`` now and after the module, so it does not leak into the modules collected after it."""
    from dit_accel.kernels import triton_available

    ready = interpreter_ready(cpu_only=False)
    requires_triton = pytest.mark.skipif(
        not ready, reason="triton not installed" if not triton_available() else FRESH_PROCESS_REASON)
    _restore_env("TRITON_INTERPRET", previous)

    @pytest.fixture(autouse=True, scope="module")
    def _interpreter():
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        yield
        _restore_env("TRITON_INTERPRET", previous)

    return ready, requires_triton, _interpreter


def fresh_process_only(ready: bool):
    """Skip mark of a module's fresh-process test: needed only where triton is installed but not ``ready``."""
    from dit_accel.kernels import triton_available

    return pytest.mark.skipif(ready or not triton_available(),
                              reason="the kernel tests ran in this process" if ready else "triton not installed")


def run_in_fresh_process(test_file: str, *pytest_args: str, check_covered: bool = True) -> None:
    """Run ``test_file``'s tests (``pytest_args``: e.g. ``-k ...``) in a process where TRITON_INTERPRET=1 is set
    before triton's import; they must pass and (``check_covered``) none may skip as covered elsewhere."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *pytest_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    if check_covered:
        assert "covered by test_kernel_tests_in_fresh_process" not in proc.stdout, proc.stdout[-4000:]  # kernels ran


def compile_ahead_of_time(script: str, *args: str, skip_on: tuple[str, ...] = ("ImportError", "TypeError")) -> str:
    """Run ``python -c script *args`` without TRITON_INTERPRET (Triton's compiler, which this process may not
    have if it imported Triton in interpreter mode) and return its stdout; skip where the child fails with one
    of ``skip_on`` (this Triton cannot compile ahead of time here)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and any(error in proc.stderr for error in skip_on):
        pytest.skip(f"this triton cannot compile ahead of time here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout
