#!/usr/bin/env python3
"""Run a whole table of the papers: one splitmpi run ("cell") per row/column of the table.

    python jobs/sweep.py table1 [--dry-run] [--only GLOB] [--slurm] [-- key=value ...]
    python jobs/sweep.py tableI -- train.epochs=1          # extra overrides for every cell

Tables (see configs/*.yaml for the settings of each cell):
  table1  "multiple classification with split learning", table 1: data set (mnist, cifar10,
          imagenet) x sharing / non-sharing x ResNet-50 cut (layer1, layer2, layer3); 18 cells
          named <data>-<sharing|nonsharing>-<cut>, from configs/table1_<data>_<share>.yaml
  tableI  "spatio-temporal split learning", table I: cnn5 on CIFAR-10 with 0..4 blocks on the
          clients; 5 cells named cut0..cut4, from configs/tableI_cifar10_cnn5.yaml
  modes   the split-learning modes and the compressed cut layer on one run (cnn5 cut 2,
          built-in data, sharing weighted by samples); 10 cells from configs/modes_cnn5.yaml:
          sl (round robin), sl-sequential (SplitFed's baseline), sfl_v1, sfl_v2 (sequential),
          parallel, and on sl: int8, fp8, topk0.1 (activations and features coded),
          int8-grad, fp8-grad (gradients coded too)

Each cell writes RESULTS_DIR/<table>/<cell>.h5 (RESULTS_DIR: --results, else the
environment variable RESULTS_DIR, else results/) and its output to <cell>.log beside it.
A cell whose file exists and is finished (root attribute ``finished``) is skipped, so a
sweep can be re-run after a failure or a time limit and only does what is left. An
unfinished leftover (killed run, unreadable file) is renamed to
``<cell>.h5.unfinished-<UTC time>`` (or deleted with --unfinished=delete) before its cell
runs again.

Locally each cell runs as ``mpiexec -n 1+CLIENTS python -m splitmpi -c CONFIG ...``, one
after the other. With --slurm the cells still to do are written to
RESULTS_DIR/<table>/cells-<time>.json and submitted as one job array,
``sbatch --array=0-(n-1) slurm/sweep_array.sh CELLS.json``; array task i runs cell i with
``python jobs/sweep.py --cells CELLS.json --index i`` (srun --mpi=$SRUN_MPI, default pmi2,
inside the task).

Exit status: 0 every cell finished (or was skipped), 1 a cell failed, 2 bad arguments or
configuration (checked for every cell before anything runs).
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitmpi import config as splitconfig
from splitmpi import logs, reader
from splitmpi.errors import ConfigError
from splitmpi.models import PAPER_CUTS

log = logging.getLogger("splitmpi.jobs.sweep")

ROOT = Path(__file__).resolve().parent.parent  # the repository: its configs/ and slurm/

CONFIGS = ROOT / "configs"
ARRAY_SCRIPT = ROOT / "slurm" / "sweep_array.sh"


@dataclass
class Cell:
    """One run of the sweep: one cell of the paper's table (one config and overrides)."""
    name: str
    config: str  # absolute path of the YAML file
    overrides: list[str] = field(default_factory=list)  # the cell's own, then the extras
    output: str = ""  # absolute path of the results file


def table1() -> list[Cell]:
    return [Cell(f"{data}-{share}-{cut}", str(CONFIGS / f"table1_{data}_{share}.yaml"),
                 [f"model.cut={cut}"])
            for data in ("mnist", "cifar10", "imagenet")
            for share in ("sharing", "nonsharing")
            for cut in PAPER_CUTS["resnet50"]]


def tableI() -> list[Cell]:
    return [Cell(f"cut{cut}", str(CONFIGS / "tableI_cifar10_cnn5.yaml"), [f"model.cut={cut}"])
            for cut in PAPER_CUTS["cnn5"]]


