"""The README's test command against the lowest versions setup.cfg declares (``minimums``).

    nox -s minimums            # with nox installed (pip install nox)
    python noxfile.py          # the same without nox: a fresh venv in .nox/minimums-plain
    python noxfile.py --print  # only print the pins

Both install the README's CPU torch, then the lower bound of every other requirement exactly as setup.cfg
declares it (``diffusers>=0.42.0`` -> ``diffusers==0.42.0``: every ``install_requires`` line and the test
extra's torchao), then ``pip install -e ".[test]"`` with those pins as constraints, and run
``pytest -q -m "not slow"``. ``.ci/run`` keeps running the README's own command with the newest releases.
torch's own lower bound is not exercised here (older CPU builds of torch are not on the package index this
was written against); setup.cfg says where it comes from.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"  # the README's install command
PINNED_EXTRA = ("torchao",)  # from the test extra; every install_requires line but torch is pinned too
PYTEST = ("pytest", "-q", "-m", "not slow")


def lower_bounds() -> list[str]:
    """``NAME==LOWER`` for every requirement of setup.cfg's install_requires but torch and for the test
    extra's ``PINNED_EXTRA``, after the README's torch."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def bounds(text: str) -> dict[str, str | None]:
        out = {}
        for line in text.splitlines():
            match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*([^;#]*)", line)
            if match and not line.lstrip().startswith("#"):
                lower = re.search(r">=\s*([0-9][^,\s]*)", match.group(2))
                out[match.group(1)] = None if lower is None else lower.group(1)
        return out

    wanted = {k: v for k, v in bounds(cfg["options"]["install_requires"]).items() if k != "torch"}
    extra = bounds(cfg["options.extras_require"]["test"])
    wanted.update({k: extra.get(k) for k in PINNED_EXTRA})
    missing = sorted(k for k, v in wanted.items() if v is None)
    if missing:
        raise SystemExit(f"setup.cfg declares no lower bound for {missing}")
    return [TORCH, *(f"{name}=={version + '.0' * (2 - version.count('.'))}"  # 0.13 -> 0.13.0
                     for name, version in wanted.items())]


def _commands(python: str, constraints: Path) -> list[list[str]]:
    constraints.write_text("\n".join(lower_bounds()) + "\n")
    return [[python, "-m", "pip", "install", TORCH],
            [python, "-m", "pip", "install", *lower_bounds()[1:]],
            [python, "-m", "pip", "install", "-c", str(constraints), "-e", ".[test]"],
            [python, "-m", *PYTEST]]


try:
    import nox
except ModuleNotFoundError:  # lower_bounds() and the plain runner below work without nox
    nox = None

if nox is not None:
    @nox.session(python=False)
    def minimums(session: "nox.Session") -> None:
        """pytest -q -m "not slow" with diffusers / torchao at their declared lower bounds."""
        session.run("python", "-m", "venv", ".nox/minimums", external=True)
        python = str(ROOT / ".nox" / "minimums" / "bin" / "python")
        for command in _commands(python, ROOT / ".nox" / "minimums-constraints.txt"):
            session.run(*command, external=True)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "--print":
        print(" ".join(lower_bounds()))
        return 0
    env_dir = ROOT / ".nox" / "minimums-plain"
    venv.create(env_dir, with_pip=True, clear=True)
    python = str(env_dir / "bin" / "python")
    print("lower bounds:", " ".join(lower_bounds()), flush=True)
    for command in _commands(python, ROOT / ".nox" / "minimums-plain-constraints.txt"):
        print("+", " ".join(command), flush=True)
        code = subprocess.call(command, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
