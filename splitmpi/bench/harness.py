"""What every benchmark shares: fair timing, the figures it reports, where it runs.

Every figure is a median over repeats taken after warm-up. The variants compared are
measured side by side in one run: repeats interleave them, in an order that rotates from
repeat to repeat, so noise from other processes hits all of them alike; a ratio is taken
within each repeat before the median. Ranks that take no part in a measurement wait in a
sleeping barrier (``quiet_barrier``), not in MPICH's busy-polling one, so they leave the
cores to the ranks being measured.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from .. import __version__
from ..config import TrainConfig
from ..errors import ConfigError
from ..logs import Pace
from ..results import mpi_library
from ..runtime import local_comm, node_cores, pick_device

KiB, MiB = 1024, 1024 * 1024
PACE = Pace(seconds=TrainConfig.log_seconds)  # progress lines as often as a run's default


class BenchError(Exception):
    """A benchmark cannot run as asked (e.g. too few ranks); exit code 2."""


def quiet_barrier(comm: MPI.Comm, poll: float = 0.002) -> None:
    """A barrier that sleeps while it waits: MPICH's Barrier spins on a core, which would
    steal CPU from the ranks being measured when there are more ranks than cores."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over repeats of the ratio within each repeat: the variants of one repeat ran
    back to back, so a slow spell of the machine cancels out of their ratio."""
    return median([a / b for a, b in zip(numerators, denominators)])


def rotated(items: list, step: int) -> list:
    """``items`` rotated by ``step``: each variant takes each position in turn."""
    k = step % len(items)
    return items[k:] + items[:k]


def interleaved(variants: dict[str, Callable[[], None]], repeats: int, warmup: int,
                barrier: Callable[[], None],
                seconds: Callable[[float], float] = lambda s: s) -> dict[str, list[float]]:
    """Each variant's timed repeats, in rotated order after ``warmup`` untimed ones; every
    call starts after ``barrier`` and its wall time is passed through ``seconds`` (e.g. to
    take the slowest rank's, or the time per iteration)."""
    times = {name: [] for name in variants}
    for rep in range(-warmup, repeats):
        for name in rotated(list(variants), rep):
            barrier()
            start = time.perf_counter()
            variants[name]()
            elapsed = seconds(time.perf_counter() - start)
            if rep >= 0:
                times[name].append(elapsed)
    return times


def human_bytes(n: int) -> str:
    for unit, size in (("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B" if n < MiB else f"{n / MiB:.1f} MiB"


def format_table(columns: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "-" if v != v else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        return "-" if v is None else str(v)
    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) if text else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in text]
    return "\n".join(lines)


def environment(world: MPI.Comm) -> dict:
    library = mpi_library().splitlines()[0]
    cores = node_cores()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cores": cores, "world_size": world.Get_size(),
            "mpi_library": library, "mpi4py": __import__("mpi4py").__version__,
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(),
            "splitmpi": __version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}


def device_for(choice: str, world: MPI.Comm) -> torch.device:
    """The device a training run's rank would get for ``train.device=CHOICE``
    (``runtime.pick_device``); a refusal is said in the benchmark's words (``--device``).
    Collective over ``world`` (it asks for the rank on the node): call it on every rank
    before the benchmark's own collectives, so that no rank waits for one that refused."""
    local = local_comm(world)
    local_rank = local.Get_rank()
    local.Free()
    try:
        return pick_device(choice, local_rank)
    except ConfigError:
        raise BenchError(f"--device {choice} but no CUDA device is visible; "
                         "use --device cpu") from None


def sync(on: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timing ends when the work does."""
    if on.type == "cuda":
        torch.cuda.synchronize(on)
