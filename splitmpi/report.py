"""Tables and figures from splitmpi results files (one HDF5 file per run).

``python -m splitmpi.report RESULTS.h5|FOLDER ... [--csv | --markdown] [--plot DIR]``

A table is a ``(title, rows)`` pair, rows being dicts with the same keys, so the numbers
can be checked by tests and rendered as aligned text, CSV or Markdown alike. Every
function in ``TABLES`` maps a list of ``reader.Run`` to a list of tables (``[]`` where it
does not apply); every function in ``PLOTS`` maps ``(runs, folder)`` to the PNG paths it
wrote. Further reports (privacy, audit) are one more function appended to either list.

Unfinished runs (no ``finished`` attribute) are read up to their last written epoch and
carry ``status: unfinished``; they are never averaged together with finished runs.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from . import config, privacy
from .reader import NotAResult, Run, read

PROG = "splitmpi.report"


class Table(NamedTuple):
    title: str
    rows: list[dict]


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
    """Sort mixed keys (cnn5 cuts are ints, resnet50 cuts are names) numbers first."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def bytes_per_epoch(run: Run) -> float:
    """Transport bytes sent by all ranks together, mean over epochs (extractor averaging
    is not in /comm; it is each client's ``share_bytes`` series)."""
    sent = run.comm.get("bytes_sent")
    return float(sent.sum(axis=1).mean()) if sent is not None and len(sent) else math.nan


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


TABLES: list[Callable[[list[Run]], list[Table]]] = [runs_table, sharing_table, cut_tables,
                                                    audit_table, privacy.attack_tables]


def tables(runs: list[Run]) -> list[Table]:
    """Every non-empty table of every ``TABLES`` function (plain (title, rows) tuples too)."""
    return [t for fn in TABLES for t in fn(runs) if t[1]]


def notes(runs: list[Run]) -> list[str]:
    """What a reader of the text must not miss: runs that did not finish."""
    late = [r for r in runs if not r.finished]
    if not late:
        return []
    return [f"{len(late)} unfinished run(s) (no 'finished' attribute): numbers are from the "
            "last epoch written and are kept apart from finished runs (status unfinished):"
            ] + [f"  - {r.path} ({r.epochs} epoch(s) written)" for r in late]


# --- rendering ----------------------------------------------------------------------------