MODE_CELLS = {  # cell -> overrides of configs/modes_cnn5.yaml (sl, round robin, no coding)
    "sl": [],
    "sl-sequential": ["server.schedule=sequential"],
    "sfl_v1": ["split.mode=sfl_v1"],
    "sfl_v2": ["split.mode=sfl_v2", "server.schedule=sequential"],
    "parallel": ["split.mode=parallel"],
    "int8": ["comm.compress=int8"],
    "fp8": ["comm.compress=fp8"],
    "topk0.1": ["comm.compress=topk:0.1"],
    "int8-grad": ["comm.compress=int8", "comm.compress_grad=true"],
    "fp8-grad": ["comm.compress=fp8", "comm.compress_grad=true"],
}


def modes() -> list[Cell]:
    """Every mode, then the codecs on sl: one config, so that only the cell's keys differ."""
    return [Cell(name, str(CONFIGS / "modes_cnn5.yaml"), list(overrides))
            for name, overrides in MODE_CELLS.items()]


TABLES = {"table1": table1, "tableI": tableI, "modes": modes}


# --- cells and their results files ---------------------------------------------------------

def expand(table: str, only: list[str], extras: list[str], results: Path) -> list[Cell]:
    """The table's cells (those matching any ``only`` glob), with extras and output paths."""
    cells = [c for c in TABLES[table]()
             if not only or any(fnmatch.fnmatchcase(c.name, pat) for pat in only)]
    for cell in cells:
        cell.overrides = cell.overrides + list(extras)
        cell.output = str((results / table / f"{cell.name}.h5").resolve())
    return cells


def resolve(cell: Cell) -> splitconfig.Config:
    """The cell's full config, validated (raises ConfigError)."""
    return splitconfig.load(cell.config, cell.overrides + [f"output={cell.output}"])


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(stored: dict, expected: dict) -> list[str]:
    """Keys set differently in a results file and in the cell (keys in both; not output)."""
    a, b = _flatten(stored), _flatten(expected)
    return [f"{k}: {a[k]!r} in the file, {b[k]!r} now" for k in sorted(a.keys() & b.keys())
            if k not in ("output", "overwrite") and a[k] != b[k]]


def state(path: Path) -> tuple[str, reader.Run | None]:
    """'missing', 'finished' or 'unfinished' (a killed run, or not a results file at all)."""
    if not path.exists():
        return "missing", None
    try:
        run = reader.read(path)
    except (reader.NotAResult, OSError, KeyError, ValueError):
        return "unfinished", None
    return ("finished" if run.finished else "unfinished"), run


def clear_leftover(path: Path, how: str) -> str:
    """Move an unfinished results file out of the way; says what was done."""
    if how == "delete":
        path.unlink()
        return f"deleted unfinished leftover {path}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.unfinished-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.unfinished-{stamp}-{n}")
        n += 1
    path.rename(target)
    return f"moved unfinished leftover {path.name} to {target.name}"


def say(message: str) -> None:
    """A line of the sweep's story (``splitmpi.logs``), told apart from its cells' lines."""
    log.info(f"sweep: {message}")


def check_skip(cell: Cell) -> tuple[str, str]:
    """(state, message) of a cell's results file before running it; a finished file made
    with another config is warned about."""
    status, run = state(Path(cell.output))
    if status != "finished":
        return status, ""
    changed = differences(run.config, resolve(cell).to_dict())
    if changed:
        log.warning(f"sweep: {cell.output} was made with a different config ("
                    + "; ".join(changed) + "); move it away to run this cell again")
    return status, f"skip {cell.name}: {cell.output} finished {run.attrs['finished']}"


# --- running one cell ----------------------------------------------------------------------

def default_mpiexec(python: str) -> str:
    here = Path(python).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def command(cell: Cell, ranks: int, launcher: str, python: str, mpiexec: str) -> list[str]:
    if launcher == "srun":
        start = ["srun", f"--mpi={os.environ.get('SRUN_MPI', 'pmi2')}", "-n", str(ranks)]
    else:
        start = [mpiexec, "-n", str(ranks)]
    return start + [python, "-m", "splitmpi", "-c", cell.config, *cell.overrides,
                    f"output={cell.output}"]


