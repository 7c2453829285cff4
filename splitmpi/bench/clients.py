"""``python -m splitmpi.bench clients``: many logical clients on 4 ranks, the same samples.

For each client count N (``--clients``, default 3, 30, 300, 1,000 and 3,000) it starts
``mpiexec -n 4 python -m splitmpi`` (1 server, 3 client ranks hosting N clients between
them; cnn5 cut 2 on the built-in synthetic data at 16 px, iid, ``TRAIN_SIZE`` training
samples in all, batches of 32; every client trains in both epochs, and all are evaluated
after the second only, on at most ``TEST_LIMIT`` test samples each) and samples every
rank's memory as ``bench memory`` does. Figures per N:

epoch_s      - the first epoch's wall time (training and sharing, no evaluation), from the
               run's results file; ``ratio`` = the 3-client epoch / this epoch (1 = as fast)
steps        - training requests served in that epoch (N clients x their batches)
peak_GiB     - the ranks' peak resident memory (RSS, sampled), summed over the 4 ranks
pss_GiB      - the same in proportional set size: what the job costs the node
run_s        - the whole job, start to exit (setup, 2 epochs, the final evaluation)
write_ms     - one epoch's rows of N clients appended by ``results.ResultsWriter`` (the
               median of 5 epochs of synthetic reports, measured in this process)
read_s       - ``reader.read`` of the run's results file

The command starts its own jobs: run it without ``mpiexec``.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from .. import config, reader
from ..logs import Progress
from . import memory
from . import results as results_bench
from .harness import PACE, BenchError, format_table, median

RANKS = 4
CLIENTS, SMOKE_CLIENTS = (3, 30, 300, 1000, 3000), (3, 12)
TRAIN_SIZE, SMOKE_TRAIN_SIZE = 32000, 192
TEST_LIMIT = 8
RUN = ("model.arch=cnn5", "model.cut=2", "data.name=synthetic", "data.image_size=16",
       "data.partition=iid", "data.test_size=1000", f"data.test_limit={TEST_LIMIT}",
       "train.batch_size=32", "train.epochs=2", "clients.eval_every=0")

log = logging.getLogger(__name__)


def one(n: int, train_size: int, extra: list[str]) -> dict:
    """One job of ``n`` clients: its figures (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="bench-clients-") as folder:
        overrides = [*RUN, f"data.train_size={train_size}", f"clients.count={n}", *extra]
        start = time.perf_counter()
        peaks = memory.measure(RANKS, overrides, {}, timeout=1800, keep=Path(folder))
        run_s = time.perf_counter() - start
        path = Path(folder) / "run.h5"
        begin = time.perf_counter()
        run = reader.read(path)
        read_s = time.perf_counter() - begin
        cfg = config.load(None, [*overrides, f"output={folder}/write.h5"])
        _, appends = results_bench._new(cfg, n, 5, np.random.default_rng(0))
    if not run.finished or run.client_count != n:
        raise BenchError(f"the run of {n} clients did not finish")
    return {"clients": n, "epoch_s": float(run.epoch_seconds[0]),
            "steps": int(np.nansum(run.series["batches_served"][0])),
            "peak_GiB": sum(p["rss_mb"] for p in peaks.values()) / 1024,
            "pss_GiB": sum(p["pss_mb"] for p in peaks.values()) / 1024,
            "run_s": run_s, "write_ms": median(appends) * 1e3, "read_s": read_s,
            "test_accuracy": float(np.nanmean(run.series["test_accuracy"][-1]))}


def run(world: MPI.Comm, args) -> dict:
    """Rank 0 measures each client count in turn; returns the table."""
    if world.Get_rank() != 0:
        return {}
    counts = SMOKE_CLIENTS if args.smoke else tuple(args.clients or CLIENTS)
    train_size = SMOKE_TRAIN_SIZE if args.smoke else TRAIN_SIZE
    progress = Progress(log, "clients", len(counts), "runs", PACE)
    rows = []
    for n in counts:
        rows.append(one(n, train_size, list(args.set)))
        log.info(f"clients: {n}: epoch {rows[-1]['epoch_s']:.1f} s, "
                 f"peak {rows[-1]['peak_GiB']:.2f} GiB")
        progress.update(1)
    base = rows[0]["epoch_s"]
    table = format_table(
        ["clients", "epoch_s", "ratio", "steps", "peak_GiB", "pss_GiB", "run_s", "write_ms",
         "read_s", "test_acc"],
        [[r["clients"], r["epoch_s"], base / r["epoch_s"], r["steps"], r["peak_GiB"],
          r["pss_GiB"], r["run_s"], r["write_ms"], r["read_s"], r["test_accuracy"]]
         for r in rows])
    return {"table": table, "rows": rows,
            "ratio_line": f"epoch time of {rows[0]['clients']} clients / {rows[-1]['clients']} "
                          f"clients on the same {train_size} samples: "
                          f"{base / rows[-1]['epoch_s']:.2f}"}
