"""jobs/sweep.py: table expansion, dry runs, and a real local sweep on tiny synthetic data.

The script runs as a user runs it: ``python jobs/sweep.py ...`` from the repository."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import pytest

from mpirun import ROOT, env
from splitmpi import reader

SWEEP = "jobs/sweep.py"  # relative to ROOT, the working directory of every run
STAMP = re.compile(r"\[\d\d:\d\d:\d\d\] (WARNING: )?")
# tiny synthetic cells (mpirun.TINY sizes, one epoch, no loader workers, 2 clients)
TINY = ["data.name=synthetic", "data.train_size=300", "data.test_size=120",
        "data.image_size=16", "train.batch_size=25", "train.epochs=1", "data.workers=0",
        "train.device=cpu"]


def sweep(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SWEEP, *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def lines(proc, word: str, stream: str = "stdout") -> list[str]:
    """The sweep's own log lines that start with ``word``, less their time stamp."""
    told = (STAMP.sub("", line, count=1) for line in getattr(proc, stream).splitlines()
            if STAMP.match(line))
    return [line for line in told if line.startswith(f"sweep: {word}")]


def test_table1_cells(tmp_path):
    proc = sweep("table1", "--dry-run", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    cells = [line.split()[2] for line in lines(proc, "[")]
    assert len(cells) == 18  # 3 data sets x sharing/non-sharing x 3 cuts
    assert cells[:3] == ["mnist-sharing-layer1", "mnist-sharing-layer2", "mnist-sharing-layer3"]
    assert "imagenet-nonsharing-layer3" in cells
    first = lines(proc, "[0]")[0]
    assert "-n 4" in first and "configs/table1_mnist_sharing.yaml" in first
    assert "model.cut=layer1" in first
    assert f"output={tmp_path}/table1/mnist-sharing-layer1.h5" in first


def test_tableI_only_and_extras(tmp_path):
    proc = sweep("tableI", "--dry-run", "--results", str(tmp_path), "--only", "cut[0-2]",
                 "--clients", "2", "--", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    listed = lines(proc, "[")
    assert [line.split()[2] for line in listed] == ["cut0", "cut1", "cut2"]
    assert all("-n 3" in line and "train.epochs=1" in line for line in listed)
    assert not (tmp_path / "tableI").exists()  # a dry run writes nothing


def test_modes_cells(tmp_path):
    proc = sweep("modes", "--dry-run", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr  # every cell's config validated
    listed = lines(proc, "[")
    cells = {line.split()[2]: line for line in listed}
    assert list(cells) == ["sl", "sl-sequential", "sfl_v1", "sfl_v2", "parallel",
                           "int8", "fp8", "topk0.1", "int8-grad", "fp8-grad"]
    assert all("-n 4" in line and "configs/modes_cnn5.yaml" in line for line in listed)
    assert "modes_cnn5.yaml output=" in cells["sl"]  # the config's own: sl, round robin
    assert "server.schedule=sequential output=" in cells["sl-sequential"]
    assert "split.mode=sfl_v2 server.schedule=sequential output=" in cells["sfl_v2"]
    assert "split.mode=parallel output=" in cells["parallel"]
    assert "comm.compress=topk:0.1 output=" in cells["topk0.1"]
    assert "comm.compress=fp8 comm.compress_grad=true output=" in cells["fp8-grad"]
    assert f"output={tmp_path}/modes/int8-grad.h5" in cells["int8-grad"]


def test_slurm_dry_run(tmp_path):
    proc = sweep("tableI", "--slurm", "--dry-run", "--results", str(tmp_path),
                 "--max-parallel", "2", "--sbatch-arg=--partition=gpu")
    assert proc.returncode == 0, proc.stderr
    assert "sbatch --array=0-4%2 --job-name=splitmpi-tableI --ntasks=4" in proc.stdout
    assert "--partition=gpu" in proc.stdout and "slurm/sweep_array.sh" in proc.stdout
    assert not (tmp_path / "tableI").exists()


@pytest.mark.parametrize("extra, word", [(["train.epochs=0"], "train.epochs"),
                                         (["train.no_such=1"], "train.no_such"),
                                         (["output=x.h5"], "output")])
def test_bad_overrides_exit_2(tmp_path, extra, word):
    proc = sweep("tableI", "--results", str(tmp_path), "--", *extra)
    assert proc.returncode == 2 and word in proc.stderr, proc.stderr
    assert not (tmp_path / "tableI").exists()  # checked before anything ran


def test_unknown_only_exit_2(tmp_path):
    proc = sweep("tableI", "--results", str(tmp_path), "--only", "nope")
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


@pytest.mark.slow
def test_local_sweep_skips_finished_and_reruns_unfinished(tmp_path):
    args = ("tableI", "--only", "cut1", "--only", "cut2", "--clients", "2",
            "--results", str(tmp_path), "--", *TINY)
    proc = sweep(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(lines(proc, "done")) == 2
    files = {c: tmp_path / "tableI" / f"{c}.h5" for c in ("cut1", "cut2")}
    for cell, path in files.items():
        run = reader.read(path)
        assert run.finished and sorted(run.clients) == [1, 2]
        assert run.config["model"]["cut"] == int(cell[-1])
        assert all(len(s["test_accuracy"]) == 1 for s in run.clients.values())
        assert (tmp_path / "tableI" / f"{cell}.log").read_text().count("epoch 1/1 done") == 1
    mtimes = {c: p.stat().st_mtime_ns for c, p in files.items()}

    # cut2's run "was killed": its file loses the finished mark
    with h5py.File(files["cut2"], "a") as f:
        del f.attrs["finished"]
    again = sweep(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [line.split()[2] for line in lines(again, "skip")] == ["cut1:"]
    assert files["cut1"].stat().st_mtime_ns == mtimes["cut1"]  # not touched
    moved = list((tmp_path / "tableI").glob("cut2.h5.unfinished-*"))
    assert len(moved) == 1 and "moved unfinished leftover" in again.stdout
    assert not reader.read(moved[0]).finished
    assert reader.read(files["cut2"]).finished and len(lines(again, "done")) == 1

    # all finished: nothing runs; a changed setting is pointed out, not silently mixed in
    third = sweep(*args[:-len(TINY)], *TINY[:-3], "train.epochs=2", *TINY[-2:])
    assert third.returncode == 0 and len(lines(third, "skip")) == 2
    changed = lines(third, "", "stderr")
    assert len(changed) == 2 and "train.epochs: 1 in the file, 2 now" in changed[0]
    assert {c: p.stat().st_mtime_ns for c, p in files.items()}["cut1"] == mtimes["cut1"]


@pytest.mark.slow
def test_array_task_runs_one_cell(tmp_path):
    """What slurm/sweep_array.sh runs in each array task, here with mpiexec outside Slurm."""
    cells = tmp_path / "cells.json"
    out = tmp_path / "tableI" / "cut1.h5"
    cells.write_text(json.dumps({"table": "tableI", "ranks": 2, "cells": [
        {"name": "cut1", "config": str(ROOT / "configs" / "tableI_cifar10_cnn5.yaml"),
         "overrides": ["model.cut=1", *TINY], "output": str(out)}]}))
    proc = sweep("--cells", str(cells), "--index", "0", "--launcher", "mpiexec")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "epoch 1/1 done" in proc.stdout  # the ranks' output on the task's stdout
    assert reader.read(out).finished
    bad = sweep("--cells", str(cells), "--index", "1")
    assert bad.returncode == 2 and "--index 1" in bad.stderr