def run_cell(cell: Cell, ranks: int, args, to_log: bool = True) -> int:
    """Run one cell unless it is finished. Its output goes to <cell>.log beside its results
    (``to_log``) or to this process's own stdout (array tasks: the Slurm .out). Exit code."""
    status, message = check_skip(cell)
    if status == "finished":
        say(message)
        return 0
    out = Path(cell.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if status == "unfinished":
        say(f"{cell.name}: {clear_leftover(out, args.unfinished)}")
    cmd = command(cell, ranks, args.launcher, args.python, args.mpiexec)
    log_file = out.with_suffix(".log")
    say(f"run {cell.name} -> {out}" + (f" (log {log_file.name})" if to_log else ""))
    started = time.monotonic()
    with (open(log_file, "a") if to_log else open(os.devnull)) as f:
        sink = f if to_log else sys.stdout
        sink.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} "
                   f"{shlex.join(cmd)}\n")
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
            sink.write(f"# killed after --timeout {args.timeout} s\n")
        except BaseException:  # Ctrl-C, SIGTERM: take the whole job down with us
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    seconds = time.monotonic() - started
    if rc == 0 and state(out)[0] != "finished":
        rc = 1  # exit 0 but no finished file: count it as failed
    say(f"{'done' if rc == 0 else 'FAILED'} {cell.name} (exit {rc}, {seconds:.1f} s)"
        + ("" if rc == 0 or not to_log else f": see {log_file}"))
    return rc


# --- Slurm ---------------------------------------------------------------------------------

def sbatch_command(cells_file: Path, n: int, table: str, ranks: int, args) -> list[str]:
    array = f"0-{n - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    cmd = ["sbatch", f"--array={array}", f"--job-name=splitmpi-{table}", f"--ntasks={ranks}",
           f"--output={cells_file.parent}/%x-%A_%a.out"]
    if args.wait:
        cmd.append("--wait")
    return cmd + list(args.sbatch_arg) + [str(ARRAY_SCRIPT), str(cells_file)]


def submit(table: str, todo: list[Cell], ranks: int, results: Path, args) -> int:
    if not todo:
        say("nothing to submit: every cell is finished")
        return 0
    if not args.dry_run and not shutil.which("sbatch"):
        return fail("--slurm but there is no sbatch on PATH",
                    "run on a Slurm login node, or drop --slurm to run the cells here")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cells_file = (results / table / f"cells-{stamp}.json").resolve()
    cmd = sbatch_command(cells_file, len(todo), table, ranks, args)
    if args.dry_run:
        say("would write " + str(cells_file) + " and run: " + shlex.join(cmd))
        return 0
    cells_file.parent.mkdir(parents=True, exist_ok=True)
    cells_file.write_text(json.dumps({"table": table, "ranks": ranks,
                                      "cells": [asdict(c) for c in todo]}, indent=1) + "\n")
    env = dict(os.environ)
    env.setdefault("PYTHON", args.python)  # array tasks run this same Python
    env["SPLITMPI_HOME"] = str(ROOT)
    say(f"wrote {cells_file} ({len(todo)} cells); " + shlex.join(cmd))
    return subprocess.run(cmd, env=env).returncode


