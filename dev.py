"""Set up a virtual environment and run the project's jobs: ``python dev.py {demo,test,bench}``.

Each command creates ``.venv`` (if missing), installs the package with the
extras the job needs (skipped when nothing changed since the last install),
and runs the job inside it. It needs only Python 3.10+ with pip and venv.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
# torch is pinned for the project's own environment only (the package accepts >= 2.4):
# it is the release the test suite was last run against.
CONSTRAINTS = ROOT / "constraints.txt"

JOBS = {
    "demo": ("demo", [["mpo", "demo"]]),
    "test": (
        "test",
        [
            ["ruff", "check", "."],
            ["ruff", "format", "--check", "."],
            ["pytest", "-q"],
        ],
    ),
    "bench": ("bench", [["python", "benchmarks/decompose_vs_tensorly.py"]]),
}


def _bin(name: str) -> Path:
    folder = "Scripts" if os.name == "nt" else "bin"
    return VENV / folder / name


def _setup(extra: str) -> None:
    if not _bin("python").exists():
        print(f"creating {VENV.relative_to(ROOT)}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    inputs = (ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes() + extra.encode()
    stamp = VENV / f".installed-{extra}"
    digest = hashlib.sha256(inputs).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"installing mpo-dota[{extra}] into .venv", flush=True)
    subprocess.run(
        [
            str(_bin("python")),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            str(CONSTRAINTS),
            "-e",
            f".[{extra}]",
        ],
        cwd=ROOT,
        check=True,
    )
    stamp.write_text(digest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "job", choices=sorted(JOBS), help="demo: the main job; test: the test suite"
    )
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="passed on to the job's last command"
    )
    options = parser.parse_args()
    extra, commands = JOBS[options.job]
    _setup(extra)
    for number, command in enumerate(commands):
        last = number == len(commands) - 1
        argv = [str(_bin(command[0])), *command[1:], *(options.args if last else [])]
        result = subprocess.run(argv, cwd=ROOT, check=False)
        if result.returncode:
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
