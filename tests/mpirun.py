"""Start real MPI jobs from tests: ``mpiexec -n K python -m MODULE ...`` under a timeout,
so one hang stays inside one test."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mpiexec() -> str:
    """The mpiexec beside this Python (the pip mpich), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec: pip install mpich (or a system MPI)")
    return found


def env(extra: Mapping[str, str | None] | None = None) -> dict:
    """This environment for a job; ``extra`` sets variables, or removes those given None
    (a test of the launch must not inherit the launcher variables of its own surroundings)."""
    e = dict(os.environ)
    # the project, and tests/ for the MPI check scripts that tests start as modules
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e.setdefault("OMP_NUM_THREADS", "1")
    for name, value in (extra or {}).items():
        if value is None:
            e.pop(name, None)
        else:
            e[name] = value
    return e


def run(n: int, *args: str, module: str = "splitmpi", cwd: Path | None = None,
        timeout: float = 240, launch: tuple = (), launcher: str | None = None,
        extra_env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run the job (``launch``: extra mpiexec options; ``launcher``: another MPI's mpiexec
    than ours; ``extra_env``: see ``env``); a job still running at ``timeout`` is killed and
    the test fails."""
    cmd = [launcher or mpiexec(), *launch, "-n", str(n), sys.executable, "-m", module, *args]
    return _within(cmd, cwd, env(extra_env), timeout)


def alone(*args: str, module: str = "splitmpi", cwd: Path | None = None, timeout: float = 120,
          extra_env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Start ``python -m module`` with no launcher at all: MPI makes it a world of 1 rank,
    as each task of a launcher that this MPI does not understand gets."""
    cmd = [sys.executable, "-m", module, *args]
    return _within(cmd, cwd, env(extra_env), timeout)


def _within(cmd: list[str], cwd: Path | None, environ: dict,
            timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout} s:\n"
                             f"{exc.stdout}\n{exc.stderr}") from None


def ok(n: int, *args: str, **kw) -> subprocess.CompletedProcess:
    """Run and require exit code 0, showing the job's output if it failed."""
    proc = run(n, *args, **kw)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# Small, fast settings for end-to-end runs on 2 cores.
TINY = ("data.train_size=300", "data.test_size=120", "data.image_size=16",
        "train.epochs=2", "train.batch_size=25")