def cell(value, missing: str = "-") -> str:
    """Floats with 2 decimals unless they hold more (SSIM, MSE); NaN/None as ``missing``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:.2f}"
        return text if float(text) == value else f"{value:.6g}"
    return str(value)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _numeric(rows: list[dict], column: str) -> bool:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def render(tabs: list[Table], fmt: str = "text", extra: list[str] = ()) -> str:
    """``fmt``: text (aligned), csv (``# title`` line, header, rows per table) or markdown;
    ``extra`` lines (notes) follow the tables in text and markdown."""
    out = []
    for title, rows in tabs:
        cols = _columns(rows)
        if fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(cols)
            writer.writerows([cell(r.get(c), "") for c in cols] for r in rows)
            out.append(f"# {title}\n{buf.getvalue()}")
            continue
        grid = [[cell(r.get(c)) for c in cols] for r in rows]
        right = [_numeric(rows, c) for c in cols]
        if fmt == "markdown":
            lines = [f"### {title}", "", "| " + " | ".join(cols) + " |",
                     "|" + "|".join("---:" if r else "---" for r in right) + "|"]
            lines += ["| " + " | ".join(line) + " |" for line in grid]
        else:
            widths = [max([len(c), *(len(line[i]) for line in grid)])
                      for i, c in enumerate(cols)]
            fit = [lambda s, w=w, r=r: s.rjust(w) if r else s.ljust(w)
                   for w, r in zip(widths, right)]
            lines = [title, "  ".join(f(c) for f, c in zip(fit, cols)).rstrip(),
                     "  ".join("-" * w for w in widths)]
            lines += ["  ".join(f(s) for f, s in zip(fit, line)).rstrip() for line in grid]
        out.append("\n".join(lines) + "\n")
    if extra and fmt != "csv":
        lead = "Note: " if fmt == "text" else "**Note:** "
        out.append("\n".join([lead + extra[0], *extra[1:]]) + "\n")
    return "\n".join(out)


# --- figures ------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def plot_accuracy(runs: list[Run], outdir: Path) -> list[Path]:
    """``accuracy_<file stem>.png`` per run (``_2``, ``_3`` .. when stems repeat): test
    accuracy per epoch, one line per client."""
    plt = _pyplot()
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
                     f"share={cell(_cfg(run, 'split.share'))}"
                     + ("" if run.finished else " (UNFINISHED)"))
        ax.title.set_fontsize(9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        paths.append(_save(plt, fig, ax, outdir / f"accuracy_{_slug(run.path.stem)}{suffix}.png"))
    return paths


def _save(plt, fig, ax, path: Path) -> Path:
    """The common finish of every figure: grid, legend, tight layout, PNG, close."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cuts(runs: list[Run], outdir: Path) -> list[Path]:
    """``accuracy_by_cut_<arch>.png`` and ``bytes_by_cut_<arch>.png``: the rows of
    ``cut_tables`` as lines over the cuts."""
    plt = _pyplot()
    paths = []
    tabs = cut_tables(runs)
    for (_, acc_rows), (_, byte_rows) in zip(tabs[0::2], tabs[1::2]):
        arch = acc_rows[0]["arch"]
        for name, rows, scale, ylabel in (
                ("accuracy", acc_rows, 1, "mean test accuracy (%)"),
                ("bytes", byte_rows, 1e6, "MB sent per epoch (all ranks)")):
            cuts = [c for c in _columns(rows) if c.startswith("cut=")]
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
            paths.append(_save(plt, fig, ax, outdir / f"{name}_by_cut_{_slug(arch)}.png"))
    return paths


PLOTS: list[Callable[[list[Run], Path], list[Path]]] = [plot_accuracy, plot_cuts,
                                                        privacy.plot_attack]


def plot(runs: list[Run], outdir: str | Path) -> list[Path]:
    """Every figure in ``PLOTS`` into ``outdir`` (created); returns the paths written."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return [p for fn in PLOTS for p in fn(runs, outdir)]


# --- command line -------------------------------------------------------------------------

def expand(args: list[str]) -> list[Path]:
    """Files as given, folders as every ``*.h5`` below them (sorted); missing paths are kept
    so that ``load`` names them."""
    paths = []
    for arg in map(Path, args):
        paths += sorted(arg.rglob("*.h5")) if arg.is_dir() else [arg]
    return paths


def load(paths: list[Path], warn: Callable[[str], None]) -> list[Run]:
    """Every readable result; each refused file is named through ``warn``."""
    runs = []
    for path in paths:
        if not path.is_file():
            warn(f"{path}: no such file")
            continue
        try:
            runs.append(read(path))
        except NotAResult as exc:  # its message names the file
            warn(str(exc))
        except (ValueError, OSError, KeyError) as exc:  # a damaged result, e.g. truncated
            warn(f"{path} cannot be read ({exc!r})")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}",
                                     description="Tables and figures from splitmpi results.")
    parser.add_argument("paths", nargs="+", metavar="RESULTS.h5|FOLDER",
                        help="result files, or folders searched recursively for *.h5")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_const", dest="fmt", const="csv",
                     help="machine readable: per table a '# title' line, header, rows")
    fmt.add_argument("--markdown", action="store_const", dest="fmt", const="markdown")
    parser.add_argument("--plot", metavar="DIR",
                        help="also write PNG figures into DIR (their paths go to stderr)")
    parser.add_argument("--wire", action="store_true",
                        help="with --plot: also draw what crosses the wire for one sample "
                             "(cnn5 activation maps after a conv block vs after its max-pool)")
    args = parser.parse_args(argv)

    paths = expand(args.paths)
    messages = []
    runs = load(paths, messages.append)
    level = "warning: skipped" if runs else "error"
    for message in messages:
        print(f"{PROG}: {level}: {message}", file=sys.stderr)
    if not runs:
        print(f"{PROG}: error: no splitmpi results among "
              f"{', '.join(args.paths)}", file=sys.stderr)
        return 2
    sys.stdout.write(render(tables(runs), args.fmt or "text", notes(runs)))
    if args.plot:
        written = plot(runs, args.plot)
        if args.wire:
            written.append(privacy.wire_figure(config.from_json(runs[0].attrs["config"]),
                                               Path(args.plot)))
        for path in written:
            print(f"{PROG}: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
