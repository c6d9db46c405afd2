"""The notebooks in notebooks/ run top to bottom, offline, and are committed without outputs (issue #8).

Each notebook is executed with nbclient in a fresh ``python3`` kernel whose interpreter is the one running
pytest, with a temporary working directory (nothing is written into the repository). A failing cell fails
the test with its traceback. Without nbclient / nbformat / ipykernel (``pip install -e ".[test]"``) the
execution tests are skipped, not failed; the no-outputs check needs only the standard library.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = ["01_quickstart", "02_caching_explorer", "03_attention_patterns", "04_sweep_analysis", "05_tuning"]
NOTEBOOKS = [NOTEBOOK_DIR / f"{name}.ipynb" for name in EXPECTED]
CELL_TIMEOUT_S = 300  # a cell; each notebook takes one to one and a half minutes on one CPU thread


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_code_cell_is_explained(path):
    """Every code cell follows a markdown cell that says what it shows."""
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            assert i > 0 and cells[i - 1]["cell_type"] == "markdown", f"{path.name} cell {i} has no explanation"


def _kernel_manager(tmp_path: Path):
    """A KernelManager for a ``python3`` kernel that runs this interpreter (not whatever ``python`` is on PATH)."""
    for module in ("nbclient", "nbformat", "ipykernel", "jupyter_client"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]'): "
                                           "notebooks not executed")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _execute(path: Path, tmp: Path, environ: dict | None = None) -> list:
    """Run one notebook in a fresh kernel; its error outputs. ``environ``: the environment to start from (a
    snapshot, when notebooks run beside other tests that may set variables for a while)."""
    km = _kernel_manager(tmp)
    import nbformat
    from nbclient import NotebookClient

    work = tmp / "cwd"
    work.mkdir()
    env = dict(os.environ if environ is None else environ)
    env.pop("MPLBACKEND", None)  # the kernel's inline backend
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})
    client.execute(env=env, cwd=str(work))
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]


LONGEST_FIRST = ["05_tuning", "04_sweep_analysis", "02_caching_explorer", "03_attention_patterns", "01_quickstart"]


def notebook_dependencies_present() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("nbclient", "nbformat", "ipykernel", "jupyter_client"))


def start_executions(tmp_root: Path, workers: int) -> dict:
    """Start every notebook (longest first) on ``workers`` threads, each a one-thread kernel; name -> future.
    ``tests/conftest.py`` starts them with one worker as soon as collection is done, so they run on the second
    core beside the (single-threaded) rest of the suite."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers)
    environ = dict(os.environ)
    futures = {}
    for name in LONGEST_FIRST:
        tmp = tmp_root / name
        tmp.mkdir(parents=True)
        futures[name] = pool.submit(_execute, NOTEBOOK_DIR / f"{name}.ipynb", tmp, environ)
    futures["_pool"] = pool
    return futures


@pytest.fixture(scope="module")
def executions(request, tmp_path_factory):
    """The notebooks' executions: the ones conftest started in the background, else all at once here, two
    kernels at a time (CI has two cores); each test waits for its own."""
    for module in ("nbclient", "nbformat", "ipykernel", "jupyter_client"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]'): "
                                           "notebooks not executed")
    futures = getattr(request.config, "notebook_executions", None)
    own = futures is None
    if own:
        futures = start_executions(tmp_path_factory.mktemp("notebooks"), max(1, min(2, os.cpu_count() or 1)))
    yield futures
    if own:
        futures["_pool"].shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, executions):
    errors = executions[path.stem].result()
    assert not errors, errors
    assert not any(ROOT.joinpath(p).exists() for p in ("notebooks/runs", "notebooks/dit_accel_demo"))
