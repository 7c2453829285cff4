"""The slurm/ job scripts under a real one-node Slurm (tests/slurm_cluster.py, docs/cluster.md).

Needs root and apt-get (or Slurm and munge already installed); skipped otherwise. The node
declares 8 CPUs and 4 fake GPUs, so jobs pass ``--cpus-per-task`` on the sbatch command line
(the scripts ask for more cores than the test node has) and ``train.device=cpu``.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

import datasets
import slurm_cluster
from mpirun import ROOT
from splitmpi import reader

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(900)]

# tiny runs: a few 32x32 images, one epoch, on the CPU (the cluster's GPUs are fake)
TINY_IMAGENET = ("train.epochs=1", "data.image_size=32", "data.workers=0",
                 "train.batch_size=8", "train.device=cpu")


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(f"no Slurm test cluster: {reason}")
    c = slurm_cluster.SlurmCluster()
    c.start()  # on failure it stops whatever it started, then raises
    try:
        yield c
    finally:
        c.stop()


def job_id(proc: subprocess.CompletedProcess) -> str:
    found = re.search(r"Submitted batch job (\d+)", proc.stdout)
    assert found, f"sbatch said:\n{proc.stdout}\n{proc.stderr}"
    return found.group(1)


def show(path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


def check_run(path, clients: int, epochs: int = 1) -> reader.Run:
    run = reader.read(path)
    assert run.finished, f"{path} not finished"
    assert run.attrs["world_size"] == clients + 1
    assert sorted(run.clients) == list(range(1, clients + 1))
    for k, series in run.clients.items():
        acc = series["test_accuracy"]
        assert len(acc) == epochs and all(0 <= a <= 1 for a in acc), (k, acc)
        assert len(series["train_loss"]) == epochs and math.isfinite(series["train_loss"][-1])
    return run


def test_imagenet_split_sbatch(cluster, tmp_path):
    """`sbatch --wait slurm/imagenet_split.sh` as users run it: 4 ranks by srun --mpi=pmi2."""
    data, results, work = tmp_path / "imagenet", tmp_path / "results", tmp_path / "work"
    work.mkdir()
    # ten classes: the config's explicit partition [[0-3], [4-6], [7-9]] over class folders
    datasets.write_imagefolder(data, classes=10, train_per_class=3, val_per_class=2, size=32)
    proc = cluster.sbatch(
        "--wait", f"--chdir={work}", "--cpus-per-task=2", "slurm/imagenet_split.sh",
        *TINY_IMAGENET,
        env={"DATA_ROOT": str(data), "RESULTS_DIR": str(results), "PYTHON": sys.executable},
        cwd=ROOT, timeout=400, logs=[work])
    job = job_id(proc)
    log = work / f"imagenet-split-{job}.out"  # --output=%x-%j.out, in the job's directory
    assert proc.returncode == 0, f"job {job} exit {proc.returncode}:\n{show(log)}\n" \
                                 f"{cluster.log_tail()}"
    text = log.read_text()
    assert "srun --mpi=pmi2 -n 4" in text and "epoch 1/1 done" in text, text

    run = check_run(results / f"imagenet-split-{job}.h5", clients=3)
    cfg = run.config
    assert (cfg["data"]["name"], cfg["data"]["root"]) == ("imagenet", str(data))
    assert (cfg["model"]["arch"], cfg["model"]["cut"]) == ("resnet50", "layer2")
    assert cfg["split"]["share"] is True and cfg["train"]["epochs"] == 1
    assert run.classes == {1: [0, 1, 2, 3], 2: [4, 5, 6], 3: [7, 8, 9]}

    # the #SBATCH lines (with their trailing comments) were read: 4 tasks, a GPU each
    info = cluster.command("scontrol", "show", "job", job).stdout
    assert "JobName=imagenet-split" in info and "NumTasks=4" in info, info
    assert "TresPerTask=gres:gpu:1" in info, info


def test_mnist_split_mpiexec_launcher(cluster, tmp_path):
    """LAUNCHER=mpiexec: the pip MPICH's mpiexec (beside PYTHON) starts the ranks in the job;
    OUTPUT chooses the file; a cnn5 override keeps it quick."""
    data, work = tmp_path / "data", tmp_path / "work"
    work.mkdir()
    datasets.write_mnist(data, train_per_class=6, test_per_class=3)
    out = tmp_path / "mnist.h5"
    proc = cluster.sbatch(
        "--wait", f"--chdir={work}", "--cpus-per-task=2", "slurm/mnist_split.sh",
        "train.epochs=1", "train.batch_size=16", "data.workers=0", "train.device=cpu",
        "model.arch=cnn5", "model.cut=2", "data.image_size=32",
        env={"DATA_ROOT": str(data), "OUTPUT": str(out), "PYTHON": sys.executable,
             "LAUNCHER": "mpiexec"},
        cwd=ROOT, timeout=400, logs=[work])
    job = job_id(proc)
    log = work / f"mnist-split-{job}.out"
    assert proc.returncode == 0, f"job {job} exit {proc.returncode}:\n{show(log)}"
    assert "mpiexec -n 4" in log.read_text()
    run = check_run(out, clients=3)
    assert run.config["data"]["name"] == "mnist" and run.config["split"]["share"] is True


def test_sweep_array(cluster, tmp_path):
    """jobs/sweep.py --slurm: one array task per cell (slurm/sweep_array.sh); a second
    submission finds every cell finished and submits nothing."""
    results = tmp_path / "results"
    tiny = ["data.name=synthetic", "data.train_size=120", "data.test_size=60",
            "data.image_size=16", "train.batch_size=20", "train.epochs=1", "data.workers=0",
            "train.device=cpu"]
    cmd = [sys.executable, str(ROOT / "jobs" / "sweep.py"), "tableI", "--only", "cut1",
           "--only", "cut2", "--clients", "2", "--results", str(results), "--slurm", "--wait",
           "--sbatch-arg=--cpus-per-task=1", "--", *tiny]
    try:
        proc = subprocess.run(cmd, env=cluster.env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=400)
    except subprocess.TimeoutExpired as exc:
        cluster.cancel_all()
        raise AssertionError(f"sweep still waiting after 400 s:\n{exc.stdout}\n" + "".join(
            show(p) for p in (results / "tableI").glob("*.out"))) from None
    outs = sorted((results / "tableI").glob("*.out"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr
                                  + "".join(show(p) for p in outs) + cluster.log_tail())
    assert len(outs) == 2, outs  # %x-%A_%a.out: one per array task
    assert "--array=0-1" in proc.stdout
    for cell in ("cut1", "cut2"):
        run = check_run(results / "tableI" / f"{cell}.h5", clients=2)
        assert run.config["model"]["cut"] == int(cell[-1])
        assert run.config["split"]["topology"] == "label_sharing"

    again = subprocess.run(cmd, env=cluster.env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to submit" in again.stdout and again.stdout.count("skip ") == 2, again.stdout


def test_signal_checkpoints_and_the_job_resubmits_itself(cluster, tmp_path):
    """USR1 (what --signal sends before the time limit) reaches every rank; the run stops
    after a checkpoint (within the epoch, or at its end if the signal came after its
    training phase) with exit 75, the script resubmits itself, and the next job resumes the
    same results file to the end."""
    import time
    data, work = tmp_path / "imagenet", tmp_path / "work"
    work.mkdir()
    datasets.write_imagefolder(data, classes=10, train_per_class=12, val_per_class=2, size=32)
    output = work / "chain.h5"
    args = ("train.epochs=4", "data.image_size=32", "data.workers=0", "train.batch_size=4",
            "train.device=cpu", "model.arch=cnn5", "model.cut=2")
    proc = cluster.sbatch(f"--chdir={work}", "--cpus-per-task=2", "slurm/imagenet_split.sh",
                          *args, env={"DATA_ROOT": str(data), "OUTPUT": str(output),
                                      "PYTHON": sys.executable}, cwd=ROOT, timeout=60)
    first = job_id(proc)
    first_log = work / f"imagenet-split-{first}.out"
    deadline = time.monotonic() + 300
    while "epoch 1/4 done" not in show(first_log):
        assert time.monotonic() < deadline, f"{show(first_log)}\n{cluster.queue()}"
        time.sleep(0.5)
    cluster.command("scancel", "--signal=USR1", first)
    while True:  # the first job's log names the job it queued; wait for that one to finish
        found = re.search(r"Submitted batch job (\d+)", show(first_log))
        if found and output.exists() and reader.read(output).finished:
            break
        assert time.monotonic() < deadline, f"{show(first_log)}\n{cluster.queue()}\n" + \
            "\n".join(show(p) for p in work.glob("*.out"))
        time.sleep(1)
    text = show(first_log)
    assert "stopped by a signal" in text and "resubmitting" in text, text
    second_log = work / f"imagenet-split-{found.group(1)}.out"
    assert "resuming after epoch" in show(second_log), show(second_log)
    run = check_run(output, clients=3, epochs=4)
    assert len(run.attrs["resumed"]) == 1
