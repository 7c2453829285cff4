"""``tests/gpu/run.sh``, the GPU acceptance script, in its CPU mode: every step it takes on a
GPU node (staging, bf16 autocast, bf16 wire, a three-client ResNet-50 run read back, both
benchmarks) runs here at tiny sizes on the CPU, in the current environment
(``--no-install``), and the summary it writes lists each check, passed, with its figures.
Its GPU mode runs only on a GPU node (see the script's header)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "gpu" / "run.sh"
CHECKS = ["deps", "staging", "amp_bf16", "wire_bf16", "resnet50", "bench_transport",
          "bench_train"]


def run_script(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)  # the device tool's output folder: not ours here
    cmd = ["bash", str(SCRIPT), "--cpu", "--no-install", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), *args]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout} s:\n{exc.stdout}\n"
                             f"{exc.stderr}") from None


def row(md: str, name: str) -> str:
    """The summary table's line of check ``name``."""
    found = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
    assert len(found) == 1, (name, md)
    return found[0]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_cpu_mode_runs_every_check_and_writes_the_summary(tmp_path):
    start = time.monotonic()
    proc = run_script(tmp_path, timeout=400)  # ~40 s on 2 idle cores; CI may be loaded
    seconds = time.monotonic() - start
    out = tmp_path / "out"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    md = (out / "summary.md").read_text()
    doc = json.loads((out / "summary.json").read_text())
    assert md.startswith("# splitmpi GPU acceptance (cpu mode): PASS"), md
    assert doc["ok"] is True and doc["mode"] == "cpu"
    assert doc["card"].startswith("CPU only") and doc["card"] in md
    assert [c["name"] for c in doc["checks"]] == ["install", *CHECKS]
    assert doc["checks"][0]["status"] == "SKIP" and "SKIP" in row(md, "install")
    for check in doc["checks"][1:]:
        assert check["status"] == "PASS", check
        assert f"| {check['name']} | PASS |" in row(md, check["name"])
    figures = {c["name"]: c["figures"] for c in doc["checks"]}

    deps = figures["deps"]
    assert deps["missing"] == [] and "torch" in deps["versions"] and "mpi4py" in deps["versions"]
    assert deps["mpi_library"] and deps["mpi_library"] in md
    assert figures["staging"]["loopback"] == {"batches": 6, "staging_buffers": 2}
    assert figures["staging"]["two_ranks"]["bfloat16_wire"] == "ok"
    for name, amp, wire in (("amp_bf16", "bf16", "float32"), ("wire_bf16", "none", "bfloat16")):
        f = figures[name]
        assert (f["clients"], f["epochs"], f["device"]) == (1, 2, "cpu")
        assert (f["amp"], f["wire_dtype"]) == (amp, wire)
        assert f["bytes_sent"] > 0 and len(f["final_test_accuracy"]) == 1
        assert "final test accuracy" in row(md, name)
    # activations and gradients at half the bytes: about half the float32 run's traffic
    assert 0.4 < figures["wire_bf16"]["bytes_vs_baseline"] < 0.65
    assert "bytes vs float32-wire run 0." in row(md, "wire_bf16")
    resnet = figures["resnet50"]
    assert (resnet["arch"], resnet["clients"], resnet["epochs"]) == ("resnet50", 3, 2)
    assert len(resnet["epoch_seconds"]) == 2 and len(resnet["final_test_accuracy"]) == 3
    assert "3 clients x 2 epochs, resnet50 cut layer1" in row(md, "resnet50")

    transport = figures["bench_transport"]
    assert transport["ratio"] > 0 and transport["smoke"] is True
    assert all(r["raw_gbps"] > 0 and r["splitmpi_gbps"] > 0 for r in transport["rows"])
    assert "ratio transport/raw at >= 1 MiB: " in row(md, "bench_transport")
    assert "## bench transport (2 ranks)" in md and "| 1024 KiB |" in md
    train = figures["bench_train"]
    assert set(train["ratio_by_schedule"]) == {"round_robin", "sequential", "fifo"}
    assert [r["variant"] for r in train["rows"]] == ["monolithic", "round_robin",
                                                     "sequential", "fifo"]
    assert "ratio split/monolithic at 1 client" in row(md, "bench_train")
    assert "## bench train (2 ranks)" in md

    # what comes back from the device tool: at most 8 files, none in a subfolder
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-train.json", "bench-transport.json", "log.txt", "summary.json",
                     "summary.md"], files
    assert "===== resnet50" in (out / "log.txt").read_text()
    print(f"CPU mode of tests/gpu/run.sh: {seconds:.1f} s")


def test_a_failed_check_fails_the_script_and_its_log_tail_is_in_the_summary(tmp_path,
                                                                           monkeypatch):
    """No MPI launcher (MPIEXEC=false): the staging check fails, the script exits 1, the
    summary says FAIL and shows the end of the check's log."""
    monkeypatch.setenv("MPIEXEC", "false")
    proc = run_script(tmp_path, "--only", "staging", timeout=120)
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.startswith("# splitmpi GPU acceptance (cpu mode): FAIL"), md
    assert "| staging | FAIL |" in row(md, "staging") and "exit 1" in row(md, "staging")
    assert "## staging: FAIL (last lines of its log)" in md and "+ false -n 2" in md
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["ok"] is False
    assert [c["name"] for c in doc["checks"]] == ["install", "staging"]


def test_bad_arguments_exit_2(tmp_path):
    for args in (("--bogus",), ("--only", "nothing"), ("--budget", "soon")):
        proc = run_script(tmp_path, *args, timeout=30)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("run.sh: "), proc.stderr
