"""``python -m splitmpi.bench ... --smoke`` under real mpiexec: each benchmark runs end to end,
prints its table and ratio line, and saves JSON with the expected keys. No timing is
asserted (the smoke sizes measure nothing)."""
import json
import re

import pytest
import torch

import mpirun
from splitmpi.bench.train import in_turn

COMMON = ("benchmark", "smoke", "date", "world_size", "cores", "mpi_library", "torch",
          "rows", "ratio", "ratio_line", "settings")


def bench(n, name, tmp_path, default_path=False):
    """Run it; the JSON goes to --json PATH, or to bench-NAME.json in the working folder."""
    path = tmp_path / (f"bench-{name}.json" if default_path else "out/b.json")
    path.parent.mkdir(exist_ok=True)
    where = () if default_path else ("--json", str(path))
    proc = mpirun.ok(n, name, "--smoke", *where, module="splitmpi.bench", cwd=tmp_path,
                     timeout=180)
    doc = json.loads(path.read_text())
    for key in COMMON:
        assert key in doc, key
    assert doc["benchmark"] == name and doc["smoke"] is True and doc["world_size"] == n
    assert doc["ratio_line"] in proc.stdout
    return proc.stdout, doc


def test_transport(tmp_path):
    out, doc = bench(2, "transport", tmp_path, default_path=True)
    assert re.search(r"^ratio transport/raw at >= 1 MiB: \d+\.\d\d$", out, re.M), out
    assert "raw GB/s" in out and "splitmpi GB/s" in out and "pickle GB/s" in out
    sizes = [r["bytes"] for r in doc["rows"]]
    assert sizes == sorted(sizes) and sizes[0] == 4096 and max(sizes) >= 1 << 20
    for row in doc["rows"]:
        assert row["raw_gbps"] > 0 and row["splitmpi_gbps"] > 0 and row["ratio"] > 0
    assert any(row["pickle_gbps"] for row in doc["rows"])


def test_transport_needs_two_ranks(tmp_path):
    proc = mpirun.run(1, "transport", "--smoke", module="splitmpi.bench", cwd=tmp_path,
                      timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "mpiexec -n 2" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing saved


@pytest.mark.parametrize("n", [2, 3])
def test_train(tmp_path, n):
    out, doc = bench(n, "train", tmp_path)
    clients = n - 1
    assert re.search(rf"^ratio split/monolithic at {clients} clients? \(median over models\): "
                     r"round_robin \d+\.\d\d, sequential \d+\.\d\d, fifo \d+\.\d\d; "
                     r"fifo/sequential samples/s: \d+\.\d\d$", out, re.M), out
    assert set(doc["ratio_by_schedule"]) == {"round_robin", "sequential", "fifo"}
    variants = [r["variant"] for r in doc["rows"]]
    assert variants == ["monolithic", "round_robin", "sequential", "fifo"]
    for row in doc["rows"]:
        assert row["clients"] == clients and row["samples_per_s"] > 0
    assert doc["settings"]["clients"] == clients
    assert not list(tmp_path.glob("*.h5"))  # the runs' files went to a temporary folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where no GPU is visible")
def test_device_cuda_without_a_gpu_exits_2(tmp_path):
    proc = mpirun.run(2, "train", "--smoke", "--device", "cuda", module="splitmpi.bench",
                      cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--device cuda but no CUDA device is visible; use --device cpu" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing saved


def test_the_monolithic_baseline_takes_one_batch_of_each_client_in_turn():
    """The order round_robin serves the clients' batches in; a spent client drops out."""
    assert list(in_turn([[1, 2, 3], [], [4], [5, 6]])) == [1, 4, 5, 2, 6, 3]


def test_allreduce(tmp_path):
    out, doc = bench(3, "allreduce", tmp_path)
    assert re.search(r"^ratio sharing.average/raw Allreduce .* at 2 clients: \d+\.\d\d$",
                     out, re.M), out
    models = {(r["arch"], r["cut"]) for r in doc["rows"]}
    assert models == {("cnn5", "1"), ("resnet50", "layer2")}
    for row in doc["rows"]:
        assert row["floats"] > 0 and row["raw_ms"] > 0 and row["average_ms"] > 0


def test_memory(tmp_path):
    """One real 2-rank run, sampled from outside: every rank's figures, in a sane order, and
    neither of the cuts undone (the client maps no HDF5, nor triton: torch._dynamo stayed out)."""
    proc = mpirun.alone("memory", "--smoke", "--json", str(tmp_path / "m.json"),
                        module="splitmpi.bench", cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    doc = json.loads((tmp_path / "m.json").read_text())
    for key in COMMON:
        assert key in doc, key
    assert doc["benchmark"] == "memory" and doc["smoke"] is True
    assert re.search(r"^ratio deferred/dynamo PSS per rank at 2 ranks: nan; \d+ MB a rank, "
                     r"\d+\.\d ranks per GiB$", proc.stdout, re.M), proc.stdout
    assert [(r["variant"], r["ranks"], r["rank"]) for r in doc["rows"]] == [
        ("deferred", 2, 0), ("deferred", 2, 1)]
    for row in doc["rows"]:
        assert 0 < row["uss_mb"] <= row["pss_mb"] <= row["rss_mb"], row
        assert 100 < row["rss_mb"] < 4000 and row["threads"] >= 1, row  # torch is in it
    assert doc["rows"][1]["libs"] == [], doc["rows"][1]
    assert doc["ranks_per_gib"] == pytest.approx(1024 / doc["pss_per_rank_mb"])
    assert not list(tmp_path.glob("*.h5"))  # the run wrote into a temporary folder


def test_clients(tmp_path):
    """Two real 4-rank runs, 3 and 12 clients on the same samples: each row's figures come
    from its run (every client trained one batch or more, memory sampled from outside)."""
    proc = mpirun.alone("clients", "--smoke", "--json", str(tmp_path / "c.json"),
                        module="splitmpi.bench", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["benchmark"] == "clients" and [r["clients"] for r in doc["rows"]] == [3, 12]
    for row in doc["rows"]:
        assert row["steps"] >= row["clients"] and row["epoch_s"] > 0, row
        assert 0.3 < row["peak_GiB"] < 8 and 0 < row["pss_GiB"] <= row["peak_GiB"], row
        assert row["write_ms"] > 0 and row["read_s"] > 0 and 0 <= row["test_accuracy"] <= 1
    assert re.search(r"^epoch time of 3 clients / 12 clients on the same 192 samples: "
                     r"\d+\.\d\d$", proc.stdout, re.M), proc.stdout
