"""The ``dit-accel`` command line: demo table, presets, policy errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

import dit_accel
from dit_accel.cli import main
from dit_accel.demo import run_demo


def test_demo_on_tiny_pipeline_prints_table(capsys):
    assert main(["demo", "--model", "tiny-dit", "--repeats", "1", "--no-images"]) == 0
    out = capsys.readouterr().out
    for word in ("baseline", "fbcache", "fora", "speedup", "PSNR", "blocks saved"):
        assert word in out


def test_demo_rows_are_measured():
    rows = run_demo(model="tiny-pixart", policies=["none", "fora"], repeats=1, out_dir=None)
    by_name = {r["policy"]: r for r in rows}
    assert math.isinf(by_name["none"]["psnr_db"]) and by_name["none"]["blocks_saved"] == 0
    assert 0 < by_name["fora"]["blocks_saved"] < 1 and math.isfinite(by_name["fora"]["psnr_db"])
    assert all(r["seconds"] > 0 for r in rows)


def test_presets_and_show(capsys):
    assert main(["presets"]) == 0
    assert "fbcache" in capsys.readouterr().out
    assert main(["show", "fora"]) == 0
    assert "interval: 3" in capsys.readouterr().out


def test_bad_policy_is_a_clean_error(capsys):
    assert main(["show", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset" in err and "fbcache" in err


# ---------------------------------------------------------------------------------------------------
# Help and errors generated from the registries; --explain; methods
# ---------------------------------------------------------------------------------------------------


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_lists_every_registered_method_preset_and_family(capsys):
    from dit_accel.caching import alias_names, method_names
    from dit_accel.testing import FAMILIES

    methods = [*method_names(), *alias_names()]
    assert methods
    for command in ("show", "methods"):
        text = _help(capsys, command)
        assert all(name in text for name in methods), (command, [m for m in methods if m not in text])
        assert "adaptive" in text  # the guidance methods
    top = _help(capsys)
    for name in (*dit_accel.preset_names(), *(f"tiny-{f}" for f in FAMILIES), "dit-accel methods"):
        assert name in top, name
    for command in ("demo", "eval"):
        text = _help(capsys, command)
        assert all(f"tiny-{f}" in text for f in FAMILIES) and all(p in text for p in dit_accel.preset_names())


def test_methods_lists_each_method_with_its_summary(capsys):
    from dit_accel.caching import alias_names, get_method, method_names

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in [*method_names(), *alias_names()]:
        method = alias_names().get(name, (name, {}))[0]
        first = get_method(method).config_cls.__doc__.strip().splitlines()[0]
        assert any(line.split()[:1] == [name] and first in line for line in lines), name
    assert main(["methods", "fbcache"]) == 0
    out = capsys.readouterr().out
    assert "= dbcache with fn_compute=1, bn_compute=0" in out and "fn_compute" in out and "the probe" in out
    assert main(["methods", "no-such-method"]) == 2
    err = capsys.readouterr().err
    assert "unknown method" in err and all(name in err for name in method_names())


def test_show_explain_prints_every_option_doc(capsys):
    from dit_accel.caching import get_method
    from dit_accel.config import explain_options

    assert main(["show", "fora", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "interval: 3" in out  # the validated YAML first
    rows = {name: doc for name, _, _, doc in explain_options(get_method("fora").config_cls)}
    assert rows["interval"] in out and "FORAConfig" in out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["interval"])
    assert rows["interval"] in line and ">= 1" in line
    assert all(doc in out for doc in rows.values())

    assert main(["show", "adaptive_guidance", "--explain"]) == 0  # a guidance section
    out = capsys.readouterr().out
    assert "AdaptiveGuidanceConfig" in out and "min_steps" in out


def test_show_explain_covers_nested_sections(capsys, tmp_path):
    path = tmp_path / "sparse.yaml"
    path.write_text("name: s\nattention:\n  sparse: {method: topp, top_p: 0.5}\n  block_size: 16\n")
    assert main(["show", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "attention: AttentionConfig" in out and "attention.sparse: SparseConfig" in out
    assert "0.5 (default 0.9)" in out and "16 (default 64)" in out


def test_demo_unknown_tiny_model_lists_the_families(capsys):
    from dit_accel.testing import FAMILIES

    assert main(["demo", "--model", "tiny-nope"]) == 2
    err = capsys.readouterr().err
    assert "tiny-nope" in err and all(f"tiny-{f}" in err for f in FAMILIES)


def test_bad_policy_error_lists_every_preset(capsys):
    assert main(["show", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in dit_accel.preset_names())


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["eval", "--help"], ["presets", "--help"]])
def test_help_imports_no_torch(argv):
    """``dit-accel --help`` stays fast: nothing imports torch (or diffusers) to print it."""
    code = ("import sys\nfrom dit_accel.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('loaded:', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))" % argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: dit-accel" in result.stdout
    assert result.stdout.strip().endswith("loaded: []"), result.stdout[-300:]
