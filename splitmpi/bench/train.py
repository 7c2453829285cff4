"""``mpiexec -n N python -m splitmpi.bench train``: split vs monolithic samples/s.

The train phase of one epoch through the real ``server.run``/``client.run`` (N - 1 clients,
each server schedule asked for) against the same network trained in one process on rank 0
by ``splitmpi.monolithic``'s step, over the same batches.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import torch
from mpi4py import MPI

from .. import client, config, data, monolithic, results, schedule, server
from ..logs import Progress
from ..runtime import make_context
from .harness import (
    PACE,
    BenchError,
    device_for,
    format_table,
    median,
    paired_ratio,
    quiet_barrier,
    rotated,
    sync,
)

# per client and epoch; resnet50 at 32 px runs ~10 samples/s on one core
TRAIN_DEFAULTS = {"cnn5": {"batches": 16, "batch_size": 32},
                  "resnet50": {"batches": 3, "batch_size": 4}}

log = logging.getLogger(__name__)


def in_turn(loaders: list) -> Iterator:
    """One batch of each loader in turn, a spent loader dropping out: the order in which
    round_robin serves the clients' batches."""
    iterators = [iter(loader) for loader in loaders]
    while iterators:
        for it in list(iterators):
            batch = next(it, None)
            if batch is None:
                iterators.remove(it)
            else:
                yield batch


class Monolithic:
    """The run's network in one process (``monolithic.build``), trained by the one-process
    step on the split run's batches: every client's loader, one batch of each in turn."""

    def __init__(self, cfg, clients: int, device: torch.device):
        self.net = monolithic.build(cfg, device)
        self.loaders = [data.client_loaders(cfg, k, clients)[0] for k in range(1, clients + 1)]

    def epoch(self) -> tuple[int, float]:
        """One pass over every client's batches; returns (samples, seconds)."""
        seen = 0
        start = time.perf_counter()
        for x, y, *_ in in_turn(self.loaders):  # defense.label_epsilon: a third, true label
            monolithic.step(self.net, x, y)
            seen += len(y)
        sync(self.net.device)
        return seen, time.perf_counter() - start


def _train_config(arch: str, cut, clients: int, args):
    batches = 2 if args.smoke else (args.batches or TRAIN_DEFAULTS[arch]["batches"])
    batch_size = 4 if args.smoke else (args.batch_size or TRAIN_DEFAULTS[arch]["batch_size"])
    image_size = 16 if args.smoke else (args.image_size or 32)
    overrides = [f"model.arch={arch}", f"model.cut={cut}", "data.name=synthetic",
                 f"data.image_size={image_size}", "data.partition=iid",
                 f"data.train_size={clients * batches * batch_size}", "data.test_size=10",
                 f"train.batch_size={batch_size}", "train.epochs=1", "split.share=false",
                 f"train.device={args.device}", f"comm.gpu_aware={str(args.gpu_aware).lower()}",
                 "overwrite=true", "output=unused.h5", *args.set]
    return config.load(None, overrides)


def _split_run(ctx, role, policy: str, path: Path) -> tuple[int, float]:
    """One epoch through the real ``server.run``/``client.run``; rank 0 reads the train
    phase back from the HDF5 file: (samples of all clients, seconds of the slowest)."""
    world = ctx.world
    if ctx.is_server:
        role.schedule = schedule.make(policy, ctx.transport)
        ctx.cfg.output = str(path)
        writer = results.ResultsWriter(ctx.cfg, world.Get_size(), role.clients)
        world.Barrier()
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own lines (logs._Console)
            server.run(ctx, role, writer)
    else:
        world.Barrier()
        client.run(ctx, role)
    world.Barrier()
    if not ctx.is_server:
        return 0, 0.0
    with h5py.File(path, "r") as f:
        samples = float(f["clients/train_samples"][-1].sum())
        seconds = float(f["clients/train_seconds"][-1].max())
    path.unlink()
    return int(samples), seconds


