"""The command: ``[mpiexec -n N] python -m splitmpi.bench NAME [options]``.

Each benchmark is the module of its name here, with ``run(world, args)``. Rank 0 prints the
table and the ratio line (the output) and saves the JSON; progress is logged
(``splitmpi.logs``); a rank's uncaught exception aborts the job, as in a training run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from mpi4py import MPI

from .. import logs
from ..cli import abort_on_exception
from ..errors import ConfigError
from . import allreduce, clients, memory, results, train, transport
from .harness import BenchError, environment

BENCHES = {"allreduce": allreduce.run, "clients": clients.run, "memory": memory.run,
           "results": results.run, "train": train.run, "transport": transport.run}
ALL_SCHEDULES = ("round_robin", "sequential", "fifo")
DEFAULT_REPEATS = {"transport": 7, "allreduce": 7, "train": 3, "results": 3, "memory": 1,
                   "clients": 1}

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m splitmpi.bench",
        description="splitmpi benchmarks; launch under mpiexec (transport: -n 2; train: "
                    "-n 2 for 1 client, -n 4 for 3 clients; allreduce: -n 3 or more; "
                    "results: -n 1, the results file at 1,000 and 10,000 clients; "
                    "memory: no mpiexec, it starts its own runs of 4 and 16 ranks; clients: "
                    "no mpiexec, it starts its own 4-rank runs of 3 to 3,000 clients).")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for tests)")
    p.add_argument("--json", metavar="PATH", help="where to save the results "
                                                  "(default: bench-<name>.json here)")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed repeats per variant (transport/allreduce 7, train 3, "
                        "results 3 reads)")
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
    p.add_argument("--clients", type=lambda t: [int(n) for n in t.split(",")], default=None,
                   help="clients: the client counts, e.g. 3,1000,10000 "
                        "(3,30,300,1000,3000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train: a splitmpi config override (split run and, where it "
                        "applies, the monolithic one), e.g. --set comm.wire_dtype=bfloat16; "
                        "results: the written file's config, e.g. --set audit=true")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where tensors and models live (cpu); cuda: cuda:(rank %% GPUs)")
    p.add_argument("--gpu-aware", action="store_true",
                   help="transport/train: hand CUDA memory to MPI (comm.gpu_aware=true); "
                        "only for a CUDA-aware MPI")
    logs.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    sys.excepthook = abort_on_exception
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    if rank != 0:  # one copy of --help and of argument errors
        sys.stdout = sys.stderr = open(os.devnull, "w")
    args = parser().parse_args(argv)
    if rank != 0:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    logs.setup(rank, args.verbosity)
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
    log.info(f"saved {path}")
    return 0

