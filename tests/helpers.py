"""Shared test helpers (imported by test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import functools

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
