#!/usr/bin/env python3
"""Privacy sweep: cut x defense x strength, one ``python -m splitmpi.attack`` per cell.

    python jobs/privacy_sweep.py [-c CONFIG] [--out DIR] [--cuts 1 2 3 4]
        [--noise 0.1 0.5 1] [--nopeek 0.5 2] [--dropout 0.2 0.5] [--defense-cuts 1]
        [--method both] [--only GLOB] [--dry-run] [-- key=value ...]

Cells, for every cut: ``none`` (no defense), then one per noise sigma, NoPeek alpha and
dropout rate (at every cut, or only at --defense-cuts). Cell names are
``<arch>-cut<cut>-<defense><strength>`` (e.g. ``cnn5-cut1-noise0.5``); each writes
``DIR/<cell>.h5`` (a splitmpi results file with ``/attack/decoder`` and/or
``/attack/rmle``) and its output to ``DIR/<cell>.log``. DIR is --out, else
``$RESULTS_DIR/privacy``, else ``results/privacy``.

Each cell trains its own model (the defense changes training) in one process, so the
utility (client 1's test accuracy) in each file belongs to that cell's defense. A cell
whose file already holds every requested method is skipped, so a killed sweep re-runs
only what is left (a method's group is written whole when it finishes). The cells run one
after the other; at the end the tables of ``splitmpi.report.attacks.attack_tables`` are printed
for the whole folder (``python -m splitmpi.report`` shows them too).

Exit status: 0 all cells done or skipped, 1 a cell failed, 2 bad arguments/configuration
(the base config is checked before anything runs).
"""
from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from splitmpi import config as splitconfig
from splitmpi import logs, reader
from splitmpi.errors import ConfigError
from splitmpi.models import PAPER_CUTS
from splitmpi.report.attacks import attack_tables

log = logging.getLogger("splitmpi.jobs.privacy_sweep")

DEFENSE_KEYS = {"noise": "defense.noise_sigma", "nopeek": "defense.nopeek_alpha",
                "dropout": "defense.dropout"}


def cells(arch: str, cuts: list[str], strengths: dict[str, list[float]],
          defense_cuts: list[str] | None) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every cell, in run order."""
    out = []
    for cut in cuts:
        out.append((f"{arch}-cut{cut}-none", [f"model.cut={cut}"]))
        if defense_cuts is not None and cut not in defense_cuts:
            continue
        for kind, values in strengths.items():
            for v in values:
                out.append((f"{arch}-cut{cut}-{kind}{v:g}",
                            [f"model.cut={cut}", f"{DEFENSE_KEYS[kind]}={v:g}"]))
    return out


def base_config(path: str | None, extra: list[str], cuts: list[str] | None):
    """The sweep's config before the cells' overrides (each cell sets its own cut)."""
    return splitconfig.load(path, [*extra, *([f"model.cut={cuts[0]}"] if cuts else [])])


def done(path: Path, methods: tuple[str, ...]) -> bool:
    try:
        groups = reader.read(path).groups.get("attack", {})
    except reader.NotAResult:
        return False
    return all(m in groups for m in methods)


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
    p.add_argument("--noise", nargs="*", type=float, default=[0.1, 0.5, 1.0],
                   help="defense.noise_sigma values")
    p.add_argument("--nopeek", nargs="*", type=float, default=[0.5, 2.0],
                   help="defense.nopeek_alpha values")
    p.add_argument("--dropout", nargs="*", type=float, default=[0.5],
                   help="defense.dropout values")
    p.add_argument("--defense-cuts", nargs="+", help="run the defended cells only at these "
                                                     "cuts (default: every cut)")
    p.add_argument("--method", default="both", choices=("decoder", "rmle", "both"))
    p.add_argument("--only", help="run only cells whose name matches this glob")
    p.add_argument("--dry-run", action="store_true", help="list the cells and commands")
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    logs.setup()
    try:
        base = base_config(args.config, extra, args.cuts)
    except ConfigError as exc:
        print(f"privacy_sweep: error: {exc}", file=sys.stderr)
        return 2
    arch = base.model.arch
    if not args.cuts and arch not in PAPER_CUTS:
        print(f"privacy_sweep: error: no default cuts for model.arch={arch}; give them with "
              "--cuts (python -m splitmpi --list-cuts lists them)", file=sys.stderr)
        return 2
    cuts = args.cuts or [str(c) for c in PAPER_CUTS[arch] if c != 0]
    strengths = {k: v for k, v in (("noise", args.noise), ("nopeek", args.nopeek),
                                   ("dropout", args.dropout)) if v}
    todo = cells(arch, cuts, strengths, args.defense_cuts)
    if args.only:
        todo = [c for c in todo if fnmatch.fnmatch(c[0], args.only)]
    for name, overrides in todo:  # every cell's config is valid before anything runs
        try:
            splitconfig.load(args.config, [*extra, *overrides])
        except ConfigError as exc:
            print(f"privacy_sweep: error in cell {name}: {exc}", file=sys.stderr)
            return 2
    out = Path(args.out or Path(os.environ.get("RESULTS_DIR", "results")) / "privacy")
    methods = ("decoder", "rmle") if args.method == "both" else (args.method,)
    failed = []
    for i, (name, overrides) in enumerate(todo, start=1):
        path = out / f"{name}.h5"
        cmd = [sys.executable, "-m", "splitmpi.attack"]
        cmd += ["-c", args.config] if args.config else []
        cmd += [*extra, *overrides, f"attack.method={args.method}", f"attack.output={path}"]
        if args.dry_run:
            log.info(f"[{i}/{len(todo)}] {name}: {' '.join(cmd)}")
            continue
        if done(path, methods):
            log.info(f"[{i}/{len(todo)}] {name}: done, skipped")
            continue
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as cell_log:
            rc = subprocess.call(cmd, stdout=cell_log, stderr=subprocess.STDOUT)
        status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {out / name}.log)"
        log.info(f"[{i}/{len(todo)}] {name}: {status} in {time.perf_counter() - start:.0f} s")
        if rc != 0:
            failed.append(name)
    if args.dry_run:
        return 0
    runs = []
    for path in sorted(out.glob("*.h5")):
        try:
            runs.append(reader.read(path))
        except reader.NotAResult:
            pass
    for title, rows in attack_tables(runs):
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
