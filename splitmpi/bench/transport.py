"""``mpiexec -n 2 python -m splitmpi.bench transport``: ``Transport`` vs raw Send/Recv.

Ping-pong between ranks 0 and 1: rank 0 sends, rank 1 receives and sends it back.

raw      - ``comm.Send``/``comm.Recv`` of preallocated numpy buffers (the ceiling)
splitmpi - ``Transport.send``/``Transport.recv`` of a float32 tensor (header and payload:
           one message up to ``transport.PACK_BYTES``, two above; a new tensor per
           receive, as the training loops use it); with
           ``--device cuda`` the tensor lives on the GPU (staged through pinned host
           memory unless ``--gpu-aware``), the raw and pickle paths stay on the host
pickle   - ``comm.send``/``comm.recv`` of a numpy array, at a few sizes only
GB/s = bytes of one message / half the round trip (1 GB = 1e9 bytes), from the median
time; ratio = splitmpi / raw throughput, the median of the per-repeat ratios; over raw us =
splitmpi's extra time per message (half a round trip), the median of the per-repeat
differences. The fixed cost per message over raw is given twice: the difference at the
smallest size, and the intercept of a least-squares line through the differences at sizes
up to 256 KiB (which also takes out a cost per byte, such as copies). Then, on rank 0
alone, the CPU time of one message sent and received within one process (over
``MPI.COMM_SELF``, ``time.thread_time``, best of the repeats) at a few sizes, raw
(``Isend``/``Recv``/``Wait``) and splitmpi: what a message costs in Python and copies,
however loaded the machine (a busy machine stretches the ping-pong's wall time, not this).

With ``SPLITMPI_BENCH_BASELINE=/path/to/transport.py`` in the environment, that file's
``Transport`` (e.g. the last commit's, checked out with ``git worktree``) runs the same
ping-pong as a third variant, ``baseline``, interleaved with the other two in the same job.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

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
CPU_SIZES = [4 * KiB, 64 * KiB, 256 * KiB]
TAG_RAW, TAG_PICKLE = 101, 102
# A transport.py to measure beside this one (e.g. the last commit's, from a
# ``git worktree``): its Transport becomes the ``baseline`` variant, in the same job.
BASELINE_ENV = "SPLITMPI_BENCH_BASELINE"

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
    baseline = _baseline(world, args.gpu_aware)
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

        def ping_pong(t: Transport, kinds) -> Callable[[], None]:
            """Activation out, features back, ``iters`` times, through ``t``."""
            def go():
                if rank == 0:
                    for _ in range(iters):
                        t.send(tensor, peer, kinds.ACTIVATION)
                        t.recv(peer, kinds.FEATURES, where)
                else:
                    for _ in range(iters):
                        t.send(t.recv(peer, kinds.ACTIVATION, where), peer, kinds.FEATURES)
            return go

        def pickle():
            if rank == 0:
                for _ in range(iters):
                    world.send(pickled, peer, TAG_PICKLE)
                    world.recv(source=peer, tag=TAG_PICKLE)
            else:
                for _ in range(iters):
                    world.send(world.recv(source=peer, tag=TAG_PICKLE), peer, TAG_PICKLE)

        variants = {"raw": raw, "splitmpi": ping_pong(transport, Kind)}
        if baseline is not None:
            variants["baseline"] = ping_pong(*baseline)
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
                         "over_raw_us": median([(b - a) / iters / 2 * 1e6 for a, b in
                                                zip(times["raw"], times["splitmpi"])]),
                         **({} if baseline is None else {
                             "baseline_ratio": paired_ratio(times["raw"], times["baseline"]),
                             "baseline_over_raw_us": median(
                                 [(b - a) / iters / 2 * 1e6
                                  for a, b in zip(times["raw"], times["baseline"])])}),
                         "seconds": times})
        progress.update(1)
    pair.Free()
    cpu = (cpu_per_message(CPU_SIZES[:1] if args.smoke else CPU_SIZES, repeats,
                           baseline and type(baseline[0])) if rank == 0 else [])
    quiet_barrier(world)
    if rank != 0:
        return {}
    big = [r["ratio"] for r in rows if r["bytes"] >= MiB]
    ratio = median(big)
    fixed = fixed_cost(rows)
    table = format_table(
        ["size", "raw GB/s", "splitmpi GB/s", "ratio", "raw us", "splitmpi us", "over raw us",
         "pickle GB/s"],
        [[human_bytes(r["bytes"]), r["raw_gbps"], r["splitmpi_gbps"], r["ratio"], r["raw_us"],
          r["splitmpi_us"], r["over_raw_us"], r["pickle_gbps"]] for r in rows])
    if baseline is not None:
        table += "\n" + format_table(
            ["size", "baseline ratio", "baseline over raw us"],
            [[human_bytes(r["bytes"]), r["baseline_ratio"], r["baseline_over_raw_us"]]
             for r in rows])
    table += (f"\nfixed cost per message over raw: {fixed['smallest']:.1f} us at "
              f"{human_bytes(rows[0]['bytes'])}, {fixed['intercept']:.1f} us by a line through "
              f"<= 256 KiB")
    names = [n for n in ("raw", "splitmpi", "baseline") if cpu and f"{n}_us" in cpu[0]]
    table += (f"\nCPU us per message, sent and received in one process ({', '.join(names)}): "
              + "; ".join(f"{human_bytes(c['bytes'])} "
                          + ", ".join(f"{c[n + '_us']:.1f}" for n in names) for c in cpu))
    return {"table": table, "rows": rows, "ratio": ratio, "fixed_cost_us": fixed, "cpu": cpu,
            "ratio_line": f"ratio transport/raw at >= 1 MiB: {ratio:.2f}",
            "settings": {"sizes": sizes, "repeats": repeats, "warmup": warmup,
                         "baseline": os.environ.get(BASELINE_ENV),
                         "pickle_sizes": PICKLE_SIZES, "device": str(where),
                         "gpu_aware": args.gpu_aware}}


def fixed_cost(rows: list[dict]) -> dict:
    """Splitmpi's fixed cost per message over raw, in us: the difference at the smallest
    size, and the intercept of the least-squares line through the differences at sizes up to
    256 KiB (that of the smallest size alone when fewer than 2 sizes are there)."""
    small = [r for r in rows if r["bytes"] <= 256 * KiB]
    smallest = rows[0]["over_raw_us"] if rows else float("nan")
    if len(small) < 2:
        return {"smallest": smallest, "intercept": smallest}
    fit = statistics.linear_regression([r["bytes"] for r in small],
                                       [r["over_raw_us"] for r in small])
    return {"smallest": smallest, "intercept": fit.intercept,
            "per_mib": fit.slope * MiB}


def cpu_per_message(sizes: list[int], repeats: int, baseline: type | None = None,
                    iterations: int = 1000) -> list[dict]:
    """The thread CPU time (us) of one message sent to and received by this process, raw and
    through ``Transport`` (and the ``baseline`` Transport class), best of ``repeats``
    timings of ``iterations`` messages each."""
    me = MPI.COMM_SELF
    transports = {"splitmpi": Transport(me)}
    if baseline is not None:
        transports["baseline"] = baseline(me)
    out = []
    for nbytes in sizes:
        x = torch.arange(nbytes // 4, dtype=torch.float32)
        send_buf, recv_buf = x.numpy().copy(), np.empty(nbytes // 4, dtype=np.float32)
        best = {"raw": float("inf"), **{name: float("inf") for name in transports}}
        for _ in range(max(repeats, 1)):
            start = time.thread_time()
            for _ in range(iterations):
                request = me.Isend(send_buf, 0, TAG_RAW)
                me.Recv(recv_buf, 0, TAG_RAW)
                request.Wait()
            best["raw"] = min(best["raw"], time.thread_time() - start)
            for name, transport in transports.items():
                kind = type(transport.WIRE_KINDS[0]).ACTIVATION  # that module's Kind
                start = time.thread_time()
                for _ in range(iterations):
                    sends = transport.isend(x, 0, kind)
                    transport.recv(0, kind)
                    transport.wait(sends)
                best[name] = min(best[name], time.thread_time() - start)
        out.append({"bytes": nbytes, **{f"{name}_us": t / iterations * 1e6
                                        for name, t in best.items()}})
    return out


def _baseline(world: MPI.Comm, gpu_aware: bool):
    """(Transport, Kind) of the ``BASELINE_ENV`` file, None when it is not set."""
    path = os.environ.get(BASELINE_ENV)
    if not path:
        return None
    name = "splitmpi._baseline_transport"  # in the package: its relative imports work
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.Transport(world, gpu_aware=gpu_aware), module.Kind
