"""What the training runs measured: their tables and figures.

The tables of the two papers (sharing vs non-sharing extractors per client; accuracy and
traffic by cut), a listing of every file, the split-learning modes and codecs side by side
(``jobs/sweep.py modes``), and the privacy audit of runs made with audit=true. Unfinished
runs carry ``status: unfinished`` and are never averaged together with finished ones.

A run of more than ``MANY_CLIENTS`` clients is summarised as distributions over its clients
(mean, min, p10, p50, p90, max) instead of a column or row per client, and gets the CDF
figure of its clients' final test accuracies (``plot_client_accuracy``).
"""
from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..reader import LIST_CLIENTS, Run, distribution
from .plotting import pyplot, save, slug
from .render import Table, columns, format_value, natural

# --- what the tables are made of ----------------------------------------------------------

MANY_CLIENTS = LIST_CLIENTS  # above this many clients: distributions, not one entry each
STATS = ("mean", "min", "p10", "p50", "p90", "max")


def _cfg(run: Run, dotted: str):
    node = run.config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def status(run: Run) -> str:
    return "finished" if run.finished else "unfinished"


def _mean(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _classes(classes: list[int]) -> str:
    """[0, 1, 2, 3] -> "0-3" (the papers' notation); anything else comma-separated."""
    if len(classes) > 2 and classes == list(range(classes[0], classes[-1] + 1)):
        return f"{classes[0]}-{classes[-1]}"
    return ",".join(map(str, classes))


def _order(key: tuple) -> tuple:
    """Sort mixed keys (cnn5 cuts are ints, other cuts module names) numbers first."""
    return tuple(natural(v) for v in key)


def bytes_per_epoch(run: Run) -> float:
    """Transport bytes sent by all ranks together, mean over epochs (extractor averaging
    is not in /comm; it is each client's ``share_buffer_bytes`` series)."""
    sent = run.comm.get("bytes_sent")
    return float(sent.sum(axis=1).mean()) if sent is not None and len(sent) else math.nan


def many(run: Run) -> bool:
    """A run reported as distributions over its clients."""
    return len(run.clients) > MANY_CLIENTS


def _table(run: Run, name: str) -> np.ndarray:
    """The (epochs, N) array of a per-client series (built from ``run.clients`` for a Run
    made by hand)."""
    if name in run.series:
        return np.asarray(run.series[name], dtype=np.float64)
    return np.array([s[name] for s in run.clients.values()], dtype=np.float64).T


def _nan_reduce(fn, values: np.ndarray) -> np.ndarray:
    """``fn`` over the clients (axis 1) ignoring NaN; NaN where a row has no value."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape[0], np.nan)
    some = np.isfinite(values).any(axis=1)
    if some.any():
        out[some] = fn(values[some], axis=1)
    return out


def final_accuracy(run: Run) -> np.ndarray:
    """(N,): each client's final test accuracy (fraction), its last evaluated one: a
    client not evaluated in the last epoch keeps its previous value (NaN if never)."""
    if run.series:
        return run.last_finite("test_accuracy")
    return run.final_array("test_accuracy")


def accuracy_columns(run: Run, prefix: str = "acc") -> dict:
    """Final test accuracy in percent: ``acc_<k>`` per client, or for many clients the
    distribution ``acc_mean``, ``acc_min``, ``acc_p10``, ``acc_p50``, ``acc_p90``, ``acc_max``."""
    acc = 100 * final_accuracy(run)
    if not many(run):
        return {f"{prefix}_{k}": round(float(a), 2) for k, a in zip(run.clients, acc)}
    d = distribution(acc)
    return {f"{prefix}_{s}": round(d[s], 2) for s in STATS}


def mean_accuracy(run: Run) -> np.ndarray:
    """Test accuracy after each epoch, the plain mean over the clients evaluated in it
    (fraction)."""
    return _nan_reduce(np.nanmean, _table(run, "test_accuracy"))


def server_busy_share(run: Run) -> np.ndarray:
    """Per epoch, the share of the training phase the server spent on requests: computing
    and, in u_shape, waiting on the client's classifier (it serves no one else meanwhile),
    summed over the clients, over the phase's length (the last client's end of phase)."""
    names = run.series or next(iter(run.clients.values()), {})
    busy = (_table(run, "server_busy_seconds") if "server_busy_seconds" in names  # 0.1
            else _table(run, "server_compute_seconds") + _table(run, "classifier_wait_seconds"))
    return np.nansum(busy, axis=1) / _nan_reduce(np.nanmax, _table(run, "phase_end_seconds"))


def _mode(run: Run) -> str:
    return _cfg(run, "split.mode") or "sl"  # files from before split.mode ran sl


def _coding(run: Run) -> str:
    """comm.compress, ``+grad`` where the gradients were coded too; none before it existed."""
    codec = _cfg(run, "comm.compress") or "none"
    return codec + ("+grad" if codec != "none" and _cfg(run, "comm.compress_grad") else "")


def compared(runs: list[Run]) -> list[Run]:
    """The runs of the modes table and figures: those with an epoch, if they differ in
    split.mode or in the codec (with or without gradients); else none, so that the papers'
    sweeps (data, cut and sharing on sl without coding) are reported as before. A schedule
    alone does not count: table I's runs serve fifo, table 1's round robin."""
    runs = [r for r in runs if r.epochs]
    return runs if len({(_mode(r), _coding(r)) for r in runs}) > 1 else []


def names(runs: list[Run]) -> list[str]:
    """Each file's path less the folder they all share and the suffix: the sweep's cell
    names (``results/modes/int8-grad.h5`` -> ``int8-grad``), with their folders where
    several sweeps are read together."""
    paths = [r.path.resolve() for r in runs]
    common = Path(os.path.commonpath([p.parent for p in paths]))
    return [str(p.relative_to(common).with_suffix("")) for p in paths]


# --- tables -------------------------------------------------------------------------------

def runs_table(runs: list[Run]) -> list[Table]:
    """One row per file, so every input is visible, finished or not."""
    rows = []
    for run in runs:
        row = {"path": str(run.path), "status": status(run), "epochs": run.epochs,
               "data": _cfg(run, "data.name"), "arch": _cfg(run, "model.arch"),
               "cut": _cfg(run, "model.cut"), "topology": _cfg(run, "split.topology"),
               "share": _cfg(run, "split.share"), "clients": len(run.clients)}
        row.update(accuracy_columns(run))
        seconds = run.epoch_seconds
        row["s_per_epoch"] = round(float(seconds.mean()), 3) if len(seconds) else math.nan
        rows.append(row)
    return [Table("Runs: final test accuracy (%) per client (acc_<k>; over more than "
                  f"{MANY_CLIENTS} clients its distribution: acc_mean .. acc_max), mean "
                  "seconds per epoch", rows)]


def sharing_table(runs: list[Run]) -> list[Table]:
    """Paper 1, table 1: each client's final test accuracy with and without extractor
    sharing, per (data, arch, cut, topology); repeats (same key) are averaged."""
    acc: dict = {}  # (group, client, classes) -> {share: [percent per run]}
    spread: dict = {}  # (group, statistic) -> {share: [percent per run]}: many clients
    for run in runs:
        group = (_cfg(run, "data.name"), _cfg(run, "model.arch"), _cfg(run, "model.cut"),
                 _cfg(run, "split.topology"), status(run))
        share = bool(_cfg(run, "split.share"))
        final = 100 * final_accuracy(run)
        if many(run):
            d = distribution(final)
            for stat in STATS:
                spread.setdefault((group, stat), {True: [], False: []})[share].append(d[stat])
            continue
        for k, a in zip(run.clients, final):
            cell = acc.setdefault((group, k, _classes(run.classes.get(k, []))),
                                  {True: [], False: []})
            cell[share].append(float(a))
    rows = []
    ordered = sorted(acc, key=lambda key: _order((*key[0], key[1], key[2])))
    for group, keys in itertools.groupby(ordered, key=lambda key: key[0]):
        head = dict(zip(("data", "arch", "cut", "topology"), group))
        means = []  # unrounded (sharing, non-sharing, difference): the mean row averages these
        for key in keys:
            runs_on, runs_off = acc[key][True], acc[key][False]
            on, off = _mean(runs_on), _mean(runs_off)
            means.append((on, off, on - off))
            rows.append({**head, "client": key[1], "classes": key[2], "sharing": round(on, 2),
                         "non_sharing": round(off, 2), "difference": round(on - off, 2),
                         "runs": f"{len(runs_on)}/{len(runs_off)}", "status": group[-1]})
        rows.append({**head, "client": "mean", "classes": "",
                     **{c: round(_mean(m[i] for m in means), 2)
                        for i, c in enumerate(("sharing", "non_sharing", "difference"))},
                     "runs": "", "status": group[-1]})
    for group in sorted({g for g, _ in spread}, key=_order):  # many clients: distributions
        head = dict(zip(("data", "arch", "cut", "topology"), group))
        for stat in STATS:
            cell = spread[(group, stat)]
            on, off = _mean(cell[True]), _mean(cell[False])
            rows.append({**head, "client": stat, "classes": "all", "sharing": round(on, 2),
                         "non_sharing": round(off, 2), "difference": round(on - off, 2),
                         "runs": f"{len(cell[True])}/{len(cell[False])}",
                         "status": group[-1]})
    return [Table("Table 1 (multiple classification): final test accuracy (%), sharing vs "
                  "non-sharing extractors; difference = sharing - non-sharing (runs of more "
                  f"than {MANY_CLIENTS} clients: client = a statistic over all clients)", rows)]


def cut_tables(runs: list[Run]) -> list[Table]:
    """Paper 2, table I: mean client accuracy by cut, then the traffic each cut costs; a
    pair of tables per architecture (cnn5 and resnet50 name their cuts differently)."""
    cells = defaultdict(lambda: ([], []))  # (arch, row key, cut) -> (accuracies, bytes)
    for run in runs:
        accuracy = _mean(final_accuracy(run))
        if not math.isfinite(accuracy):
            continue
        row = (_cfg(run, "data.name"), _cfg(run, "split.topology"),
               bool(_cfg(run, "split.share")), status(run))
        acc, traffic = cells[(_cfg(run, "model.arch"), row, _cfg(run, "model.cut"))]
        acc.append(100 * accuracy)
        traffic.append(bytes_per_epoch(run))
    tables = []
    for arch in sorted({a for a, _, _ in cells}, key=str):
        cuts = sorted({c for a, _, c in cells if a == arch}, key=lambda c: _order((c,)))
        keys = sorted({r for a, r, _ in cells if a == arch}, key=_order)
        pair = ([], [])
        for key in keys:
            head = {"arch": arch, **dict(zip(("data", "topology", "share"), key))}
            found = [cells.get((arch, key, c)) for c in cuts]
            for i, (rows, digits) in enumerate(zip(pair, (2, None))):
                rows.append({**head, **{f"cut={c}": round(_mean(f[i]), digits) if f else
                                        math.nan for c, f in zip(cuts, found)},
                             "status": key[-1]})
        tables += [Table(f"Table I ({arch}): mean test accuracy (%) over clients, by cut "
                         "(blocks/layers on the clients)", pair[0]),
                   Table(f"Bytes sent per epoch by cut ({arch}; all ranks, mean over epochs)",
                         pair[1])]
    return tables


def modes_table(runs: list[Run]) -> list[Table]:
    """The modes sweep's comparison (``jobs/sweep.py modes``), one row per run of
    ``compared``: what each split-learning mode and codec costs in accuracy, time, traffic
    and server load."""
    runs = compared(runs)
    if not runs:
        return []
    rows = []
    for run, name in zip(runs, names(runs)):
        rows.append({"run": name, "status": status(run), "mode": _mode(run),
                     "schedule": _cfg(run, "server.schedule"), "compress": _coding(run),
                     "acc_mean": round(100 * _mean(final_accuracy(run)), 2),
                     **accuracy_columns(run),
                     "s_per_epoch": round(float(run.epoch_seconds.mean()), 3),
                     "bytes_per_epoch": round(bytes_per_epoch(run)),
                     "server_busy_pct": round(100 * _mean(server_busy_share(run)), 1)})
    return [Table("Split-learning modes and compression: final test accuracy (%), mean over "
                  "clients and per client; seconds and bytes sent (all ranks) per epoch; "
                  "server busy = % of the training phase spent computing or waiting on a "
                  "classifier (summed over clients), mean over epochs", rows)]


def audit_table(runs: list[Run]) -> list[Table]:
    """The privacy audit of runs made with audit=true: messages the server received and how
    many carried a client's raw inputs or labels (any non-zero count is a leak)."""
    rows = []
    for run in runs:
        audit = run.audit_series
        if not audit:
            continue
        head = {"path": str(run.path), "status": status(run),
                "topology": _cfg(run, "split.topology"), "cut": _cfg(run, "model.cut")}
        sums = {n: np.asarray(audit[n]).sum(axis=0) for n in
                ("messages_checked", "input_matches", "label_matches")}  # (N,) each
        leaking = (sums["input_matches"] + sums["label_matches"]) > 0
        if many(run):  # one row for all clients, and how many of them leaked
            inputs, labels = int(sums["input_matches"].sum()), int(sums["label_matches"].sum())
            rows.append({**head, "client": f"all {len(leaking)}",
                         "messages": int(sums["messages_checked"].sum()),
                         "raw_inputs": inputs, "labels": labels,
                         "clients_leaking": int(leaking.sum()),
                         "verdict": "clean" if inputs + labels == 0 else "RAW DATA SENT"})
            continue
        for i in range(len(leaking)):
            inputs, labels = int(sums["input_matches"][i]), int(sums["label_matches"][i])
            rows.append({**head, "client": i + 1, "messages": int(sums["messages_checked"][i]),
                         "raw_inputs": inputs, "labels": labels,
                         "verdict": "clean" if inputs + labels == 0 else "RAW DATA SENT"})
    return [Table("Privacy audit: messages carrying raw inputs or labels (runs of more than "
                  f"{MANY_CLIENTS} clients: one row, clients_leaking = clients with any match)",
                  rows)] if rows else []


