"""``python -m splitmpi``: resolve the config, agree that every rank can start, then run
the rank's role. One rank's uncaught exception aborts the whole job (no rank hangs)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import traceback

from mpi4py import MPI

from . import checkpoint, client, config, data, logs, models
from .errors import ConfigError
from .runtime import STOPPED, check_launch, defer_dynamo, make_context

log = logging.getLogger(__name__)


def abort_on_exception(kind, exc, tb) -> None:
    """Print the failing rank's traceback, then take every rank down with MPI_Abort.

    The message goes out in one write, and the launcher gets a moment to forward it:
    MPI_Abort kills the job, and Hydra's proxy dropped lines still in its pipe."""
    rank = MPI.COMM_WORLD.Get_rank()
    text = (f"splitmpi: rank {rank} failed, aborting the job:\n"
            + "".join(traceback.format_exception(kind, exc, tb)))
    sys.stderr.write(text)
    sys.stderr.flush()
    time.sleep(0.5)
    MPI.COMM_WORLD.Abort(1)


def _keys(section, prefix="") -> list[str]:
    """``key=default`` per line, and what a choice key accepts."""
    lines = []
    types = config.field_types(section)
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            lines += _keys(value, f"{prefix}{f.name}.")
        else:
            allowed = config.choices(types[f.name])
            lines.append(f"  {prefix}{f.name}={value!r}" + (f"  ({allowed})" if allowed else ""))
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m splitmpi",
        description="Split learning over MPI: rank 0 is the cloud server, ranks 1..N the "
                    "clients. Launch with mpirun -n 1+CLIENTS.",
        epilog="config keys, defaults and choices (override any with key=value):\n"
               + "\n".join(_keys(config.Config())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config file (default: the built-in defaults)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    p.add_argument("--list-cuts", action="store_true",
                   help="print the legal model.cut values of model.arch for the data's "
                        "images, with what crosses the network at each, and exit")
    logs.add_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=5 model.cut=layer2")
    return p


def agree(world: MPI.Comm, step):
    """Run ``step`` on every rank; if any rank raised ConfigError, all exit 2 and rank 0
    prints the first message. Returns ``step``'s result."""
    result, problem = None, None
    try:
        result = step()
    except ConfigError as exc:
        problem = str(exc)
    problems = world.allgather(problem)
    failed = [(r, p) for r, p in enumerate(problems) if p]
    if failed:
        if world.Get_rank() == 0:
            rank, text = failed[0]
            where = f" (rank {rank})" if rank else ""
            sys.stderr.write(f"splitmpi: error{where}: {text}\n")
            sys.stderr.flush()
        sys.exit(ConfigError.exit_code)
    return result


def main(argv: list[str] | None = None) -> int:
    sys.excepthook = abort_on_exception
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    if rank != 0:  # one copy of --help and of argument errors, not one per rank
        sys.stdout = sys.stderr = open("/dev/null", "w")
    args = parser().parse_args(argv)
    if rank != 0:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    logs.setup(rank, args.verbosity)
    defer_dynamo()  # torch.optim's import of torch._dynamo: ~50 MB a rank, unused here
    if rank == 0:  # only rank 0 is the server (its results file: h5py); the clients never
        from . import server  # use the name ``server`` below, so they do not import it
    agree(world, lambda: check_launch(world.Get_size(), os.environ))
    if args.list_cuts:
        table = agree(world, lambda: list_cuts(config.load(args.config, args.overrides)))
        if rank == 0:
            print(table)
        return 0
    cfg, clients = agree(world, lambda: _resolve(args, world.Get_size()))
    if args.print_config:
        if rank == 0:
            print(cfg.to_yaml(), end="")
        return 0
    ctx = agree(world, lambda: make_context(cfg, world, clients))
    # rank 0 decides which checkpoint (if any) to resume and tells the others
    folder = world.bcast(agree(world, lambda: checkpoint.locate(cfg) if rank == 0 else None))
    start = checkpoint.epochs_of(folder) if folder else None
    saved = agree(world, lambda: checkpoint.load(folder, cfg, world) if folder else None)
    role = agree(world, lambda: server.prepare(ctx, start) if ctx.is_server
                 else client.prepare(ctx))
    if saved:
        (server if ctx.is_server else client).restore(role, saved["state"])
    if ctx.is_server:
        from .results import ResultsWriter
        log.info(f"splitmpi: {role.clients} clients on {clients} client ranks, world size "
                 f"{world.Get_size()}, "
                 f"device {ctx.device}, output {cfg.output}"
                 + (f", resuming after epoch {start} from {folder}" if folder else ""))
        log.info("config:\n" + cfg.to_yaml().rstrip())
        writer = ResultsWriter(cfg, world.Get_size(), role.clients, start)
        stopped = server.run(ctx, role, writer, start or 0)
    else:
        stopped = client.run(ctx, role, start or 0)
    return STOPPED if stopped else 0


def list_cuts(cfg: config.Config) -> str:
    """``--list-cuts``: the network's legal cuts in forward order, as a table."""
    shape = data.spec(cfg.data)
    made = models.network(cfg.model, shape.channels, shape.image_size, shape.num_classes)
    title = (f"{cfg.model.arch} on {shape.channels}x{shape.image_size}x{shape.image_size} "
             f"images, {shape.num_classes} classes")
    if isinstance(made, models.SplitModel):
        counts = [sum(p.numel() for p in m.parameters()) for m in vars(made).values()]
        return (f"{title}: the function returns its three parts, so the cut is theirs "
                f"(parameters: extractor {counts[0]:,}, cloud {counts[1]:,}, "
                f"classifier {counts[2]:,})")
    net, _ = made
    models.check_image_size(net, cfg.model.arch, shape.channels, shape.image_size)
    found = models.cuts(net, cfg.model.arch, shape.channels, shape.image_size)
    if cfg.model.arch == "cnn5":  # its cuts are whole blocks: 1.0 would read as a number
        found = [c for c in found if "." not in c.name]
        title += "; cnn5's cut 0 sends the inputs themselves (label_sharing only)"
    rows = [("model.cut", "activation", "bytes/sample", "extractor", "cloud", "classifier",
             "same tensor as")]
    rows += [(c.name, "x".join(map(str, c.shape)), f"{c.bytes:,}", *(f"{n:,}" for n in c.params),
              ", ".join(c.aliases)) for c in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(f"{v:<{w}}" if i in (0, 1, 6) else f"{v:>{w}}"
                       for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    return "\n".join([title, *lines, "bytes/sample: float32 activation (and its gradient "
                       "back) per sample and step; comm.wire_dtype=bfloat16 halves it",
                       "extractor, cloud, classifier: parameters"])


def _resolve(args, world_size: int):
    cfg = config.load(args.config, args.overrides)
    clients = config.check_world(cfg, world_size)
    data.check_available(cfg.data)
    return cfg, clients
