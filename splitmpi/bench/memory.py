"""``python -m splitmpi.bench memory``: what each rank of a real training run costs in memory.

Starts ``mpiexec -n N python -m splitmpi`` (cnn5 on the built-in data, iid, one epoch; ``--set``
adds overrides) at N = 4 and 16 ranks (``--smoke``: one run of 2 ranks on tiny data, the
first variant only) and samples every rank's ``/proc/PID/smaps_rollup`` until the job
ends; a rank's figures are those of its sample of highest PSS. Two variants run side by
side (interleaved repeats):

deferred - as a run starts (``runtime.defer_dynamo``: torch._dynamo stays out)
dynamo   - ``SPLITMPI_DEFER_DYNAMO=0``: torch.optim imports torch._dynamo as it would

RSS  - resident memory, shared pages included (what ``top`` shows)
PSS  - proportional set size: each shared page split between the processes that map it;
       the ranks' PSS add up to what the job costs the node (1 MB = 2**20 bytes here)
USS  - private memory only: what ending the rank would give back
anon - anonymous memory (Python objects, tensors, the heap), the part that no other rank
       can share
``libs`` names the notable shared libraries a rank has mapped (h5py's HDF5, triton).
ratio = deferred / dynamo mean PSS of a rank at the largest N (NaN in a smoke run).
``ranks/GiB`` = 1 GiB / PSS per rank: how many ranks of this run fit in a GiB of the node,
before the data grows. The command needs no
``mpiexec`` itself (it starts its own job): ``python -m splitmpi.bench memory``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

from ..logs import Progress
from ..runtime import DEFER_DYNAMO
from .harness import PACE, BenchError, format_table, median, paired_ratio

RANKS, SMOKE_RANKS = (4, 16), (2,)
RUN = ("train.epochs=1", "data.partition=iid")  # blocks: at most 10 clients
SMOKE_RUN = ("train.epochs=1", "data.train_size=64", "data.test_size=32",
             "data.image_size=16", "train.batch_size=16")
VARIANTS = {"deferred": {}, "dynamo": {DEFER_DYNAMO: "0"}}
LIBS = {"hdf5": "libhdf5", "triton": "libtriton"}  # name in the table: file name starts
LAUNCHER_VARIABLES = ("PMI_", "HYDRA_", "MPI_LOCAL", "MPIR_", "PMIX_", "OMPI_", "SLURM_")
SAMPLE_SECONDS = 0.1
MB = 1024  # smaps figures are in KiB

log = logging.getLogger(__name__)


def _mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise BenchError("no mpiexec beside this Python nor on PATH")
    return found


def _environment(extra: dict[str, str]) -> dict[str, str]:
    """This environment without the variables of a launcher (a job started inside another
    would take them for its own) and with this splitmpi first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _children(root: int) -> list[int]:
    """Every process below ``root``."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        kids = [pid for pid, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def rank_of(pid: int) -> int | None:
    """The MPI rank of a process of ``python -m splitmpi`` (its PMI_RANK), else None."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    if b"splitmpi" not in argv[1:3]:
        return None
    with open(f"/proc/{pid}/environ", "rb") as f:
        for item in f.read().split(b"\0"):
            if item.startswith(b"PMI_RANK="):
                return int(item[9:])
    return None


def sample(pid: int) -> dict:
    """A process's memory in MB (RSS, PSS, USS, anonymous) and its thread count."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {"rss_mb": fields["Rss"] / MB, "pss_mb": fields["Pss"] / MB,
            "uss_mb": (fields["Private_Clean"] + fields["Private_Dirty"]) / MB,
            "anon_mb": fields["Anonymous"] / MB,
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def libraries(pid: int) -> list[str]:
    """Which of ``LIBS`` the process has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        names = {os.path.basename(line.split()[-1]) for line in f if "/" in line}
    return sorted(k for k, prefix in LIBS.items() if any(n.startswith(prefix) for n in names))


