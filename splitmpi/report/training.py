"""What the training runs measured: their tables and figures.

The tables of the two papers (sharing vs non-sharing extractors per client; accuracy and
traffic by cut), a listing of every file, the split-learning modes and codecs side by side
(``jobs/sweep.py modes``), and the privacy audit of runs made with audit=true. Unfinished
runs carry ``status: unfinished`` and are never averaged together with finished ones.
"""
from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..reader import Run
from .plotting import pyplot, save, slug
from .render import Table, columns, format_value, natural

# --- what the tables are made of ----------------------------------------------------------

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


def mean_accuracy(run: Run) -> np.ndarray:
    """Test accuracy after each epoch, the plain mean over clients (fraction)."""
    return np.mean([s["test_accuracy"] for s in run.clients.values()], axis=0)


def server_busy_share(run: Run) -> np.ndarray:
    """Per epoch, the share of the training phase the server spent on requests: computing
    and, in u_shape, waiting on the client's classifier (it serves no one else meanwhile),
    summed over the clients, over the phase's length (the last client's end of phase)."""
    series = run.clients.values()
    busy = sum(s["server_busy_seconds"] if "server_busy_seconds" in s  # 0.1's files: the sum
               else s["server_compute_seconds"] + s["classifier_wait_seconds"] for s in series)
    return busy / np.max([s["phase_end_seconds"] for s in series], axis=0)


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
        row.update({f"acc_{k}": round(100 * a, 2) for k, a in run.final().items()})
        seconds = run.epoch_seconds
        row["s_per_epoch"] = round(float(seconds.mean()), 3) if len(seconds) else math.nan
        rows.append(row)
    return [Table("Runs: final test accuracy (%) per client, mean seconds per epoch", rows)]


def sharing_table(runs: list[Run]) -> list[Table]:
    """Paper 1, table 1: each client's final test accuracy with and without extractor
    sharing, per (data, arch, cut, topology); repeats (same key) are averaged."""
    acc: dict = {}  # (group, client, classes) -> {share: [percent per run]}
    for run in runs:
        group = (_cfg(run, "data.name"), _cfg(run, "model.arch"), _cfg(run, "model.cut"),
                 _cfg(run, "split.topology"), status(run))
        for k, a in run.final().items():
            cell = acc.setdefault((group, k, _classes(run.classes.get(k, []))),
                                  {True: [], False: []})
            cell[bool(_cfg(run, "split.share"))].append(100 * a)
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
    return [Table("Table 1 (multiple classification): final test accuracy (%), sharing vs "
                  "non-sharing extractors; difference = sharing - non-sharing", rows)]


def cut_tables(runs: list[Run]) -> list[Table]:
    """Paper 2, table I: mean client accuracy by cut, then the traffic each cut costs; a
    pair of tables per architecture (cnn5 and resnet50 name their cuts differently)."""
    cells = defaultdict(lambda: ([], []))  # (arch, row key, cut) -> (accuracies, bytes)
    for run in runs:
        accuracy = _mean(list(run.final().values()))
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
        acc = run.final()
        rows.append({"run": name, "status": status(run), "mode": _mode(run),
                     "schedule": _cfg(run, "server.schedule"), "compress": _coding(run),
                     "acc_mean": round(100 * _mean(acc.values()), 2),
                     **{f"acc_{k}": round(100 * a, 2) for k, a in acc.items()},
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
        for k, series in sorted(run.groups.get("audit", {}).items()):
            if k.startswith("@"):
                continue
            inputs, labels = int(series["input_matches"].sum()), int(series["label_matches"].sum())
            rows.append({"path": str(run.path), "status": status(run),
                         "topology": _cfg(run, "split.topology"), "cut": _cfg(run, "model.cut"),
                         "client": int(k), "messages": int(series["messages_checked"].sum()),
                         "raw_inputs": inputs, "labels": labels,
                         "verdict": "clean" if inputs + labels == 0 else "RAW DATA SENT"})
    return [Table("Privacy audit: messages carrying raw inputs or labels", rows)] if rows else []


# --- figures ------------------------------------------------------------------------------

def _save(fig, ax, path: Path) -> Path:
    """The finish of a line plot: grid and legend, then ``plotting.save``."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_accuracy(runs: list[Run], outdir: Path) -> list[Path]:
    """``accuracy_<file stem>.png`` per run (``_2``, ``_3`` .. when stems repeat): test
    accuracy per epoch, one line per client."""
    plt = pyplot()
    paths, seen = [], defaultdict(int)
    for run in runs:
        if not run.clients:
            continue
        seen[run.path.stem] += 1
        suffix = f"_{seen[run.path.stem]}" if seen[run.path.stem] > 1 else ""
        fig, ax = plt.subplots(figsize=(6, 3.6))
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
