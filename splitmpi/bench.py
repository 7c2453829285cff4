"""Benchmarks, run under mpiexec; rank 0 prints a table and a final ``ratio`` line and
saves JSON (``bench-<name>.json`` in the working folder, or ``--json PATH``).

  mpiexec -n 2 python -m splitmpi.bench transport   # Transport vs raw Send/Recv (and pickle)
  mpiexec -n 2 python -m splitmpi.bench train       # split vs monolithic samples/s, 1 client
  mpiexec -n 4 python -m splitmpi.bench train       # ... 3 clients (N = world size - 1)
  mpiexec -n 4 python -m splitmpi.bench allreduce   # average_extractor vs raw Allreduce

Every figure is a median over repeats taken after warm-up. The variants compared (A and B)
are measured side by side in one run: repeats interleave them, in an order that rotates
from repeat to repeat, so noise from other processes hits all of them alike.
Ranks that take no part in a measurement wait in a sleeping barrier (``quiet_barrier``),
not in MPICH's busy-polling one, so they leave the cores to the ranks being measured.
``--smoke`` runs tiny sizes once (for the tests; its figures mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from . import __version__
from .runtime import node_cores

KiB, MiB = 1024, 1024 * 1024
TRANSPORT_SIZES = [4 * KiB * 4 ** i for i in range(8)]  # 4 KiB .. 64 MiB
PICKLE_SIZES = [64 * KiB, 1 * MiB, 16 * MiB]
SMOKE_SIZES = [4 * KiB, 1 * MiB]
ALL_SCHEDULES = ("round_robin", "sequential", "fifo")
# per client and epoch; resnet50 at 32 px runs ~10 samples/s on one core
TRAIN_DEFAULTS = {"cnn5": {"batches": 16, "batch_size": 32},
                  "resnet50": {"batches": 3, "batch_size": 4}}
DEFAULT_REPEATS = {"transport": 7, "allreduce": 7, "train": 3}
TAG_RAW, TAG_PICKLE = 101, 102


# --- helpers ---------------------------------------------------------------------------------

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
    library = MPI.Get_library_version().strip().splitlines()[0]
    cores = node_cores()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cores": cores, "world_size": world.Get_size(),
            "mpi_library": library, "mpi4py": __import__("mpi4py").__version__,
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(),
            "splitmpi": __version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}


class BenchError(Exception):
    """A benchmark cannot run as asked (e.g. too few ranks); exit code 2."""


def _device(choice: str, rank: int) -> torch.device:
    """cpu, or cuda:(rank % GPUs) for ``--device cuda`` (refused without a GPU)."""
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BenchError("--device cuda but no CUDA device is visible; use --device cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- transport -------------------------------------------------------------------------------

def _iterations(nbytes: int, smoke: bool) -> int:
    """Round trips per timing: ~128 MiB each way, at least 3, at most 2000."""
    if smoke:
        return 2
    return max(3, min(2000, (128 * MiB) // nbytes))


def bench_transport(world: MPI.Comm, args) -> dict:
    """Ping-pong between ranks 0 and 1: rank 0 sends, rank 1 receives and sends it back.

    raw      - ``comm.Send``/``comm.Recv`` of preallocated numpy buffers (the ceiling)
    splitmpi - ``Transport.send``/``Transport.recv`` of a float32 tensor (header + payload,
               a new tensor per receive, as the training loops use it); with
               ``--device cuda`` the tensor lives on the GPU (staged through pinned host
               memory unless ``--gpu-aware``), the raw and pickle paths stay on the host
    pickle   - ``comm.send``/``comm.recv`` of a numpy array, at a few sizes only
    GB/s = bytes of one message / half the round trip (1 GB = 1e9 bytes), from the median
    time; ratio = splitmpi / raw throughput, the median of the per-repeat ratios.
    """
    from .transport import Kind, Transport

    if world.Get_size() < 2:
        raise BenchError("the transport benchmark needs 2 ranks: mpiexec -n 2 "
                         "python -m splitmpi.bench transport")
    rank = world.Get_rank()
    sizes = SMOKE_SIZES if args.smoke else TRANSPORT_SIZES
    repeats = 1 if args.smoke else args.repeats
    warmup = 0 if args.smoke else args.warmup
    rows = []
    device = _device(args.device, rank)  # before any collective: every rank refuses alike
    pair = world.Split(0 if rank < 2 else MPI.UNDEFINED, rank)  # ranks 0 and 1 only
    if rank >= 2:
        quiet_barrier(world)
        return {}
    transport = Transport(world, gpu_aware=args.gpu_aware)
    peer = 1 - rank
    for nbytes in sizes:
        n = nbytes // 4
        iters = _iterations(nbytes, args.smoke)
        host = torch.arange(n, dtype=torch.float32)
        send_buf, recv_buf = host.numpy().copy(), np.empty(n, dtype=np.float32)
        pickled = host.numpy().copy()
        tensor = host.to(device)

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
                    transport.recv(peer, Kind.FEATURES, device)
            else:
                for _ in range(iters):
                    transport.send(transport.recv(peer, Kind.ACTIVATION, device), peer,
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
        times = {name: [] for name in variants}
        for rep in range(-warmup, repeats):
            for name in rotated(list(variants), rep):
                pair.Barrier()
                start = time.perf_counter()
                variants[name]()
                elapsed = time.perf_counter() - start
                if rep >= 0:
                    times[name].append(elapsed)
        if rank == 0:
            gbps = {name: 2 * nbytes * iters / median(t) / 1e9 for name, t in times.items()}
            rows.append({"bytes": nbytes, "iterations": iters,
                         "raw_gbps": gbps["raw"], "splitmpi_gbps": gbps["splitmpi"],
                         "ratio": paired_ratio(times["raw"], times["splitmpi"]),
                         "pickle_gbps": gbps.get("pickle"),
                         "raw_us": median(times["raw"]) / iters / 2 * 1e6,
                         "splitmpi_us": median(times["splitmpi"]) / iters / 2 * 1e6,
                         "seconds": times})
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
                         "pickle_sizes": PICKLE_SIZES, "device": str(device),
                         "gpu_aware": args.gpu_aware}}


# --- train -----------------------------------------------------------------------------------

class Monolithic:
    """The same network, extractor + cloud + classifier chained in one process, trained
    on the same batches as the split run (all clients' loaders, one batch of each in turn)."""

    def __init__(self, cfg, clients: int, device: torch.device):
        from . import data, models

        spec = data.spec(cfg.data)
        parts = models.build(cfg.model, spec.channels, spec.image_size, spec.num_classes,
                             cfg.train.seed)
        self.device = device
        self.net = torch.nn.Sequential(parts.extractor, parts.cloud, parts.classifier).to(device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.train.lr,
                                         momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay)
        self.loaders = [data.client_loaders(cfg, k, clients)[0] for k in range(1, clients + 1)]

    def epoch(self) -> tuple[int, float]:
        """One pass over every client's batches; returns (samples, seconds)."""
        self.net.train()
        seen, loss_sum, correct = 0, 0.0, 0
        start = time.perf_counter()
        iterators = [iter(loader) for loader in self.loaders]
        while iterators:
            for it in list(iterators):
                batch = next(it, None)
                if batch is None:
                    iterators.remove(it)
                    continue
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                logits = self.net(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                loss.backward()
                self.optimizer.step()
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
        _sync(self.device)
        return seen, time.perf_counter() - start


def _train_config(arch: str, cut, clients: int, args):
    from . import config

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


def _split_run(ctx, me, policy: str, path: Path) -> tuple[int, float]:
    """One epoch through the real ``server.run``/``client.run``; rank 0 reads the train
    phase back from the HDF5 file: (samples of all clients, seconds of the slowest)."""
    from . import client, results, schedule, server

    world = ctx.world
    if ctx.is_server:
        me.schedule = schedule.make(policy, ctx.transport)
        ctx.cfg.output = str(path)
        writer = results.ResultsWriter(ctx.cfg, world.Get_size(), ctx.clients)
        world.Barrier()
        with contextlib.redirect_stdout(io.StringIO()):
            server.run(ctx, me, writer)
    else:
        world.Barrier()
        client.run(ctx, me)
    world.Barrier()
    if not ctx.is_server:
        return 0, 0.0
    import h5py

    with h5py.File(path, "r") as f:
        samples = sum(float(f[f"clients/{k}/train_samples"][-1])
                      for k in range(1, ctx.clients + 1))
        seconds = max(float(f[f"clients/{k}/train_seconds"][-1])
                      for k in range(1, ctx.clients + 1))
    path.unlink()
    return int(samples), seconds


def bench_train(world: MPI.Comm, args) -> dict:
    """Samples/s of the train phase: split (one epoch of the real server and client loops
    per repeat, each schedule) vs the monolithic network on rank 0 over the same batches."""
    from . import client, server
    from .runtime import make_context

    size = world.Get_size()
    if size < 2:
        raise BenchError("the train benchmark needs a server and a client: mpiexec -n 2 "
                         "(1 client) or -n 4 (3 clients) python -m splitmpi.bench train")
    clients = size - 1
    rank = world.Get_rank()
    _device(args.device, rank)  # refuse cuda without a GPU here, not in make_context
    repeats = 1 if args.smoke else args.repeats
    warmup = 0 if args.smoke else args.warmup
    archs = args.arch.split(",")
    schedules = args.schedules.split(",")
    rows, settings = [], {}
    folder = Path(tempfile.mkdtemp(prefix="splitmpi-bench-")) if rank == 0 else None
    for arch in archs:
        cut = args.cut or {"cnn5": 2, "resnet50": "layer2"}[arch]
        cfg = _train_config(arch, cut, clients, args)
        ctx = make_context(cfg, world, clients)
        me = server.prepare(ctx, None) if ctx.is_server else client.prepare(ctx)
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
                    got = _split_run(ctx, me, variant, path)
                if rep >= 0 and rank == 0:
                    measured[variant].append(got[0] / got[1])
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


# --- allreduce -------------------------------------------------------------------------------

def bench_allreduce(world: MPI.Comm, args) -> dict:
    """``sharing.average_extractor`` over the client communicator vs one raw
    ``Allreduce(IN_PLACE)`` of a preallocated float32 buffer of the same length."""
    from . import config, models, sharing

    size = world.Get_size()
    if size < 2:
        raise BenchError("the allreduce benchmark needs clients: mpiexec -n 3 or -n 4 "
                         "python -m splitmpi.bench allreduce")
    rank = world.Get_rank()
    device = _device(args.device, rank)
    clients_comm = world.Split(MPI.UNDEFINED if rank == 0 else 1, rank)
    repeats = 1 if args.smoke else args.repeats
    warmup = 0 if args.smoke else args.warmup
    archs = args.arch.split(",")
    image_size = args.image_size or 32
    cases = []
    for arch in archs:
        cuts = config.CUTS[arch]
        if args.smoke:
            cuts = cuts[1:2]
        cases += [(arch, cut) for cut in cuts]
    rows = []
    if rank == 0:
        quiet_barrier(world)
    else:
        for arch, cut in cases:
            parts = models.build(config.ModelConfig(arch, cut), 3, image_size, 10, 0)
            extractor = parts.extractor.to(device)
            n = sum(t.numel() for t in sharing.extractor_state(extractor))
            if n == 0:
                rows.append({"arch": arch, "cut": str(cut), "floats": 0})
                continue
            buffer = np.ones(n, dtype=np.float32)
            iters = 1 if args.smoke else max(2, min(200, (256 * MiB) // (4 * n)))

            def average():
                for _ in range(iters):
                    sharing.average_extractor(extractor, clients_comm)

            def raw():
                for _ in range(iters):
                    clients_comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)

            variants = {"raw": raw, "average_extractor": average}
            times = {name: [] for name in variants}
            for rep in range(-warmup, repeats):
                for name in rotated(list(variants), rep):
                    clients_comm.Barrier()
                    start = time.perf_counter()
                    variants[name]()
                    elapsed = clients_comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
                    if rep >= 0:
                        times[name].append(elapsed / iters)
            raw_ms, avg_ms = median(times["raw"]) * 1e3, median(times["average_extractor"]) * 1e3
            rows.append({"arch": arch, "cut": str(cut), "floats": n, "bytes": 4 * n,
                         "iterations": iters, "raw_ms": raw_ms, "average_ms": avg_ms,
                         "ratio": paired_ratio(times["raw"], times["average_extractor"]),
                         "raw_gbps": 4 * n / raw_ms / 1e6,
                         "average_gbps": 4 * n / avg_ms / 1e6, "seconds": times})
        quiet_barrier(world)
        clients_comm.Free()
    # rank 1 measured; rank 0 writes
    if rank == 1:
        world.send(rows, dest=0, tag=TAG_PICKLE)
    if rank != 0:
        return {}
    rows = world.recv(source=1, tag=TAG_PICKLE)
    timed = [r for r in rows if r["floats"]]
    ratio = median([r["ratio"] for r in timed])
    table = format_table(["model", "cut", "floats", "MB", "raw ms", "average ms", "ratio"],
                         [[r["arch"], r["cut"], r["floats"], 4 * r["floats"] / 1e6,
                           r.get("raw_ms"), r.get("average_ms"), r.get("ratio")] for r in rows])
    return {"table": table, "rows": rows, "ratio": ratio,
            "ratio_line": f"ratio average_extractor/raw Allreduce (raw time / average time, "
                          f"median over extractors) at {size - 1} client"
                          f"{'s' if size > 2 else ''}: {ratio:.2f}",
            "settings": {"repeats": repeats, "warmup": warmup, "clients": size - 1,
                         "image_size": image_size, "device": args.device}}


# --- command line ----------------------------------------------------------------------------

BENCHES = {"transport": bench_transport, "train": bench_train, "allreduce": bench_allreduce}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m splitmpi.bench",
        description="splitmpi benchmarks; launch under mpiexec (transport: -n 2; train: "
                    "-n 2 for 1 client, -n 4 for 3 clients; allreduce: -n 3 or more).")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for tests)")
    p.add_argument("--json", metavar="PATH", help="where to save the results "
                                                  "(default: bench-<name>.json here)")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed repeats per variant (transport/allreduce 7, train 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first (1)")
    p.add_argument("--arch", default=None,
                   help="train/allreduce: models (cnn5,resnet50; train --smoke: cnn5)")
    p.add_argument("--cut", default=None,
                   help="train: the cut, for every --arch given (default cnn5 2, resnet50 layer2)")
    p.add_argument("--schedules", default=",".join(ALL_SCHEDULES),
                   help="train: server schedules to compare (round_robin,sequential,fifo)")
    p.add_argument("--batches", type=int, default=0,
                   help="train: batches per client per epoch (cnn5 16, resnet50 3)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="train: samples per batch (cnn5 32, resnet50 4)")
    p.add_argument("--image-size", type=int, default=0, help="train/allreduce: pixels (32)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train: a splitmpi config override (split run and, where it "
                        "applies, the monolithic one), e.g. --set comm.wire_dtype=bfloat16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where tensors and models live (cpu); cuda: cuda:(rank %% GPUs)")
    p.add_argument("--gpu-aware", action="store_true",
                   help="transport/train: hand CUDA memory to MPI (comm.gpu_aware=true); "
                        "only for a CUDA-aware MPI")
    return p


def main(argv: list[str] | None = None) -> int:
    from .cli import abort_on_exception

    sys.excepthook = abort_on_exception
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    if rank != 0:  # one copy of --help and of argument errors
        sys.stdout = sys.stderr = open(os.devnull, "w")
    args = parser().parse_args(argv)
    if rank != 0:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    args.repeats = args.repeats or DEFAULT_REPEATS[args.name]
    if args.arch is None:
        args.arch = "cnn5" if args.smoke and args.name == "train" else "cnn5,resnet50"
    bad = ([f"--arch {a}" for a in args.arch.split(",") if a not in ("cnn5", "resnet50")]
           + [f"--schedules {s}" for s in args.schedules.split(",") if s not in ALL_SCHEDULES])
    if bad:
        if rank == 0:
            sys.stderr.write(f"splitmpi.bench: unknown {', '.join(bad)}; models: cnn5, "
                             f"resnet50; schedules: {', '.join(ALL_SCHEDULES)}\n")
        return 2
    from .errors import ConfigError

    try:
        result = BENCHES[args.name](world, args)
    except (BenchError, ConfigError) as exc:
        if rank == 0:
            sys.stderr.write(f"splitmpi.bench: {exc}\n")
        return 2
    if rank != 0:
        return 0
    env = environment(world)
    head = (f"# splitmpi bench {args.name}{' (smoke)' if args.smoke else ''}: "
            f"{env['world_size']} ranks, {env['cores']} cores, {env['mpi_library']}, "
            f"torch {env['torch']}, {env['date']}")
    print(head)
    print(result["table"])
    print(result["ratio_line"], flush=True)
    path = Path(args.json or f"bench-{args.name}.json")
    doc = {"benchmark": args.name, "smoke": args.smoke, **env,
           **{k: v for k, v in result.items() if k != "table"}}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"saved {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
