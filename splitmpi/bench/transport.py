"""``mpiexec -n 2 python -m splitmpi.bench transport``: ``Transport`` vs raw Send/Recv.

Ping-pong between ranks 0 and 1: rank 0 sends, rank 1 receives and sends it back.

raw      - ``comm.Send``/``comm.Recv`` of preallocated numpy buffers (the ceiling)
splitmpi - ``Transport.send``/``Transport.recv`` of a float32 tensor (header + payload,
           a new tensor per receive, as the training loops use it); with
           ``--device cuda`` the tensor lives on the GPU (staged through pinned host
           memory unless ``--gpu-aware``), the raw and pickle paths stay on the host
pickle   - ``comm.send``/``comm.recv`` of a numpy array, at a few sizes only
GB/s = bytes of one message / half the round trip (1 GB = 1e9 bytes), from the median
time; ratio = splitmpi / raw throughput, the median of the per-repeat ratios.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from mpi4py import MPI

from ..logs import Progress
from ..transport import Kind, Transport
from .harness import (
    PACE,
    BenchError,
    KiB,
    MiB,
    device_for,
    format_table,
    human_bytes,
    interleaved,
    median,
    paired_ratio,
    quiet_barrier,
)

TRANSPORT_SIZES = [4 * KiB * 4 ** i for i in range(8)]  # 4 KiB .. 64 MiB
PICKLE_SIZES = [64 * KiB, 1 * MiB, 16 * MiB]
SMOKE_SIZES = [4 * KiB, 1 * MiB]
TAG_RAW, TAG_PICKLE = 101, 102

log = logging.getLogger(__name__)


def _iterations(nbytes: int, smoke: bool) -> int:
    """Round trips per timing: ~128 MiB each way, at least 3, at most 2000."""
    if smoke:
        return 2
    return max(3, min(2000, (128 * MiB) // nbytes))


def run(world: MPI.Comm, args) -> dict:
    """The ping-pong at every size (see the module doc); rank 0 returns the results."""
    if world.Get_size() < 2:
        raise BenchError("the transport benchmark needs 2 ranks: mpiexec -n 2 "
                         "python -m splitmpi.bench transport")
    rank = world.Get_rank()
    sizes = SMOKE_SIZES if args.smoke else TRANSPORT_SIZES
    repeats = 1 if args.smoke else args.repeats
    warmup = 0 if args.smoke else args.warmup
    rows = []
    where = device_for(args.device, world)
    pair = world.Split(0 if rank < 2 else MPI.UNDEFINED, rank)  # ranks 0 and 1 only
    if rank >= 2:
        quiet_barrier(world)
        return {}
    transport = Transport(world, gpu_aware=args.gpu_aware)
    peer = 1 - rank
    progress = Progress(log, "transport", len(sizes), "sizes", PACE)
    for nbytes in sizes:
        n = nbytes // 4
        iters = _iterations(nbytes, args.smoke)
        host = torch.arange(n, dtype=torch.float32)
        send_buf, recv_buf = host.numpy().copy(), np.empty(n, dtype=np.float32)
        pickled = host.numpy().copy()
        tensor = host.to(where)

        def raw():
            if rank == 0:
                for _ in range(iters):
                    world.Send(send_buf, peer, TAG_RAW)
                    world.Recv(recv_buf, peer, TAG_RAW)
            else:
                for _ in range(iters):
                    world.Recv(recv_buf, peer, TAG_RAW)
                    world.Send(recv_buf, peer, TAG_RAW)

        def split():
            if rank == 0:
                for _ in range(iters):
                    transport.send(tensor, peer, Kind.ACTIVATION)
                    transport.recv(peer, Kind.FEATURES, where)
            else:
                for _ in range(iters):
                    transport.send(transport.recv(peer, Kind.ACTIVATION, where), peer,
                                   Kind.FEATURES)

        def pickle():
            if rank == 0:
                for _ in range(iters):
                    world.send(pickled, peer, TAG_PICKLE)
                    world.recv(source=peer, tag=TAG_PICKLE)
            else:
                for _ in range(iters):
                    world.send(world.recv(source=peer, tag=TAG_PICKLE), peer, TAG_PICKLE)

        variants = {"raw": raw, "splitmpi": split}
        if nbytes in PICKLE_SIZES or (args.smoke and nbytes == max(sizes)):
            variants["pickle"] = pickle
        times = interleaved(variants, repeats, warmup, pair.Barrier)
        if rank == 0:
            gbps = {name: 2 * nbytes * iters / median(t) / 1e9 for name, t in times.items()}
            rows.append({"bytes": nbytes, "iterations": iters,
                         "raw_gbps": gbps["raw"], "splitmpi_gbps": gbps["splitmpi"],
                         "ratio": paired_ratio(times["raw"], times["splitmpi"]),
                         "pickle_gbps": gbps.get("pickle"),
                         "raw_us": median(times["raw"]) / iters / 2 * 1e6,
                         "splitmpi_us": median(times["splitmpi"]) / iters / 2 * 1e6,
                         "seconds": times})
        progress.update(1)
    pair.Free()
    quiet_barrier(world)
    if rank != 0:
        return {}
    big = [r["ratio"] for r in rows if r["bytes"] >= MiB]
    ratio = median(big)
    table = format_table(
        ["size", "raw GB/s", "splitmpi GB/s", "ratio", "raw us", "splitmpi us", "pickle GB/s"],
        [[human_bytes(r["bytes"]), r["raw_gbps"], r["splitmpi_gbps"], r["ratio"], r["raw_us"],
          r["splitmpi_us"], r["pickle_gbps"]] for r in rows])
    return {"table": table, "rows": rows, "ratio": ratio,
            "ratio_line": f"ratio transport/raw at >= 1 MiB: {ratio:.2f}",
            "settings": {"sizes": sizes, "repeats": repeats, "warmup": warmup,
                         "pickle_sizes": PICKLE_SIZES, "device": str(where),
                         "gpu_aware": args.gpu_aware}}
