"""Checkpoint, signals and resume: a stopped or killed run goes on where it was, and a
resumed run's metrics equal an uninterrupted run's, bit for bit (CPU, same seed)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mpirun
from splitmpi import reader

ARGS = ("data.train_size=400", "data.test_size=100", "data.image_size=16",
        "train.batch_size=25", "train.epochs=4")
SERIES = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_samples")


def start(tmp_path, *args) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{len(list(tmp_path.glob('*.log')))}.log"
    cmd = [mpirun.mpiexec(), "-n", "3", sys.executable, "-m", "splitmpi", *ARGS, *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=mpirun.env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    return proc, log


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in time:\n{log.read_text()}"
        time.sleep(0.1)


def rank_pid(output: str, rank: int) -> int:
    """The PID of one rank of the job writing ``output`` (hydra sets PMI_RANK)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"output={output}".encode() in cmdline and f"PMI_RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"rank {rank} of {output} not found")


def assert_same_metrics(a_path: Path, b_path: Path, counters: bool = True) -> None:
    """Every metric equal; and the bytes sent, unless a run stopped within an epoch (its
    turned-down request and stop messages are bytes the uninterrupted run did not send)."""
    a, b = reader.read(a_path), reader.read(b_path)
    assert a.finished and b.finished and a.epochs == b.epochs == 4
    for k in a.clients:
        for name in SERIES + ("batches_served",):
            assert np.array_equal(a.clients[k][name], b.clients[k][name], equal_nan=True), \
                (k, name)
    if counters:
        assert np.array_equal(a.comm["bytes_sent"], b.comm["bytes_sent"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("full")
    mpirun.ok(3, *ARGS, "output=full.h5", cwd=folder)
    return folder / "full.h5"


# A train phase of about a second per epoch (each client sleeps 0.1 s before each request),
# so a signal sent at the first step of an epoch lands within its train phase; a progress
# line per step says when that is; -v shows the clients' lines.
WITHIN = ("clients.delay_ms=uniform:100,100", "train.log_every=1", "-v")


def test_sigusr1_to_every_rank_stops_within_the_epoch_and_resumes_bit_for_bit(
        tmp_path, uninterrupted):
    """SIGUSR1 to mpiexec, which forwards it to every rank, as Slurm's --signal does,
    in epoch 2's train phase: every rank stops within at most the step it is in, all
    checkpoint their place in the epoch, exit 75, and the resumed run's metrics equal the
    uninterrupted run's bit for bit (no loader workers here; with them, below)."""
    proc, log = start(tmp_path, "output=cut.h5", *WITHIN)
    wait_for(log, "epoch 2/4: 25/", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, log.read_text()
    text = log.read_text()
    assert "stopped by a signal within epoch 2" in text, text
    took = re.findall(r"signal 10 at training step \d+, (\d+) step\(s\) before stopping", text)
    assert len(took) == 3 and all(int(n) <= 1 for n in took), took  # server and 2 clients
    stopped = reader.read(tmp_path / "cut.h5")
    assert not stopped.finished and stopped.epochs == 1
    done = mpirun.ok(3, *ARGS, "output=cut.h5", "train.resume=auto", cwd=tmp_path)
    assert "resuming after epoch 1 from cut.h5.ckpt/epoch-00001-step-" in done.stdout
    assert_same_metrics(uninterrupted, tmp_path / "cut.h5", counters=False)
    assert list(reader.read(tmp_path / "cut.h5").attrs["resumed"]) == [1]


def test_a_signal_to_one_client_stops_within_the_epoch_and_resumes_bit_for_bit(
        tmp_path, uninterrupted):
    """SIGUSR1 reaches client 2 alone, in epoch 2's train phase. Targets: that client takes
    at most the step it is in before it stops; the server serves no step after it heard
    (it turns the other client's next request down); every rank checkpoints its place in
    the epoch and the job exits 75; the resumed run's metrics equal the uninterrupted run's
    bit for bit. Both parts run with loader workers (data.workers=2), the uninterrupted
    run without: so every epoch's batches are the same with workers as without, the
    epochs after a resume too (a resumed process drew the workers' seeds anew before).
    Before, the stop waited for the epoch's end and resume repeated it."""
    workers = 2
    proc, log = start(tmp_path, "output=mid.h5", f"data.workers={workers}", *WITHIN)
    wait_for(log, "epoch 2/4: 25/", proc)
    os.kill(rank_pid("mid.h5", 2), signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, log.read_text()
    text = log.read_text()
    assert "stopped by a signal within epoch 2" in text, text
    assert "client 2 had a signal" in text and "client 1 turned down" in text, text
    steps = re.search(r"client 2 stopped within epoch 2 after (\d+) batches \(signal "
                      r"\d+ at training step (\d+), (\d+) step\(s\) before stopping\)", text)
    assert steps, text
    assert int(steps[1]) < 8 and int(steps[3]) <= 1, steps[0]  # 8 batches a client
    assert re.search(r"server: no signal here", text)
    folder, = [p.name for p in (tmp_path / "mid.h5.ckpt").iterdir()]
    assert re.fullmatch(r"epoch-00001-step-\d{7}", folder), folder
    assert reader.read(tmp_path / "mid.h5").epochs == 1
    done = mpirun.ok(3, *ARGS, "output=mid.h5", "train.resume=auto",
                     f"data.workers={workers}", cwd=tmp_path)
    assert f"from mid.h5.ckpt/{folder}" in done.stdout
    assert_same_metrics(uninterrupted, tmp_path / "mid.h5", counters=False)
    # bytes: the stopped epoch counts both processes' parts, plus the turned-down request
    # and the stop messages; every other epoch is the uninterrupted run's
    full = reader.read(uninterrupted).comm["bytes_sent"].sum(axis=1)
    resumed = reader.read(tmp_path / "mid.h5").comm["bytes_sent"].sum(axis=1)
    assert np.array_equal(np.delete(full, 1), np.delete(resumed, 1))
    assert full[1] < resumed[1] < 1.2 * full[1], (full, resumed)


@pytest.fixture
def checkpointed(tmp_path) -> Path:
    mpirun.ok(3, *ARGS, "train.epochs=1", "train.checkpoint_every=1", "output=c.h5",
              cwd=tmp_path)
    return tmp_path / "c.h5.ckpt" / "epoch-00001"


def test_a_checkpoint_from_another_config_or_world_is_refused(tmp_path, checkpointed):
    other_cut = mpirun.run(3, *ARGS, "model.cut=1", "output=c.h5", "train.resume=auto",
                           cwd=tmp_path)
    assert other_cut.returncode == 2
    assert "saved by a different run" in other_cut.stderr
    assert "model.cut: saved 2, now 1" in other_cut.stderr
    other_world = mpirun.run(4, *ARGS, "output=c.h5", f"train.resume={checkpointed}",
                             cwd=tmp_path)
    assert other_world.returncode == 2 and "world_size: saved 3, now 4" in other_world.stderr


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, checkpointed):
    torch.save({"format": 1, "state": Payload()}, checkpointed / "rank-0.pt")
    proc = mpirun.run(3, *ARGS, "output=c.h5", f"train.resume={checkpointed}", cwd=tmp_path)
    assert proc.returncode == 2 and "could run code" in proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_resume_needs_a_complete_checkpoint(tmp_path):
    (tmp_path / "half").mkdir()
    proc = mpirun.run(2, "output=x.h5", "train.resume=half", cwd=tmp_path)
    assert proc.returncode == 2 and "not a complete checkpoint set" in proc.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 6 MB file system: one checkpoint set (~4.4 MB) fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs",
                                            str(mount)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_fails_clearly_and_keeps_the_last_checkpoint(tmp_path, tiny_disk):
    proc = mpirun.run(3, *ARGS, "train.checkpoint_every=1", f"train.checkpoint_dir={tiny_disk}",
                      "output=full.h5", cwd=tmp_path, timeout=120)
    assert proc.returncode not in (0, 2)
    assert "cannot write checkpoint" in proc.stderr and "No space left" in proc.stderr
    assert (tiny_disk / "epoch-00001" / "COMPLETE").exists()
    assert not (tiny_disk / "epoch-00002" / "COMPLETE").exists()
    assert reader.read(tmp_path / "full.h5").epochs == 2  # rows written so far are intact
    subprocess.run(["rm", "-rf", str(tiny_disk / "epoch-00002")])
    mpirun.ok(3, *ARGS, "train.epochs=2", f"train.checkpoint_dir={tiny_disk}",
              "output=full.h5", "train.resume=auto", cwd=tmp_path)
    assert reader.read(tmp_path / "full.h5").finished


def test_resume_is_exact_with_batchnorm_recalibration(tmp_path):
    """ResNet-50 with sharing: split.share_bn=recalibrate draws a sample of the shard after
    every averaging; a run resumed from epoch 1 still equals the uninterrupted one."""
    args = ("model.arch=resnet50", "model.cut=layer1", "data.image_size=8",
            "data.train_size=120", "data.test_size=60", "train.batch_size=20",
            "split.share_bn=recalibrate", "split.bn_recalibrate_batches=2")
    mpirun.ok(3, *args, "train.epochs=2", "output=full.h5", cwd=tmp_path)
    mpirun.ok(3, *args, "train.epochs=1", "train.checkpoint_every=1", "output=cut.h5",
              cwd=tmp_path)
    mpirun.ok(3, *args, "train.epochs=2", "train.resume=auto", "output=cut.h5", cwd=tmp_path)
    full, resumed = reader.read(tmp_path / "full.h5"), reader.read(tmp_path / "cut.h5")
    assert full.epochs == resumed.epochs == 2
    for k in full.clients:
        for name in SERIES:
            assert np.array_equal(full.clients[k][name], resumed.clients[k][name]), (k, name)


def test_a_checkpoint_from_before_the_sharing_settings_resumes_as_it_ran(tmp_path):
    """0.1 wrote no split.share_bn/share_optimizer/share_weights: its runs averaged
    BatchNorm statistics, kept momentum and weighed clients equally. Asking for that
    resumes; the new default (recalibrate) is named as the difference. Nor did it know
    defense.label_epsilon: it resumes as 0 (off), and a run asking for it is refused."""
    from mpi4py import MPI

    from splitmpi import checkpoint, config
    from splitmpi.errors import ConfigError
    old = checkpoint.identity(config.load(None, []), 1)
    for name in ("share_bn", "bn_recalibrate_batches", "share_optimizer", "share_weights"):
        del old["split"][name]
    del old["defense"]["label_epsilon"]
    folder = tmp_path / "epoch-00001"
    folder.mkdir()
    torch.save({"format": checkpoint.FORMAT, "epoch": 1, "rank": 0, "state": {},
                "identity": old}, folder / "rank-0.pt")
    as_it_ran = config.load(None, ["split.share_bn=average"])
    assert checkpoint.load(folder, as_it_ran, MPI.COMM_SELF)["epoch"] == 1
    with pytest.raises(ConfigError, match="split.share_bn: saved 'average', now 'recalibrate'"):
        checkpoint.load(folder, config.load(None, []), MPI.COMM_SELF)
    with pytest.raises(ConfigError, match="split.share_weights: saved 'equal', now 'samples'"):
        checkpoint.load(folder, config.load(None, ["split.share_bn=average",
                                                   "split.share_weights=samples"]),
                        MPI.COMM_SELF)
    with pytest.raises(ConfigError, match="defense.label_epsilon: saved 0.0, now 1.0"):
        checkpoint.load(folder, config.load(None, ["split.share_bn=average",
                                                   "defense.label_epsilon=1"]), MPI.COMM_SELF)


@pytest.mark.parametrize("mode", [("split.mode=sfl_v1", "split.share_weights=samples"),
                                  ("split.mode=parallel",),
                                  ("clients.count=6", "clients.per_epoch=5"),
                                  ("defense.act_clip=5", "defense.act_epsilon=8",
                                   "attack.labels=true", "defense.label_epsilon=2")],
                         ids=["sfl_v1", "parallel", "logical", "dp_and_label_inference"])
def test_modes_stop_within_an_epoch_and_resume_bit_for_bit(tmp_path, mode):
    """sfl_v1's checkpoint within an epoch holds each client's cloud copy and its SGD,
    which differ until the epoch's averaging; parallel's steps each take both clients'
    batches, and a stop turns down a gathered step whole; 6 logical clients on 2 ranks,
    5 taking part each epoch, stop with each participant somewhere in its shard and the
    turn of round_robin between them; DP activations draw their noise from the clients'
    random state, label inference keeps feature-gradient rows on the server (a
    stopped epoch's rows are dropped and its resumed part records afresh), and the
    randomized-response labels (defense.label_epsilon) are drawn again, the same. Either way the
    resumed run's training and test metrics equal the uninterrupted one's, bit for bit."""
    mpirun.ok(3, *ARGS, *mode, "output=full.h5", cwd=tmp_path)
    proc, log = start(tmp_path, *mode, "output=cut.h5", *WITHIN)
    wait_for(log, "epoch 2/4: 25/", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, log.read_text()
    folder, = (tmp_path / "cut.h5.ckpt").iterdir()
    copies = torch.load(folder / "rank-0.pt", weights_only=True)["state"]["copies"]
    if "split.mode=sfl_v1" in mode:
        assert any(not torch.equal(copies[1]["cloud"][n], copies[2]["cloud"][n])
                   for n in copies[1]["cloud"])  # mid-epoch: each client's own
    mpirun.ok(3, *ARGS, *mode, "output=cut.h5", "train.resume=auto", cwd=tmp_path)
    assert_same_metrics(tmp_path / "full.h5", tmp_path / "cut.h5", counters=False)
    if "attack.labels=true" in mode:  # every epoch's scores but the stopped epoch 2's
        full, cut = (reader.read(tmp_path / f"{n}.h5") for n in ("full", "cut"))
        assert np.array_equal(full.epsilon, cut.epsilon) and full.epsilon[-1] > 0
        for k in full.label_inference:
            for name, series in full.label_inference[k].items():
                assert np.array_equal(np.delete(series, 1),
                                      np.delete(cut.label_inference[k][name], 1),
                                      equal_nan=True), (k, name)
