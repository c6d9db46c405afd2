"""Test-wide settings: one CPU thread (tiny ops stall on thread hand-offs on 2-core CI machines)
and no hub access."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on CPU; it must be set before anything imports
    # triton (diffusers does, at import time).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """The notebooks run in kernels of their own; when their tests are selected, start them now, one at a time,
    so they use the second core while this (single-threaded) process runs everything else."""
    if not any(item.path.name == "test_notebooks.py" and getattr(item, "originalname", "") == "test_notebook_runs"
               for item in session.items):
        return
    import tempfile
    from pathlib import Path

    import test_notebooks

    if not test_notebooks.notebook_dependencies_present():
        return
    root = Path(tempfile.mkdtemp(prefix="dit-accel-notebooks-"))
    session.config.notebook_executions = test_notebooks.start_executions(root, workers=1)
    session.config.notebook_root = root


def pytest_unconfigure(config):
    futures = getattr(config, "notebook_executions", None)
    if futures is not None:
        import shutil

        futures["_pool"].shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(config.notebook_root, ignore_errors=True)