# --- figures ------------------------------------------------------------------------------

def _save(fig, ax, path: Path) -> Path:
    """The finish of a line plot: grid and legend, then ``plotting.save``."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_accuracy(runs: list[Run], outdir: Path) -> list[Path]:
    """``accuracy_<file stem>.png`` per run (``_2``, ``_3`` .. when stems repeat): test
    accuracy per epoch, one line per client; over more than MANY_CLIENTS clients the mean
    over the clients evaluated, with bands p10-p90 and min-max."""
    plt = pyplot()
    paths, seen = [], defaultdict(int)
    for run in runs:
        if not run.clients:
            continue
        seen[run.path.stem] += 1
        suffix = f"_{seen[run.path.stem]}" if seen[run.path.stem] > 1 else ""
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if many(run):
            acc = 100 * _table(run, "test_accuracy")
            x = np.arange(1, len(acc) + 1)
            low, p10, p90, high = (_nan_reduce(lambda v, axis, q=q: np.nanpercentile(v, q, axis),
                                               acc) for q in (0, 10, 90, 100))
            ax.fill_between(x, low, high, alpha=0.15, label="min-max")
            ax.fill_between(x, p10, p90, alpha=0.3, label="p10-p90")
            ax.plot(x, 100 * mean_accuracy(run), marker="o",
                    label=f"mean over {len(run.clients)} clients")
        else:
            for k, series in run.clients.items():
                acc = 100 * np.asarray(series["test_accuracy"])
                ax.plot(np.arange(1, len(acc) + 1), acc, marker="o",
                        label=f"client {k} (classes {_classes(run.classes.get(k, []))})")
        ax.set(xlabel="epoch", ylabel="test accuracy (%)",
               title=f"{run.path.name}: {_cfg(run, 'data.name')} {_cfg(run, 'model.arch')} "
                     f"cut {_cfg(run, 'model.cut')}, {_cfg(run, 'split.topology')}, "
                     f"share={format_value(_cfg(run, 'split.share'))}"
                     + ("" if run.finished else " (UNFINISHED)"))
        ax.title.set_fontsize(9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        paths.append(_save(fig, ax, outdir / f"accuracy_{slug(run.path.stem)}{suffix}.png"))
    return paths


def plot_cuts(runs: list[Run], outdir: Path) -> list[Path]:
    """``accuracy_by_cut_<arch>.png`` and ``bytes_by_cut_<arch>.png``: the rows of
    ``cut_tables`` as lines over the cuts."""
    plt = pyplot()
    paths = []
    tabs = cut_tables(runs)
    for (_, acc_rows), (_, byte_rows) in zip(tabs[0::2], tabs[1::2]):
        arch = acc_rows[0]["arch"]
        for name, rows, scale, ylabel in (
                ("accuracy", acc_rows, 1, "mean test accuracy (%)"),
                ("bytes", byte_rows, 1e6, "MB sent per epoch (all ranks)")):
            cuts = [c for c in columns(rows) if c.startswith("cut=")]
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for i, row in enumerate(rows):  # markers differ so that equal values stay visible
                label = (f"{row['data']} {row['topology']} "
                         f"{'sharing' if row['share'] else 'non-sharing'}"
                         + ("" if row["status"] == "finished" else " (unfinished)"))
                ax.plot([c[4:] for c in cuts], np.array([row[c] for c in cuts], float) / scale,
                        marker="osD^v<>"[i % 7], markersize=max(4, 10 - 2 * i), label=label,
                        linestyle="-" if row["status"] == "finished" else "--")
            ax.set(xlabel="cut (blocks/layers on the clients)", ylabel=ylabel,
                   title=f"{arch}: {ylabel.split(' (')[0]} by cut")
            paths.append(_save(fig, ax, outdir / f"{name}_by_cut_{slug(arch)}.png"))
    return paths


def plot_modes(runs: list[Run], outdir: Path) -> list[Path]:
    """``accuracy_vs_time.png`` and ``accuracy_vs_bytes.png`` for the runs of
    ``modes_table``: the mean test accuracy after each epoch against the wall seconds and
    against the bytes sent (all ranks) up to that epoch's end, a line per run."""
    runs = compared(runs)
    if not runs:
        return []
    plt = pyplot()
    paths = []
    for name, xlabel, per_epoch in (
            ("time", "wall seconds (rank 0's epochs, cumulative)", lambda r: r.epoch_seconds),
            ("bytes", "MB sent (all ranks, cumulative)",
             lambda r: r.comm["bytes_sent"].sum(axis=1) / 1e6)):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (run, label) in enumerate(zip(runs, names(runs))):
            acc, x = 100 * mean_accuracy(run), np.cumsum(per_epoch(run))
            n = min(len(acc), len(x))  # a running job's file may be between two writes
            ax.plot(x[:n], acc[:n], marker="osD^v<>"[i % 7],
                    label=label + ("" if run.finished else " (unfinished)"),
                    linestyle="-" if run.finished else "--")
        ax.set(xlabel=xlabel, ylabel="mean test accuracy (%)",
               title=f"Mean test accuracy against {xlabel.split(' (')[0]}, a point per epoch")
        paths.append(_save(fig, ax, outdir / f"accuracy_vs_{name}.png"))
    return paths


def plot_client_accuracy(runs: list[Run], outdir: Path) -> list[Path]:
    """``client_accuracy_cdf.png`` when a run has more than MANY_CLIENTS clients: the
    empirical CDF of its clients' final test accuracies (each client's last evaluated
    one), a line per such run; unfinished runs dashed."""
    runs = [r for r in runs if many(r) and r.epochs]
    if not runs:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run, label in zip(runs, names(runs)):
        acc = np.sort(100 * final_accuracy(run))
        acc = acc[np.isfinite(acc)]
        ax.step(acc, np.arange(1, len(acc) + 1) / max(len(acc), 1), where="post",
                label=f"{label} ({len(acc)} clients)" + ("" if run.finished else
                                                          " (unfinished)"),
                linestyle="-" if run.finished else "--")
    ax.set(xlabel="final test accuracy (%)", ylabel="fraction of clients at or below",
           title="Clients' final test accuracy (empirical CDF)", ylim=(0, 1.02))
    return [_save(fig, ax, outdir / "client_accuracy_cdf.png")]