# --- command line --------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python jobs/sweep.py", usage="%(prog)s [options] TABLE [-- key=value ...]",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", nargs="?", choices=sorted(TABLES), help="the table to run")
    p.add_argument("--results", default=os.environ.get("RESULTS_DIR", "results"),
                   help="results folder (default: $RESULTS_DIR, else results/)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="run only cells whose name matches (repeatable), e.g. 'mnist-*'")
    p.add_argument("--clients", type=int, default=3, help="clients per run (ranks = 1+N)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells, their state and commands; run or submit nothing")
    p.add_argument("--unfinished", choices=("rename", "delete"), default="rename",
                   help="what to do with an unfinished leftover before rerunning its cell")
    p.add_argument("--launcher", choices=("mpiexec", "srun"), default=None,
                   help="how to start the ranks (default: mpiexec; srun for --cells)")
    p.add_argument("--python", default=os.environ.get("PYTHON", sys.executable),
                   help="Python of the ranks (default: $PYTHON, else this one)")
    p.add_argument("--mpiexec", default=None, help="mpiexec (default: beside --python, or PATH)")
    p.add_argument("--timeout", type=float, default=None, help="kill a cell after SECONDS")
    g = p.add_argument_group("Slurm")
    g.add_argument("--slurm", action="store_true",
                   help="submit the unfinished cells as one job array (slurm/sweep_array.sh)")
    g.add_argument("--max-parallel", type=int, default=0, metavar="K",
                   help="at most K array tasks at once (--array=0-N%%K)")
    g.add_argument("--wait", action="store_true", help="sbatch --wait: return when all ended")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    g.add_argument("--cells", type=Path, help="cells file written by --slurm (array tasks)")
    g.add_argument("--index", type=int, help="the cell of --cells to run ($SLURM_ARRAY_TASK_ID)")
    return p


def fail(message: str, fix: str) -> int:
    print(f"sweep: error: {message}\n  fix: {fix}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extras = argv[argv.index("--") + 1:] if "--" in argv else []  # for every cell
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = parser().parse_args(argv)
    args.extras = extras
    logs.setup()
    # SIGTERM (scancel, a time limit) ends the running cell's whole job too, see run_cell
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.mpiexec = args.mpiexec or default_mpiexec(args.python)
    if args.cells is not None:  # one array task
        if args.index is None:
            return fail("--cells needs --index", "pass --index $SLURM_ARRAY_TASK_ID")
        spec = json.loads(args.cells.read_text())
        if not 0 <= args.index < len(spec["cells"]):
            return fail(f"--index {args.index} not in 0..{len(spec['cells']) - 1}",
                        f"use an index of {args.cells}")
        args.launcher = args.launcher or "srun"
        cell = Cell(**spec["cells"][args.index])
        try:
            resolve(cell)
        except ConfigError as exc:
            return fail(f"cell {cell.name}: {exc.problem}", exc.fix)
        return run_cell(cell, spec["ranks"], args, to_log=False)

    if args.table is None:
        return fail("no table given", f"name one of: {', '.join(sorted(TABLES))}")
    args.launcher = args.launcher or "mpiexec"
    if args.clients < 1:
        return fail(f"--clients {args.clients}", "use 1 or more clients")
    for extra in args.extras:
        if extra.split("=", 1)[0] == "output":
            return fail("output= is set by the sweep (RESULTS_DIR/<table>/<cell>.h5)",
                        "use --results DIR instead")
    cells = expand(args.table, args.only, args.extras, Path(args.results))
    if not cells:
        return fail(f"no cell of {args.table} matches --only {' '.join(args.only)}",
                    "see the cell names with --dry-run")
    ranks = 1 + args.clients
    todo = []
    for cell in cells:
        try:
            resolve(cell)
            status, message = check_skip(cell)
        except ConfigError as exc:
            return fail(f"cell {cell.name}: {exc.problem}", exc.fix)
        if status == "finished":
            say(message)
            continue
        todo.append(cell)
        if args.dry_run:
            say(f"[{len(todo) - 1}] {cell.name} ({status}): "
                + shlex.join(command(cell, ranks, args.launcher, args.python, args.mpiexec)))
    if args.slurm:
        return submit(args.table, todo, ranks, Path(args.results), args)
    if args.dry_run:
        say(f"{len(todo)} of {len(cells)} cells to run")
        return 0
    failed = [cell.name for cell in todo if run_cell(cell, ranks, args) != 0]
    done = len(todo) - len(failed)
    say(f"{args.table}: {done} run, {len(cells) - len(todo)} skipped, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
