"""Fitting in: cache-dit refused, log verbosity, lazy torchao, packaging metadata, readable presets, import time."""

from __future__ import annotations

import configparser
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dit_accel
from dit_accel.cli import main
from dit_accel.config import PolicyError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# cache-dit already attached
# ---------------------------------------------------------------------------------------------------


def test_cache_dit_attached_is_refused():
    """cache-dit's enable_cache leaves ``_is_cached = True`` with its ``_context_manager`` and
    ``_original_forward`` on the transformer (cache_dit/caching/cache_adapters/cache_adapter.py, 1.0-1.5)."""
    from dit_accel.testing import tiny_pipeline

    pipe = tiny_pipeline("dit")
    transformer = pipe.transformer
    transformer._context_manager = object()
    transformer._original_forward = transformer.forward
    transformer._is_cached = True
    with pytest.raises(PolicyError, match=r"cache-dit.*cache_dit\.disable_cache"):
        dit_accel.accelerate(pipe, "fora")
    assert not dit_accel.is_accelerated(pipe)
    for name in ("_is_cached", "_context_manager", "_original_forward"):  # what cache_dit.disable_cache deletes
        delattr(transformer, name)
    dit_accel.accelerate(pipe, "fora")
    dit_accel.remove(pipe)


# ---------------------------------------------------------------------------------------------------
# Logging: a dit_accel parent logger, diffusers-style verbosity
# ---------------------------------------------------------------------------------------------------


def test_module_loggers_sit_under_the_dit_accel_logger(caplog):
    import dit_accel.api
    import dit_accel.logging as dlog

    assert dit_accel.api.logger.name == "dit_accel.api"
    assert dlog.get_logger("dit_accel.x").parent is logging.getLogger("dit_accel")
    before = dlog.get_verbosity()
    try:
        dlog.set_verbosity_error()
        assert dlog.get_verbosity() == logging.ERROR
        with caplog.at_level(logging.WARNING, logger="dit_accel"):  # propagates to the application's handlers
            dit_accel.api.logger.warning("dit_accel: a warning")
        assert "a warning" in caplog.text
        dlog.set_verbosity("info")
        assert dlog.get_verbosity() == logging.INFO
        with pytest.raises(ValueError, match="warning"):
            dlog.set_verbosity("loud")
    finally:
        dlog.set_verbosity(before)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "DIT_ACCEL_VERBOSITY"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                          check=True, timeout=120)


def test_verbosity_from_the_environment_and_the_default_handler():
    code = ("import logging, dit_accel\nlog = dit_accel.logging.get_logger('dit_accel.api')\n"
            "log.info('dit_accel: info line')\nlog.warning('dit_accel: warning line')\n"
            "print(logging.getLogger('dit_accel').level)")
    default = _run(code)
    assert default.stdout.strip() == str(logging.WARNING)
    assert default.stderr == "dit_accel: warning line\n"  # once, the message only
    assert _run(code, DIT_ACCEL_VERBOSITY="error").stderr == ""
    assert _run(code, DIT_ACCEL_VERBOSITY="info").stderr == "dit_accel: info line\ndit_accel: warning line\n"
    configured = _run("import logging; logging.basicConfig(format='APP %(message)s')\n" + code)
    assert configured.stderr == "APP dit_accel: warning line\n"  # the application's handler, not ours too


# ---------------------------------------------------------------------------------------------------
# Imports: fast, no torch, torchao only for a quant: section
# ---------------------------------------------------------------------------------------------------


def test_import_is_light_and_torchao_is_looked_up_not_imported():
    out = _run("import sys, dit_accel\nimport dit_accel.quant as q\nq.torchao_available()\n"
               "print(sorted(m for m in ('torch', 'diffusers', 'torchao') if m in sys.modules))\n"
               "import dit_accel.api\nprint('torchao' in sys.modules)")
    first, second = out.stdout.splitlines()
    assert first == "['torch']"  # dit_accel.quant needs torch, but neither diffusers nor torchao
    assert second == "False"  # attaching policies' code does not import torchao either


# ---------------------------------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------------------------------


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _requirements(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_packaging_metadata():
    cfg = _setup_cfg()
    install = _requirements(cfg["options"]["install_requires"])
    assert not any(r.startswith("triton") for r in install)  # GPU builds of torch bring it; CPU falls back
    assert "diffusers>=0.42.0" in install
    assert cfg["metadata"]["license"] == "Apache-2.0" and cfg["metadata"]["license_files"] == "LICENSE"
    assert "License ::" not in cfg["metadata"]["classifiers"]
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text.splitlines()) > 150
    extras = cfg["options.extras_require"]
    assert "torchao>=0.13,<0.15" in _requirements(extras["test"])
    assert "torchao>=0.13" in _requirements(extras["quant"])


def test_kernels_fall_back_without_triton(monkeypatch):
    import builtins

    from dit_accel.kernels import block_sparse

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert block_sparse.triton_available() is False


def test_minimum_versions_session_installs_the_declared_lower_bounds():
    """noxfile.py's ``minimums`` session pins every lower bound declared in setup.cfg (read from it)."""
    noxfile = (REPO / "noxfile.py").read_text()
    assert "def minimums" in noxfile and "setup.cfg" in noxfile and '"not slow"' in noxfile
    sys.path.insert(0, str(REPO))
    try:
        import noxfile as nf  # importable without nox installed
    finally:
        sys.path.remove(str(REPO))
    pins = nf.lower_bounds()
    assert "diffusers==0.42.0" in pins and "torchao==0.13.0" in pins and "torch==2.13.0" in pins


# ---------------------------------------------------------------------------------------------------
# Readable output
# ---------------------------------------------------------------------------------------------------


def test_presets_summarise_calibrated_tables(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("cifar10_dit-magcache"))
    assert "<50 values>" in line and "calibrated for DiTTransformer2DModel" in line
    teacache = next(line for line in out.splitlines() if line.startswith("cifar10_dit-teacache"))
    assert "coefficients=<5 values>" in teacache
    assert max(len(line) for line in out.splitlines()) < 300
