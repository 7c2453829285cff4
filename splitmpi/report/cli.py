"""``python -m splitmpi.report RESULTS.h5|FOLDER ... [--csv | --markdown] [--plot DIR]``

Every function in ``TABLES`` maps a list of ``reader.Run`` to a list of tables (``[]`` where
it does not apply); every function in ``PLOTS`` maps ``(runs, folder)`` to the PNG paths it
wrote. A further report is one more function appended to either list.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..reader import NotAResult, Run, read
from . import attacks, training
from .render import Table, render

PROG = "splitmpi.report"

TABLES: list[Callable[[list[Run]], list[Table]]] = [
    training.runs_table, training.sharing_table, training.cut_tables, training.modes_table,
    training.audit_table, attacks.attack_tables, attacks.matrix_table]
PLOTS: list[Callable[[list[Run], Path], list[Path]]] = [
    training.plot_accuracy, training.plot_client_accuracy, training.plot_cuts,
    training.plot_modes, attacks.plot_attack, attacks.plot_matrix]


def tables(runs: list[Run]) -> list[Table]:
    """Every non-empty table of every ``TABLES`` function (plain (title, rows) tuples too)."""
    return [t for fn in TABLES for t in fn(runs) if t[1]]


def plot(runs: list[Run], outdir: str | Path) -> list[Path]:
    """Every figure in ``PLOTS`` into ``outdir`` (created); returns the paths written."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return [p for fn in PLOTS for p in fn(runs, outdir)]


def notes(runs: list[Run]) -> list[str]:
    """What a reader of the text must not miss: runs that did not finish."""
    late = [r for r in runs if not r.finished]
    if not late:
        return []
    return [f"{len(late)} unfinished run(s) (no 'finished' attribute): numbers are from the "
            "last epoch written and are kept apart from finished runs (status unfinished):"
            ] + [f"  - {r.path} ({r.epochs} epoch(s) written)" for r in late]


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
                             "(cnn5 activation maps after a conv block vs after its max-pool; "
                             "needs torch)")
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
        if args.wire:  # the one figure that runs a network: torch is imported for it alone
            from ..config import from_json
            from .wire import wire_figure

            written.append(wire_figure(from_json(runs[0].attrs["config"]), Path(args.plot)))
        for path in written:
            print(f"{PROG}: wrote {path}", file=sys.stderr)
    return 0
