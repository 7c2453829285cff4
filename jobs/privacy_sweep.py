#!/usr/bin/env python3
"""Privacy matrix: cut x defense x strength, each cell a real MPI run attacked afterwards.

    python jobs/privacy_sweep.py [-c CONFIG] [--out DIR] [--cuts 1 2 3 4]
        [--defenses none noise nopeek dropout grad dp labeldp maxnorm] [--noise 0.1 0.5 1]
        [--nopeek 0.5 2] [--dropout 0.2 0.5] [--grad 0.1 0.5] [--grad-clip 0.2]
        [--dp 8 1] [--dp-clip 1] [--label-dp 2 1] [--defense-cuts 1]
        [--method decoder completion]
        [--client 1] [--clients 3] [--only GLOB] [--dry-run] [--slurm ...] [-- key=value ...]

Cells, for every cut: ``none`` (no defense), then one per strength of each defense (at
every cut, or only at --defense-cuts): ``noise`` (defense.noise_sigma), ``nopeek``
(defense.nopeek_alpha), ``dropout`` (defense.dropout), ``grad`` (defense.grad_noise, with
defense.grad_clip=--grad-clip: against label inference), ``dp`` (defense.act_epsilon,
with defense.act_clip=--dp-clip: DP activations; only where the config knows these keys)
``labeldp`` (defense.label_epsilon: randomized response on the training labels) and
``maxnorm`` (defense.grad_maxnorm=true, one cell: Li et al.'s defense against the norm
attack).
Cell names are ``<arch>-cut<cut>-<defense><strength>`` (e.g. ``cnn5-cut1-noise0.5``).

Each cell is one results file, ``DIR/<cell>.h5`` (DIR: --out, else
``$RESULTS_DIR/privacy``, else ``results/privacy``), its output in ``DIR/<cell>.log``:

1. the training run, ``mpiexec -n 1+CLIENTS python -m splitmpi [-c CONFIG] EXTRA
   model.cut=C DEFENSE attack.labels=true train.checkpoint_every=EPOCHS output=DIR/<cell>.h5``
   (label inference measured in every epoch, a checkpoint at the last);
2. per attack of --method (decoder, completion by default; rmle), ``python -m
   splitmpi.attack [-c CONFIG] EXTRA attack.checkpoint=DIR/<cell>.h5 attack.method=M
   attack.client=K output=DIR/<cell>.h5``: the run's last-epoch checkpoint attacked, the
   result added to the run's own file as ``/attack/<M>``.

A cell is finished when its file is a finished run holding every requested attack group;
it is skipped. A finished run missing some attacks gets only those; an unfinished file
(killed run) is renamed ``<cell>.h5.unfinished-<time>`` and the cell runs again. Locally
the cells run one after the other; the tables of ``splitmpi.report.attacks`` are printed at
the end. With --slurm the cells still to do are written to ``DIR/cells-<time>.json`` and
submitted as one job array (``sbatch --array=0-(n-1) --wrap``); array task i runs
``python jobs/privacy_sweep.py --cells CELLS.json --index i`` (its MPI run through srun).

Exit status: 0 all cells done or skipped, 1 a cell failed, 2 bad arguments/configuration
(every cell's config is checked before anything runs).
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
import subprocess
import sys
import time
from pathlib import Path

import sweep  # jobs/sweep.py, beside this script: launchers, leftovers, results state

from splitmpi import config as splitconfig
from splitmpi import logs, reader
from splitmpi.errors import ConfigError
from splitmpi.models import PAPER_CUTS
from splitmpi.report.attacks import attack_tables, matrix_table

log = logging.getLogger("splitmpi.jobs.privacy_sweep")

DEFENSES = ("noise", "nopeek", "dropout", "grad", "dp", "labeldp")
DEFENSE_KEYS = {"noise": "defense.noise_sigma", "nopeek": "defense.nopeek_alpha",
                "dropout": "defense.dropout", "grad": "defense.grad_noise",
                "dp": "defense.act_epsilon", "labeldp": "defense.label_epsilon"}
FLAGS = {"labeldp": "label-dp"}  # the option of a kind whose name is not its own
METHODS = ("decoder", "completion", "rmle")


def dp_known(path: str | None) -> bool:
    """Whether this splitmpi's config has the DP activation keys."""
    try:
        splitconfig.load(path, ["defense.act_clip=1", "defense.act_epsilon=8"])
    except ConfigError as exc:
        return "act_" not in str(exc)  # another problem: let the cell checks name it
    return True


