"""Failures end the whole job: bad input exits 2 with one message before any work; an
exception on any rank aborts every rank quickly with that rank's traceback."""
import time

import pytest
import torch

import mpirun


@pytest.mark.parametrize("n, args, words", [
    (2, ["train.epoch=3"], ["unknown config key 'train.epoch'"]),
    (2, ["train.lr=fast"], ["train.lr must be float"]),
    (2, ["model.arch=resnet50", "model.cut=layer4"],
     ["model.cut=layer4 leaves the server no layer to train", "use one of: conv1, bn1"]),
    (2, ["model.arch=resnet5"], ["did you mean resnet50"]),
    (2, ["model.weights=nothere.pth"], ["model.weights=nothere.pth is not a file"]),
    (3, ["clients.count=1"], ["clients.count=1 is smaller than the 2 client ranks",
                              "mpirun -n 2"]),
    (3, ["data.partition=[[0,1],[2,12]]"], ["names class 12"]),
    (2, ["data.name=mnist", "data.root=nowhere"], ["train-images-idx3-ubyte", "nowhere"]),
    (2, ["data.name=cifar10", "data.root=nowhere"], ["cifar-10-batches-py"]),
    (2, ["data.name=svhn", "data.root=nowhere"], ["train_32x32.mat", "nowhere"]),
    (2, ["-c", "missing.yaml"], ["missing.yaml not found"]),
    pytest.param(2, ["train.device=cuda"], ["train.device=cuda but no CUDA device"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
])
def test_bad_input_exits_2_with_one_message(tmp_path, n, args, words):
    proc = mpirun.run(n, *args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("splitmpi: error") == 1, proc.stderr
    for w in words:
        assert w in proc.stderr
    assert not (tmp_path / "results.h5").exists()  # nothing started


@pytest.mark.parametrize("name, writer, path", [
    ("mnist", "write_mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("cifar10", "write_cifar10", "cifar-10-batches-py/data_batch_3"),
])
def test_a_truncated_data_file_is_a_clear_error(tmp_path, name, writer, path):
    import datasets
    getattr(datasets, writer)(tmp_path / "data")
    broken = tmp_path / "data" / path
    broken.write_bytes(broken.read_bytes()[:5000])
    proc = mpirun.run(2, f"data.name={name}", "data.root=data", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "corrupt or truncated" in proc.stderr and proc.stderr.count("splitmpi: error") == 1


def test_existing_output_is_not_clobbered(tmp_path):
    out = tmp_path / "results.h5"
    out.write_bytes(b"precious")
    proc = mpirun.run(2, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "overwrite=true" in proc.stderr
    assert out.read_bytes() == b"precious"


def test_an_output_folder_that_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file where the output folder should go")
    proc = mpirun.run(2, "output=taken/run/out.h5", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("splitmpi: error") == 1, proc.stderr
    assert "cannot create output folder taken/run" in proc.stderr
    assert "writable path" in proc.stderr


def test_help_lists_the_keys(tmp_path):
    proc = mpirun.run(2, "--help", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.count("usage:") == 1 and "model.cut=" in proc.stdout


@pytest.mark.parametrize("bad", [0, 2])
def test_a_failing_rank_ends_the_job(tmp_path, bad):
    start = time.monotonic()
    proc = mpirun.run(4, str(bad), "output=out.h5", module="failing_rank", cwd=tmp_path,
                      timeout=120)
    took = time.monotonic() - start
    assert proc.returncode not in (0, 2), proc.returncode
    assert f"rank {bad} failed" in proc.stderr
    assert f"deliberate failure on rank {bad}" in proc.stderr  # the traceback is shown
    assert took < 60, took  # startup included; without the abort this would hang
