"""``mpiexec -n N python -m splitmpi.bench allreduce``: extractor averaging vs raw Allreduce.

``sharing.average`` over the client communicator (N - 1 clients) vs one raw
``Allreduce(IN_PLACE)`` of a preallocated float32 buffer of the same length, for the
extractor of every cut; times are the slowest client's.
"""
from __future__ import annotations

import logging

import numpy as np
from mpi4py import MPI

from .. import config, models, population, sharing
from ..logs import Progress
from ..runtime import client_comm
from .harness import (
    PACE,
    BenchError,
    MiB,
    device_for,
    format_table,
    interleaved,
    median,
    paired_ratio,
    quiet_barrier,
)

TAG_ROWS = 103  # rank 1, which measured, sends its rows to rank 0, which writes

log = logging.getLogger(__name__)


def run(world: MPI.Comm, args) -> dict:
    """Both variants on every extractor (see the module doc); rank 0 returns the results."""
    size = world.Get_size()
    if size < 2:
        raise BenchError("the allreduce benchmark needs clients: mpiexec -n 3 or -n 4 "
                         "python -m splitmpi.bench allreduce")
    rank = world.Get_rank()
    where = device_for(args.device, world)
    clients_comm = client_comm(world)
    repeats = 1 if args.smoke else args.repeats
    warmup = 0 if args.smoke else args.warmup
    archs = args.arch.split(",")
    image_size = args.image_size or 32
    cases = []
    for arch in archs:
        cuts = models.PAPER_CUTS[arch]
        if args.smoke:
            cuts = cuts[1:2]
        cases += [(arch, cut) for cut in cuts]
    rows = []
    if rank == 0:
        quiet_barrier(world)
    else:  # the clients measure: their progress lines show under -v
        progress = Progress(log, "allreduce", len(cases), "extractors", PACE)
        for arch, cut in cases:
            parts = models.build(config.ModelConfig(arch, cut), 3, image_size, 10, 0)
            extractor = parts.extractor.to(where)
            # one client on this rank, as a run with one client per rank has it
            bank = population.Bank({"extractor": extractor}, None, range(rank, rank + 1), 0)
            bank.activate(rank)
            n = sum(t.numel() for t in sharing.shared_tensors(extractor))
            if n == 0:
                rows.append({"arch": arch, "cut": str(cut), "floats": 0})
                progress.update(1)
                continue
            buffer = np.ones(n, dtype=np.float32)
            iters = 1 if args.smoke else max(2, min(200, (256 * MiB) // (4 * n)))

            def average():
                for _ in range(iters):
                    sharing.average(bank, extractor, [rank], clients_comm,
                                    clients_comm.Get_size())

            def raw():
                for _ in range(iters):
                    clients_comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)

            times = interleaved(  # the slowest client's time, per iteration
                {"raw": raw, "average": average}, repeats, warmup,
                clients_comm.Barrier,
                lambda s: clients_comm.allreduce(s, op=MPI.MAX) / iters)
            raw_ms, avg_ms = median(times["raw"]) * 1e3, median(times["average"]) * 1e3
            rows.append({"arch": arch, "cut": str(cut), "floats": n, "bytes": 4 * n,
                         "iterations": iters, "raw_ms": raw_ms, "average_ms": avg_ms,
                         "ratio": paired_ratio(times["raw"], times["average"]),
                         "raw_gbps": 4 * n / raw_ms / 1e6,
                         "average_gbps": 4 * n / avg_ms / 1e6, "seconds": times})
            progress.update(1)
        quiet_barrier(world)
        clients_comm.Free()
    # rank 1 measured; rank 0 writes
    if rank == 1:
        world.send(rows, dest=0, tag=TAG_ROWS)
    if rank != 0:
        return {}
    rows = world.recv(source=1, tag=TAG_ROWS)
    timed = [r for r in rows if r["floats"]]
    ratio = median([r["ratio"] for r in timed])
    table = format_table(["model", "cut", "floats", "MB", "raw ms", "average ms", "ratio"],
                         [[r["arch"], r["cut"], r["floats"], 4 * r["floats"] / 1e6,
                           r.get("raw_ms"), r.get("average_ms"), r.get("ratio")] for r in rows])
    return {"table": table, "rows": rows, "ratio": ratio,
            "ratio_line": f"ratio sharing.average/raw Allreduce (raw time / average time, "
                          f"median over extractors) at {size - 1} client"
                          f"{'s' if size > 2 else ''}: {ratio:.2f}",
            "settings": {"repeats": repeats, "warmup": warmup, "clients": size - 1,
                         "image_size": image_size, "device": args.device}}
