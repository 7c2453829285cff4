"""``python -m splitmpi.bench results``: the results file at 1,000 and 10,000 clients.

Rank 0 alone (other ranks wait). For each client count N, ``results.ResultsWriter`` makes
a file (default config, ``--set`` overrides applied: e.g. ``--set audit=true``) for a world
of 4 ranks and appends ``EPOCHS`` epochs of reports of N logical clients; then
``reader.read`` loads it, and ``report.cli.tables`` makes every table from it. Side by side,
at N up to ``OLD_MAX`` (the old layout is too slow to build at 10,000 clients in a
benchmark), the per-client layout of files written before layout 2 (one group per client,
one dataset per series, a resize and a write per client and series: the writer as it was),
read back by the same reader.

Figures: ``create_s`` (the file's structure), ``append_ms`` (one epoch's rows, median over
the epochs; ``append_max_ms`` the slowest), ``read_s`` and ``report_s`` (read + every
table), medians over ``--repeats`` reads, and the file's size.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from .. import config, reader, results
from .harness import format_table, median, quiet_barrier

EPOCHS, SMOKE_EPOCHS = 20, 2
OLD_EPOCHS = 5  # the old layout's epochs (it is slow)
CLIENTS, SMOKE_CLIENTS = (1000, 10000), (40,)
OLD_MAX = 1000
WORLD = 4  # the ranks whose counters /comm holds

log = logging.getLogger(__name__)


def _reports(n: int, epoch: int, rng: np.random.Generator) -> dict[int, dict]:
    """Reports of N clients as a server would hand them over: every series, classes."""
    values = rng.random((len(results.CLIENT_SERIES), n))
    out = {}
    for k in range(1, n + 1):
        report = {name: float(values[i, k - 1]) for i, name in enumerate(results.CLIENT_SERIES)}
        report.update({"classes": [k % 10, (k + 1) % 10], "messages_checked": 10 + epoch,
                       "input_matches": 0, "label_matches": 0,
                       "labels": {name: 0.5 for name in results.LABEL_SERIES}})
        out[k] = report
    return out


def _ranks(epoch: int) -> list[dict]:
    return [{c: 1000 * (epoch + 1) * (r + 1) for c in results.COMM_COUNTERS}
            for r in range(WORLD)]


def _new(cfg, n: int, epochs: int, rng) -> tuple[float, list[float]]:
    start = time.perf_counter()
    writer = results.ResultsWriter(cfg, WORLD, n)
    create = time.perf_counter() - start
    appends = []
    for epoch in range(epochs):
        reports = _reports(n, epoch, rng)
        start = time.perf_counter()
        writer.append_epoch(1.0, reports, _ranks(epoch))
        appends.append(time.perf_counter() - start)
    writer.finish()
    return create, appends


def _old(cfg, n: int, epochs: int, rng) -> tuple[float, list[float]]:
    """The per-client layout, written as ResultsWriter wrote it before layout 2."""
    start = time.perf_counter()
    f = h5py.File(cfg.output, "w")
    f.attrs.update({"config": cfg.to_json(), "splitmpi_version": "0.1.0",
                    "mpi_library": "-", "world_size": WORLD, "clients": n,
                    "started": "-"})
    for k in range(1, n + 1):
        group = f.create_group(f"clients/{k}")
        for name in results.CLIENT_SERIES:
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype="f8")
    f.create_dataset("epochs/seconds", shape=(0,), maxshape=(None,), dtype="f8")
    for name in results.COMM_COUNTERS:
        f.create_dataset(f"comm/{name}", shape=(0, WORLD), maxshape=(None, WORLD), dtype="i8")
    f.flush()
    create = time.perf_counter() - start
    appends = []
    append = results.ResultsWriter._append
    for epoch in range(epochs):
        reports = _reports(n, epoch, rng)
        start = time.perf_counter()
        for k, report in reports.items():
            group = f[f"clients/{k}"]
            if "classes" not in group.attrs:
                group.attrs["classes"] = np.asarray(report["classes"], dtype=np.int64)
            for name in results.CLIENT_SERIES:
                append(group[name], report[name])
        append(f["epochs/seconds"], 1.0)
        ranks = _ranks(epoch)
        for name in results.COMM_COUNTERS:
            append(f[f"comm/{name}"], [r[name] for r in ranks])
        f.flush()
        appends.append(time.perf_counter() - start)
    f.attrs["finished"] = "-"
    f.close()
    return create, appends


def _reads(path: Path, repeats: int) -> tuple[float, float]:
    from ..report.cli import tables  # matplotlib-free: tables only

    read, report = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run = reader.read(path)
        read.append(time.perf_counter() - start)
        tables([run])
        report.append(time.perf_counter() - start)
    return median(read), median(report)


def run(world: MPI.Comm, args) -> dict:
    if world.Get_rank() != 0:
        quiet_barrier(world)
        return {}
    counts = SMOKE_CLIENTS if args.smoke else CLIENTS
    epochs = SMOKE_EPOCHS if args.smoke else EPOCHS
    repeats = 1 if args.smoke else args.repeats
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-results-") as folder:
        for n in counts:
            layouts = [("new", _new, epochs)]
            if n <= OLD_MAX:
                layouts.append(("old", _old, min(epochs, OLD_EPOCHS)))
            for layout, write, e in layouts:
                path = Path(folder) / f"{layout}-{n}.h5"
                cfg = config.load(None, [f"output={path}", "overwrite=true", *args.set])
                log.info(f"results: {layout} layout, {n} clients, {e} epochs")
                create, appends = write(cfg, n, e, np.random.default_rng(0))
                read, report = _reads(path, repeats)
                rows.append({"layout": layout, "clients": n, "epochs": e,
                             "create_s": create, "append_ms": 1000 * median(appends),
                             "append_max_ms": 1000 * max(appends), "read_s": read,
                             "report_s": report, "file_mb": path.stat().st_size / 1e6})
    quiet_barrier(world)
    columns = list(rows[0])
    table = format_table(columns, [[r[c] for c in columns] for r in rows])
    at = {(r["layout"], r["clients"]): r for r in rows}
    small = min(counts)
    ratio = (at[("old", small)]["append_ms"] / at[("new", small)]["append_ms"]
             if ("old", small) in at else float("nan"))
    big = at[("new", max(counts))]
    line = (f"ratio old/new append time at {small} clients: {ratio:.1f}; new layout at "
            f"{max(counts)} clients: {big['append_ms']:.1f} ms per epoch, read "
            f"{big['read_s']:.3f} s, read + tables {big['report_s']:.3f} s")
    return {"table": table, "rows": rows, "ratio": ratio, "ratio_line": line,
            "settings": {"clients": list(counts), "epochs": epochs,
                         "old_epochs": min(epochs, OLD_EPOCHS), "old_max": OLD_MAX,
                         "world": WORLD, "repeats": repeats, "set": list(args.set)}}