def cells(arch: str, cuts: list[str], strengths: dict[str, list[float]],
          defense_cuts: list[str] | None, grad_clip: float = 0.2,
          dp_clip: float = 1.0, maxnorm: bool = False) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every cell, in run order; ``maxnorm`` adds the one cell of the
    max-norm defense per cut (a switch: it has no strength)."""
    fixed = {"grad": [f"defense.grad_clip={grad_clip:g}"],
             "dp": [f"defense.act_clip={dp_clip:g}"]}
    out = []
    for cut in cuts:
        out.append((f"{arch}-cut{cut}-none", [f"model.cut={cut}"]))
        if defense_cuts is not None and cut not in defense_cuts:
            continue
        for kind, values in strengths.items():
            for v in values:
                out.append((f"{arch}-cut{cut}-{kind}{v:g}",
                            [f"model.cut={cut}", *fixed.get(kind, []),
                             f"{DEFENSE_KEYS[kind]}={v:g}"]))
        if maxnorm:
            out.append((f"{arch}-cut{cut}-maxnorm",
                        [f"model.cut={cut}", "defense.grad_maxnorm=true"]))
    return out


def state(path: Path, methods: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """('missing' | 'unfinished' | 'finished', the requested attacks the file lacks)."""
    status, run = sweep.state(path)
    if status != "finished":
        return status, methods
    groups = run.groups.get("attack", {})
    return status, tuple(m for m in methods if m not in groups)


def train_command(name: str, overrides: list[str], spec: dict, launcher: str,
                  mpiexec: str, python: str) -> list[str]:
    if launcher == "srun":
        start = ["srun", f"--mpi={os.environ.get('SRUN_MPI', 'pmi2')}", "-n", str(spec["ranks"])]
    else:
        start = [mpiexec, "-n", str(spec["ranks"])]
    out = Path(spec["out"]) / f"{name}.h5"
    return start + [python, "-m", "splitmpi", *spec["config"], *spec["extra"], *overrides,
                    "attack.labels=true", f"train.checkpoint_every={spec['epochs']}",
                    f"output={out}"]


def attack_command(name: str, method: str, spec: dict, python: str) -> list[str]:
    out = Path(spec["out"]) / f"{name}.h5"
    return [python, "-m", "splitmpi.attack", *spec["config"], *spec["extra"],
            f"attack.checkpoint={out}", f"attack.method={method}",
            f"attack.client={spec['client']}", f"output={out}"]


def run_cell(name: str, overrides: list[str], spec: dict, args, to_log: bool = True) -> str:
    """Train (unless finished) and attack one cell; what happened, 'FAILED ...' if it did."""
    methods = tuple(spec["methods"])
    path = Path(spec["out"]) / f"{name}.h5"
    status, missing = state(path, methods)
    if status == "finished" and not missing:
        return "done, skipped"
    path.parent.mkdir(parents=True, exist_ok=True)
    cmds = []
    if status != "finished":
        if status == "unfinished":
            log.info(f"{name}: {sweep.clear_leftover(path, 'rename')}")
        cmds.append(train_command(name, overrides, spec, args.launcher, args.mpiexec,
                                  args.python))
    cmds += [attack_command(name, m, spec, args.python) for m in missing]
    start = time.monotonic()
    with (open(path.with_suffix(".log"), "a") if to_log else open(os.devnull)) as f:
        sink = f if to_log else sys.stdout
        for cmd in cmds:
            sink.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} "
                       f"{shlex.join(cmd)}\n")
            sink.flush()
            rc = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT)
            if rc == 0 and cmd is cmds[0] and status != "finished" and \
                    sweep.state(path)[0] != "finished":
                rc = 1  # exit 0 but no finished run
            if rc != 0:
                where = f", see {path.with_suffix('.log')}" if to_log else ""
                what = "training" if "splitmpi.attack" not in cmd else cmd[-3]
                return f"FAILED (exit {rc} in {what}{where})"
    return f"ok in {time.monotonic() - start:.0f} s"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python jobs/privacy_sweep.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="base YAML config (default: built-in defaults)")
    p.add_argument("--out", help="results folder (default $RESULTS_DIR/privacy or "
                                 "results/privacy)")
    p.add_argument("--cuts", nargs="+", help="cuts (default: every cut of model.arch that "
                                             "leaves a layer on the client)")
    p.add_argument("--defenses", nargs="+", choices=("none", *DEFENSES, "maxnorm"),
                   help="defenses to run (default: all; dp only where the config has "
                        "defense.act_clip); none = the undefended cells")
    p.add_argument("--noise", nargs="*", type=float, default=[0.1, 0.5, 1.0],
                   help="defense.noise_sigma values")
    p.add_argument("--nopeek", nargs="*", type=float, default=[0.5, 2.0],
                   help="defense.nopeek_alpha values")
    p.add_argument("--dropout", nargs="*", type=float, default=[0.2, 0.5],
                   help="defense.dropout values")
    p.add_argument("--grad", nargs="*", type=float, default=[0.1, 0.5],
                   help="defense.grad_noise values (with defense.grad_clip=--grad-clip)")
    p.add_argument("--grad-clip", type=float, default=0.2, help="defense.grad_clip of the "
                                                                "grad cells")
    p.add_argument("--dp", nargs="*", type=float, default=[8.0, 1.0],
                   help="defense.act_epsilon values (with defense.act_clip=--dp-clip)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="defense.act_clip of the dp "
                                                              "cells")
    p.add_argument("--label-dp", dest="labeldp", nargs="*", type=float, default=[2.0, 1.0],
                   help="defense.label_epsilon values (randomized response on the labels)")
    p.add_argument("--defense-cuts", nargs="+", help="run the defended cells only at these "
                                                     "cuts (default: every cut)")
    p.add_argument("--method", nargs="+", default=["decoder", "completion"],
                   choices=(*METHODS, "both"), help="attacks on each run (both = decoder "
                                                    "rmle)")
    p.add_argument("--client", type=int, default=1, help="the client attacked (attack.client)")
    p.add_argument("--clients", type=int, default=3, help="clients per run (ranks = 1+N)")
    p.add_argument("--only", help="run only cells whose name matches this glob")
    p.add_argument("--dry-run", action="store_true", help="list the cells and commands")
    p.add_argument("--python", default=os.environ.get("PYTHON", sys.executable))
    p.add_argument("--mpiexec", default=None, help="mpiexec (default: beside --python, or PATH)")
    p.add_argument("--launcher", choices=("mpiexec", "srun"), default=None,
                   help="how to start the ranks (default: mpiexec; srun for --cells)")
    g = p.add_argument_group("Slurm")
    g.add_argument("--slurm", action="store_true", help="submit the cells to do as one job "
                                                        "array")
    g.add_argument("--max-parallel", type=int, default=0, metavar="K",
                   help="at most K array tasks at once")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option (repeatable)")
    g.add_argument("--cells", type=Path, help="cells file written by --slurm (array tasks)")
    g.add_argument("--index", type=int, help="the cell of --cells to run")
    return p.parse_args(argv), extra


def error(message: str) -> int:
    print(f"privacy_sweep: error: {message}", file=sys.stderr)
    return 2


def submit(todo: list[tuple[str, list[str]]], spec: dict, args) -> int:
    out = Path(spec["out"]).resolve()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cells_file = out / f"cells-{stamp}.json"
    task = (f"{shlex.quote(args.python)} {shlex.quote(str(Path(__file__).resolve()))} "
            f"--cells {shlex.quote(str(cells_file))} --index $SLURM_ARRAY_TASK_ID")
    array = f"0-{len(todo) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    cmd = ["sbatch", f"--array={array}", "--job-name=splitmpi-privacy",
           f"--ntasks={spec['ranks']}", f"--output={out}/%x-%A_%a.out", *args.sbatch_arg,
           f"--wrap={task}"]
    if args.dry_run:
        log.info(f"would write {cells_file} and run: {shlex.join(cmd)}")
        return 0
    if not shutil.which("sbatch"):
        return error("--slurm but there is no sbatch on PATH; run on a Slurm login node, "
                     "or drop --slurm")
    out.mkdir(parents=True, exist_ok=True)
    cells_file.write_text(json.dumps({"spec": {**spec, "out": str(out)},
                                      "cells": todo}, indent=1) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(sweep.ROOT), env.get("PYTHONPATH", "")])
    log.info(f"wrote {cells_file} ({len(todo)} cells); {shlex.join(cmd)}")
    return subprocess.run(cmd, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    logs.setup()
    args.mpiexec = args.mpiexec or sweep.default_mpiexec(args.python)
    if args.cells is not None:  # one array task
        spec_cells = json.loads(args.cells.read_text())
        if args.index is None or not 0 <= args.index < len(spec_cells["cells"]):
            return error(f"--index must be in 0..{len(spec_cells['cells']) - 1}")
        args.launcher = args.launcher or "srun"
        name, overrides = spec_cells["cells"][args.index]
        said = run_cell(name, overrides, spec_cells["spec"], args, to_log=False)
        log.info(f"{name}: {said}")
        return 1 if said.startswith("FAILED") else 0
    args.launcher = args.launcher or "mpiexec"
    for key in extra:
        if key.split("=", 1)[0] in ("output", "attack.checkpoint", "attack.method",
                                    "attack.client", "attack.labels",
                                    "train.checkpoint_every"):
            return error(f"{key.split('=', 1)[0]} is set by the sweep; use its options")
    if args.clients < 1:
        return error(f"--clients {args.clients}: use 1 or more")
    if not 1 <= args.client <= args.clients:
        return error(f"--client {args.client} is not one of the clients 1..{args.clients}")
    try:
        base = splitconfig.load(args.config, [*extra, *([f"model.cut={args.cuts[0]}"]
                                                        if args.cuts else [])])
    except ConfigError as exc:
        return error(str(exc))
    arch = base.model.arch
    if not args.cuts and arch not in PAPER_CUTS:
        return error(f"no default cuts for model.arch={arch}; give them with --cuts "
                     "(python -m splitmpi --list-cuts lists them)")
    cuts = args.cuts or [str(c) for c in PAPER_CUTS[arch] if c != 0]
    wanted = set(args.defenses or ("none", *DEFENSES, "maxnorm"))
    if "dp" in wanted and not dp_known(args.config):
        if args.defenses and "dp" in args.defenses:
            return error("--defenses dp, but this splitmpi has no defense.act_clip")
        wanted.discard("dp")
    strengths = {k: getattr(args, k) for k in DEFENSES if k in wanted and getattr(args, k)}
    for kind, values in strengths.items():
        for v in values:
            if not v > 0:
                return error(f"--{FLAGS.get(kind, kind)} {v:g}: a strength must be above 0 "
                             "(the undefended cell is 'none')")
    todo = cells(arch, cuts, strengths, args.defense_cuts, args.grad_clip, args.dp_clip,
                 "maxnorm" in wanted)
    if "none" not in wanted:
        todo = [c for c in todo if not c[0].endswith("-none")]
    if args.only:
        todo = [c for c in todo if fnmatch.fnmatch(c[0], args.only)]
    if not todo:
        return error("no cell to run (see --defenses, --only and the strengths)")
    for name, overrides in todo:  # every cell's config is valid before anything runs
        try:
            splitconfig.load(args.config, [*extra, *overrides])
        except ConfigError as exc:
            return error(f"in cell {name}: {exc}")
    methods = []
    for m in args.method:
        methods += ["decoder", "rmle"] if m == "both" else [m]
    out = Path(args.out or Path(os.environ.get("RESULTS_DIR", "results")) / "privacy")
    spec = {"out": str(out), "config": ["-c", args.config] if args.config else [],
            "extra": extra, "ranks": 1 + args.clients, "epochs": base.train.epochs,
            "client": args.client, "methods": list(dict.fromkeys(methods))}
    if args.slurm:
        left = [c for c in todo if state(out / f"{c[0]}.h5", tuple(spec["methods"]))
                != ("finished", ())]
        if not left:
            log.info("nothing to submit: every cell is finished")
            return 0
        return submit(left, spec, args)
    failed = []
    for i, (name, overrides) in enumerate(todo, start=1):
        if args.dry_run:
            cmds = [train_command(name, overrides, spec, args.launcher, args.mpiexec,
                                  args.python)]
            cmds += [attack_command(name, m, spec, args.python) for m in spec["methods"]]
            log.info(f"[{i}/{len(todo)}] {name}: " + " && ".join(map(shlex.join, cmds)))
            continue
        said = run_cell(name, overrides, spec, args)
        log.info(f"[{i}/{len(todo)}] {name}: {said}")
        if said.startswith("FAILED"):
            failed.append(name)
    if args.dry_run:
        return 0
    runs = []
    for path in sorted(out.glob("*.h5")):
        try:
            runs.append(reader.read(path))
        except (reader.NotAResult, OSError, KeyError, ValueError):
            pass
    for title, rows in [*matrix_table(runs), *attack_tables(runs)]:
        print(f"\n{title}")
        if rows:
            keys = list(rows[0])
            print("  ".join(keys))
            for row in rows:
                print("  ".join(str(row[k]) for k in keys))
    if failed:
        print(f"privacy_sweep: {len(failed)} cell(s) failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