def run(world: MPI.Comm, args) -> dict:
    """Samples/s of the train phase: split (one epoch of the real server and client loops
    per repeat, each schedule) vs the monolithic network on rank 0 over the same batches."""
    size = world.Get_size()
    if size < 2:
        raise BenchError("the train benchmark needs a server and a client: mpiexec -n 2 "
                         "(1 client) or -n 4 (3 clients) python -m splitmpi.bench train")
    clients = size - 1
    rank = world.Get_rank()
    device_for(args.device, world)  # refuse cuda without a GPU here, not in make_context
    repeats = 1 if args.smoke else args.repeats
    warmup = 0 if args.smoke else args.warmup
    archs = args.arch.split(",")
    schedules = args.schedules.split(",")
    rows, settings = [], {}
    folder = Path(tempfile.mkdtemp(prefix="splitmpi-bench-")) if rank == 0 else None
    progress = Progress(log, "train", len(archs) * (warmup + repeats) * (1 + len(schedules)),
                        "epochs", PACE)
    for arch in archs:
        cut = args.cut or {"cnn5": 2, "resnet50": "layer2"}[arch]
        cfg = _train_config(arch, cut, clients, args)
        ctx = make_context(cfg, world, clients)
        role = server.prepare(ctx, None) if ctx.is_server else client.prepare(ctx)
        mono = Monolithic(cfg, clients, ctx.device) if rank == 0 else None
        settings[arch] = {"cut": cut, "batch_size": cfg.train.batch_size,
                          "image_size": cfg.data.image_size,
                          "batches_per_client": cfg.data.train_size // clients
                          // cfg.train.batch_size,
                          "torch_threads": torch.get_num_threads(), "device": str(ctx.device)}
        variants = ["monolithic", *schedules]
        measured = {v: [] for v in variants}
        for rep in range(-warmup, repeats):
            for variant in rotated(variants, rep):
                if variant == "monolithic":
                    got = mono.epoch() if rank == 0 else (0, 0.0)
                    quiet_barrier(world)
                else:
                    path = folder / f"{arch}-{variant}-{rep}.h5" if rank == 0 else None
                    got = _split_run(ctx, role, variant, path)
                if rep >= 0 and rank == 0:
                    measured[variant].append(got[0] / got[1])
                progress.update(1)
        if rank == 0:
            for variant in variants:
                rows.append({"arch": arch, "cut": str(cut), "clients": clients,
                             "variant": variant, "samples_per_s": median(measured[variant]),
                             "vs_monolithic": paired_ratio(measured[variant],
                                                           measured["monolithic"]),
                             "samples_per_s_all": measured[variant]})
        if ctx.clients_comm is not None:
            ctx.clients_comm.Free()
    if rank != 0:
        return {}
    os.rmdir(folder)

    def pick(arch, variant):
        return next((r for r in rows if r["arch"] == arch and r["variant"] == variant), None)

    by_schedule = {s: median([pick(a, s)["vs_monolithic"] for a in archs]) for s in schedules}
    split_ratio = median(list(by_schedule.values()))
    lines = [f"ratio split/monolithic at {clients} client{'s' if clients > 1 else ''} "
             "(median over models): "
             + ", ".join(f"{s} {r:.2f}" for s, r in by_schedule.items())]
    fifo_seq = None
    if "fifo" in schedules and "sequential" in schedules:
        fifo_seq = median([paired_ratio(pick(a, "fifo")["samples_per_s_all"],
                                        pick(a, "sequential")["samples_per_s_all"])
                           for a in archs])
        lines.append(f"fifo/sequential samples/s: {fifo_seq:.2f}")
    table = format_table(["model", "cut", "clients", "variant", "samples/s", "vs monolithic"],
                         [[r["arch"], r["cut"], r["clients"], r["variant"], r["samples_per_s"],
                           r["vs_monolithic"]] for r in rows])
    return {"table": table, "rows": rows, "ratio": split_ratio, "ratio_by_schedule": by_schedule,
            "fifo_over_sequential": fifo_seq,
            "ratio_line": "; ".join(lines),
            "settings": {"models": settings, "repeats": repeats, "warmup": warmup,
                         "clients": clients, "schedules": schedules}}
