"""Start real MPI jobs from tests: ``mpiexec -n K python -m MODULE ...`` under a timeout,
so one hang stays inside one test."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mpiexec() -> str:
    """The mpiexec beside this Python (the pip mpich), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec: pip install mpich (or a system MPI)")
    return found


def env() -> dict:
    e = dict(os.environ)
    # the project, and tests/ for the MPI check scripts that tests start as modules
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(n: int, *args: str, module: str = "splitmpi", cwd: Path | None = None,
        timeout: float = 240, launch: tuple = ()) -> subprocess.CompletedProcess:
    """Run the job (``launch``: extra mpiexec options); a job still running at
    ``timeout`` is killed and the test fails."""
    cmd = [mpiexec(), *launch, "-n", str(n), sys.executable, "-m", module, *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True,
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
