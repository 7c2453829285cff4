"""Where a rank runs: device choice, threads per rank, mixed precision on the CPU path."""
import os

import pytest
import torch

import mpirun
from splitmpi import reader
from splitmpi.errors import ConfigError
from splitmpi.runtime import pick_device, pick_threads, pick_wait


def test_auto_picks_the_local_gpu_or_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("auto", 5) == torch.device("cuda", 1)  # node-local rank % GPUs
    assert pick_device("cuda", 2) == torch.device("cuda", 2)
    assert pick_device("cpu", 2) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        pick_device("cuda", 0)


def test_threads_share_the_node():
    assert pick_threads(3, 4, 2) == 3
    assert pick_threads(0, 10 ** 6, 2) == 1
    assert pick_threads(0, 4, 8) == 2  # e.g. Slurm binding 2 cores to each of 4 tasks


def test_node_cores_is_the_union_of_the_ranks_cores():
    """Bound to a core each (as Slurm's binding does), every rank still sees the node's 2."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    proc = mpirun.ok(2, module="check_cores", launch=("-bind-to", "core"), timeout=60)
    assert proc.stdout.count("own 1 node 2") == 2, proc.stdout


def test_ranks_sleep_while_waiting_only_where_they_outnumber_the_cores():
    assert pick_wait("auto", 4, 2) == "sleep"
    assert pick_wait("auto", 2, 2) == "spin" and pick_wait("auto", 4, 8) == "spin"
    assert pick_wait("spin", 4, 2) == "spin" and pick_wait("sleep", 1, 8) == "sleep"


def test_bf16_autocast_trains_on_cpu(tmp_path):
    mpirun.ok(3, *mpirun.TINY, "train.epochs=3", "train.amp=bf16", "output=amp.h5",
              cwd=tmp_path)
    mpirun.ok(3, *mpirun.TINY, "train.epochs=1", "output=fp32.h5", cwd=tmp_path)
    run, fp32 = reader.read(tmp_path / "amp.h5"), reader.read(tmp_path / "fp32.h5")
    assert run.config["train"]["amp"] == "bf16"
    for client, series in run.clients.items():
        assert series["train_loss"][-1] < series["train_loss"][0]
        # the same run in float32 (round_robin on the CPU is deterministic) gives the same
        # first epoch bit for bit: bf16 rounding must show, or train.amp was ignored
        assert series["train_loss"][0] != fp32.clients[client]["train_loss"][0]