def measure(ranks: int, overrides: list[str], extra_env: dict[str, str],
            timeout: float = 600, keep: Path | None = None) -> dict[int, dict]:
    """Run the job, sampling its ranks; per rank its sample of highest PSS. ``keep``: a
    folder for the run's files (its results file ``run.h5``), else a temporary one."""
    peaks: dict[int, dict] = {}
    with (contextlib.nullcontext(str(keep)) if keep is not None
          else tempfile.TemporaryDirectory(prefix="splitmpi-memory-")) as folder:
        cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "splitmpi", "-q",
               *overrides, f"output={folder}/run.h5"]
        job = subprocess.Popen(cmd, cwd=folder, env=_environment(extra_env),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        start, ranks_of = time.monotonic(), {}
        while job.poll() is None:
            if time.monotonic() - start > timeout:
                job.kill()
                raise BenchError(f"{' '.join(cmd)} ran past {timeout} s")
            for pid in _children(job.pid):
                try:
                    rank = ranks_of.get(pid)
                    if rank is None:  # not read yet, or not a rank (yet: before its exec)
                        rank = ranks_of[pid] = rank_of(pid)
                    if rank is None:
                        continue
                    now = sample(pid)
                    if rank not in peaks or now["pss_mb"] > peaks[rank]["pss_mb"]:
                        peaks[rank] = {**now, "libs": libraries(pid)}
                except (OSError, KeyError, ValueError):  # it ended, or not yet exec'd
                    ranks_of.pop(pid, None)
            time.sleep(SAMPLE_SECONDS)
        output = job.stdout.read()
    if job.returncode != 0:
        raise BenchError(f"the measured run failed (exit {job.returncode}):\n{output[-3000:]}")
    if sorted(peaks) != list(range(ranks)):
        raise BenchError(f"sampled ranks {sorted(peaks)} of {ranks}: the run was too short")
    return peaks


def run(world: MPI.Comm, args) -> dict:
    """Each variant at each rank count (see the module doc); rank 0 returns the results."""
    if world.Get_rank() != 0:
        return {}
    counts = SMOKE_RANKS if args.smoke else RANKS
    overrides = [*(SMOKE_RUN if args.smoke else RUN), *args.set]
    repeats = 1 if args.smoke else args.repeats
    variants = list(VARIANTS)[:1] if args.smoke else list(VARIANTS)
    rows, means = [], {}
    progress = Progress(log, "memory", len(counts) * repeats * len(variants), "runs", PACE)
    for n in counts:
        for rep in range(repeats):
            names = variants if rep % 2 == 0 else variants[::-1]
            for variant in names:
                peaks = measure(n, overrides, VARIANTS[variant])
                means.setdefault((n, variant), []).append(
                    sum(p["pss_mb"] for p in peaks.values()) / n)
                rows += [{"variant": variant, "ranks": n, "repeat": rep, "rank": r, **p}
                         for r, p in sorted(peaks.items())]
                progress.update(1)
    table_rows = []
    for (n, variant), pss in means.items():
        last = [r for r in rows if r["ranks"] == n and r["variant"] == variant
                and r["repeat"] == repeats - 1]
        server, clients = last[0], last[1:]
        libs = sorted({lib for r in clients for lib in r["libs"]})
        table_rows.append([variant, n, median(pss), server["pss_mb"],
                           median([r["pss_mb"] for r in clients]),
                           median([r["uss_mb"] for r in clients]),
                           median([r["anon_mb"] for r in clients]),
                           max(r["rss_mb"] for r in last),
                           max(r["threads"] for r in last), median(pss) * n,
                           1024 / median(pss), ",".join(libs) or "-"])
    table = format_table(["variant", "ranks", "PSS/rank", "server PSS", "client PSS",
                          "client USS", "client anon", "max RSS", "threads", "job PSS",
                          "ranks/GiB", "client libs"], table_rows)
    top = max(counts)
    per_rank = median(means[(top, "deferred")])
    ratio = (paired_ratio(means[(top, "deferred")], means[(top, "dynamo")])
             if (top, "dynamo") in means else float("nan"))
    return {"table": table, "rows": rows, "ratio": ratio,
            "pss_per_rank_mb": per_rank, "ranks_per_gib": 1024 / per_rank,
            "ratio_line": f"ratio deferred/dynamo PSS per rank at {top} ranks: {ratio:.2f}; "
                          f"{per_rank:.0f} MB a rank, {1024 / per_rank:.1f} ranks per GiB",
            "settings": {"ranks": list(counts), "overrides": overrides, "repeats": repeats,
                         "variants": {k: v for k, v in VARIANTS.items()},
                         "sample_seconds": SAMPLE_SECONDS}}
