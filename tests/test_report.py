"""``python -m splitmpi.report`` on files made by real 2-client runs; expected numbers are
read straight from the HDF5 files with h5py, independently of ``splitmpi.reader``. The
report also runs where torch, torchvision and mpi4py cannot be imported."""
import csv
import io
import math
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import mpirun
from splitmpi import config, reader
from splitmpi.attack.output import write
from splitmpi.attack.target import Target
from splitmpi.report import training
from splitmpi.report.cli import tables
from splitmpi.report.render import Table, format_value, render

RUNS = {  # file stem -> overrides; cut 1 has both sharing modes, cut 2 only sharing
    "s1": ("split.share=true", "model.cut=1"),
    "n1": ("split.share=false", "model.cut=1"),
    "s2": ("split.share=true", "model.cut=2"),
}


MODES = {  # file stem -> overrides: sl and one codec, the cheapest pair the modes table takes
    "sl": (),
    "int8": ("comm.compress=int8",),
}


def make_runs(folder, runs: dict):
    for stem, overrides in runs.items():
        mpirun.ok(3, *mpirun.TINY, "model.arch=cnn5", *overrides, f"output={stem}.h5",
                  cwd=folder)
    return folder


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"), RUNS)


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("modes"), MODES)


def final_acc(path) -> dict[int, float]:
    """Each client's last test accuracy, in percent (/clients/test_accuracy: (epochs, N))."""
    with h5py.File(path, "r") as f:
        return {k: 100 * float(a) for k, a in enumerate(f["clients/test_accuracy"][-1], 1)}


def bytes_per_epoch(path) -> float:
    with h5py.File(path, "r") as f:
        return float(f["comm/bytes_sent"][()].sum(axis=1).mean())


def busy_percent(path) -> float:
    """Server compute and classifier wait summed over the clients, over the training
    phase (the last client's end of phase), per epoch; the mean over epochs, in percent."""
    with h5py.File(path, "r") as f:
        clients = f["clients"]
        busy = (clients["server_compute_seconds"][()]
                + clients["classifier_wait_seconds"][()]).sum(axis=1)
        phase = clients["phase_end_seconds"][()].max(axis=1)
    return 100 * float(np.mean(busy / phase))


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitmpi.report", *map(str, args)],
                          cwd=cwd, env=mpirun.env(), capture_output=True, text=True,
                          timeout=120)


def csv_tables(text: str) -> dict[str, list[dict]]:
    """``# title`` sections of ``--csv`` output -> rows."""
    out = {}
    for section in text.split("# ")[1:]:
        title, _, body = section.partition("\n")
        out[title] = list(csv.DictReader(io.StringIO(body.strip())))
    return out


def test_tables_hold_the_files_numbers(results):
    runs = [reader.read(results / f"{stem}.h5") for stem in RUNS]
    acc = {stem: final_acc(results / f"{stem}.h5") for stem in RUNS}
    near = lambda x: pytest.approx(x, abs=0.005)  # noqa: E731  half a printed unit

    (table1,) = training.sharing_table(runs)
    rows = {(r["cut"], r["client"]): r for r in table1.rows}
    assert len(rows) == len(table1.rows) == 6  # two clients and a mean row per cut
    for k in (1, 2):
        row = rows[(1, k)]
        assert (row["sharing"], row["non_sharing"]) == (near(acc["s1"][k]), near(acc["n1"][k]))
        assert row["difference"] == pytest.approx(row["sharing"] - row["non_sharing"], abs=0.011)
        assert row["classes"] == ("0-4" if k == 1 else "5-9") and row["runs"] == "1/1"
        assert rows[(2, k)]["sharing"] == near(acc["s2"][k])
        assert math.isnan(rows[(2, k)]["non_sharing"]) and math.isnan(rows[(2, k)]["difference"])
    mean = rows[(1, "mean")]
    assert mean["difference"] == near(np.mean([acc["s1"][k] - acc["n1"][k] for k in (1, 2)]))
    assert {r["status"] for r in table1.rows} == {"finished"}

    acc_by_cut, bytes_by_cut = training.cut_tables(runs)
    by_share = {r["share"]: r for r in acc_by_cut.rows}
    assert by_share[True]["cut=1"] == near(np.mean(list(acc["s1"].values())))
    assert by_share[True]["cut=2"] == near(np.mean(list(acc["s2"].values())))
    assert by_share[False]["cut=1"] == near(np.mean(list(acc["n1"].values())))
    assert math.isnan(by_share[False]["cut=2"])
    traffic = {r["share"]: r for r in bytes_by_cut.rows}
    assert traffic[True]["cut=1"] == round(bytes_per_epoch(results / "s1.h5"))
    assert traffic[True]["cut=2"] == round(bytes_per_epoch(results / "s2.h5"))
    assert traffic[True]["cut=2"] < traffic[True]["cut=1"]  # a deeper cut sends less

    (listing,) = training.runs_table(runs)
    for stem, row in zip(RUNS, listing.rows):
        assert row["status"] == "finished" and row["epochs"] == 2 and row["clients"] == 2
        assert (row["acc_1"], row["acc_2"]) == (near(acc[stem][1]), near(acc[stem][2]))


def test_cli_text_csv_and_markdown(results):
    s1, n1 = final_acc(results / "s1.h5"), final_acc(results / "n1.h5")
    shown = [f"{round(v, 2):.2f}" for v in (*s1.values(), *n1.values())]

    text = cli(results)
    assert text.returncode == 0, text.stderr
    assert "Table 1" in text.stdout and "Table I (cnn5)" in text.stdout
    assert all(s in text.stdout for s in shown)
    assert str(round(bytes_per_epoch(results / "s2.h5"))) in text.stdout
    assert "unfinished" not in text.stdout
    assert "Split-learning modes" not in text.stdout  # one mode, one codec: nothing compared

    out = cli("--csv", results)
    assert out.returncode == 0, out.stderr
    tables = csv_tables(out.stdout)
    table1 = next(rows for title, rows in tables.items() if title.startswith("Table 1"))
    row = next(r for r in table1 if r["cut"] == "1" and r["client"] == "1")
    assert float(row["sharing"]) == pytest.approx(s1[1], abs=0.005)
    assert float(row["non_sharing"]) == pytest.approx(n1[1], abs=0.005)
    assert next(r for r in table1 if r["cut"] == "2" and r["client"] == "1")["non_sharing"] == ""
    runs = next(rows for title, rows in tables.items() if title.startswith("Runs"))
    assert [r["path"] for r in runs] == [str(results / f"{s}.h5") for s in sorted(RUNS)]

    md = cli("--markdown", results / "s1.h5", results / "n1.h5")
    assert md.returncode == 0, md.stderr
    assert "### Table 1" in md.stdout
    assert (f"| synthetic | cnn5 | 1 | u_shape | 1 | 0-4 | {shown[0]} | {shown[2]} |"
            in md.stdout)


def test_plot_writes_pngs(results, tmp_path):
    proc = cli(results, "--plot", tmp_path / "figs")
    assert proc.returncode == 0, proc.stderr
    names = {f"accuracy_{s}.png" for s in RUNS} | {"accuracy_by_cut_cnn5.png",
                                                    "bytes_by_cut_cnn5.png"}
    assert {p.name for p in (tmp_path / "figs").iterdir()} == names
    for name in names:
        path = tmp_path / "figs" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert str(path) in proc.stderr


def test_modes_table_holds_the_files_numbers(modes, tmp_path):
    runs = [reader.read(modes / f"{stem}.h5") for stem in MODES]
    (table,) = training.modes_table(runs)
    rows = {r["run"]: r for r in table.rows}
    assert list(rows) == list(MODES)  # file stems: the sweep's cell names
    for stem, row in rows.items():
        path = modes / f"{stem}.h5"
        acc = final_acc(path)
        with h5py.File(path, "r") as f:
            seconds = float(f["epochs/seconds"][()].mean())
        assert (row["status"], row["mode"], row["schedule"]) == ("finished", "sl", "round_robin")
        assert row["acc_mean"] == pytest.approx(np.mean(list(acc.values())), abs=0.005)
        assert (row["acc_1"], row["acc_2"]) == (pytest.approx(acc[1], abs=0.005),
                                                pytest.approx(acc[2], abs=0.005))
        assert row["s_per_epoch"] == pytest.approx(seconds, abs=0.0005)
        assert row["bytes_per_epoch"] == round(bytes_per_epoch(path))
        assert row["server_busy_pct"] == pytest.approx(busy_percent(path), abs=0.05)
        assert 0 < row["server_busy_pct"] <= 100
    assert (rows["sl"]["compress"], rows["int8"]["compress"]) == ("none", "int8")
    # activations and features in a byte per entry, gradients still float32
    assert rows["int8"]["bytes_per_epoch"] < 0.7 * rows["sl"]["bytes_per_epoch"]
    assert training.modes_table(runs[:1]) == []  # one mode and codec: nothing to compare

    old = tmp_path / "sl.h5"  # splitmpi 0.1 kept the server's busy time as one series
    shutil.copy(modes / "sl.h5", old)
    with h5py.File(old, "a") as f:
        g = f["clients"]
        g["server_busy_seconds"] = g["server_compute_seconds"][()] + \
            g["classifier_wait_seconds"][()]
        del g["server_compute_seconds"], g["classifier_wait_seconds"]
    assert training.server_busy_share(reader.read(old)) == pytest.approx(
        training.server_busy_share(runs[0]))


def test_modes_cli_and_figures(modes, tmp_path):
    proc = cli("--csv", modes, "--plot", tmp_path / "figs")
    assert proc.returncode == 0, proc.stderr
    table = next(rows for title, rows in csv_tables(proc.stdout).items()
                 if title.startswith("Split-learning modes and compression"))
    assert [(r["run"], r["compress"]) for r in table] == [("int8", "int8"), ("sl", "none")]
    for row in table:
        assert int(row["bytes_per_epoch"]) == round(bytes_per_epoch(modes / f"{row['run']}.h5"))
    compared = {"accuracy_vs_time.png", "accuracy_vs_bytes.png"}
    assert compared <= {p.name for p in (tmp_path / "figs").iterdir()}
    for name in compared:
        path = tmp_path / "figs" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert str(path) in proc.stderr


def test_foreign_files_are_refused(results, tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    alone = cli(foreign)
    assert alone.returncode == 2 and alone.stdout == ""
    assert f"{foreign} is not a splitmpi results file" in alone.stderr

    shutil.copy(results / "s1.h5", tmp_path / "s1.h5")
    (tmp_path / "notes.h5").write_text("not HDF5")
    mixed = cli(tmp_path)
    assert mixed.returncode == 0, mixed.stderr
    assert f"warning: skipped: {foreign}" in mixed.stderr
    assert f"{tmp_path / 'notes.h5'} is not a readable HDF5 file" in mixed.stderr
    assert str(tmp_path / "s1.h5") in mixed.stdout and "foreign.h5" not in mixed.stdout


def test_unfinished_run_is_marked_not_mixed(results, tmp_path):
    late = tmp_path / "late.h5"
    shutil.copy(results / "s1.h5", late)
    with h5py.File(late, "a") as f:
        del f.attrs["finished"]

    text = cli(late, results / "n1.h5")
    assert text.returncode == 0, text.stderr
    assert "1 unfinished run(s)" in text.stdout and f"{late} (2 epoch(s) written)" in text.stdout

    tables = csv_tables(cli("--csv", late, results / "n1.h5").stdout)
    runs = next(rows for title, rows in tables.items() if title.startswith("Runs"))
    assert [(r["path"], r["status"]) for r in runs] == [(str(late), "unfinished"),
                                                        (str(results / "n1.h5"), "finished")]
    table1 = next(rows for title, rows in tables.items() if title.startswith("Table 1"))
    for row in table1:  # the unfinished sharing run is not paired with the finished one
        assert (row["sharing"] == "") == (row["status"] == "finished")
        assert (row["non_sharing"] == "") == (row["status"] == "unfinished")


def test_render_formats_and_table_hook(monkeypatch):
    assert [format_value(v) for v in (99.1, 0.873, 5e-05, math.nan, None, True, 3)] == [
        "99.10", "0.873", "5e-05", "-", "-", "true", "3"]
    privacy = Table("Attack PSNR by cut", [{"cut": 1, "psnr_db": 21.5},
                                           {"cut": 2, "psnr_db": 14.25}])
    monkeypatch.setattr("splitmpi.report.cli.TABLES", [lambda runs: [privacy], lambda runs: []])
    text = render(tables([]))
    assert text.splitlines() == ["Attack PSNR by cut", "cut  psnr_db", "---  -------",
                                 "  1    21.50", "  2    14.25"]
    assert render([privacy], "csv") == ("# Attack PSNR by cut\ncut,psnr_db\n"
                                        "1,21.50\n2,14.25\n")


def test_wire_figure(results, tmp_path):
    """What crosses the wire for one sample: conv block output vs after its max-pool."""
    proc = cli(results / "s1.h5", "--plot", tmp_path / "figs", "--wire")
    assert proc.returncode == 0, proc.stderr
    wire = [p for p in (tmp_path / "figs").iterdir() if "wire" in p.name]
    assert len(wire) == 1 and wire[0].read_bytes()[:4] == b"\x89PNG"


# Post-processing happens on laptops and login nodes (docs/report.md): the command is run
# with every import of torch, torchvision and mpi4py refused.
WITHOUT_TORCH = """
import importlib.abc, runpy, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("torch", "torchvision", "mpi4py"):
            raise ImportError(f"{name} is blocked: the report must run without it")

sys.meta_path.insert(0, Refuse())
runpy.run_module("splitmpi.report", run_name="__main__", alter_sys=True)
"""


def without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)],
                          env=mpirun.env(), capture_output=True, text=True, timeout=120)


def test_report_runs_without_torch(results, tmp_path):
    """Every table and figure, the attack's included, from a run file that holds an attack
    group; only ``--wire`` draws a network, and it alone asks for torch."""
    run = tmp_path / "s1.h5"
    shutil.copy(results / "s1.h5", run)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    write(config.load(None, [f"attack.output={run}", "model.cut=1", "attack.grid=2"]),
          "decoder", Target(torch.nn.Sequential(), None, 0.8, "test"), images,
          {"reconstruction": 0.9 * images, "series": {}, "attrs": {}}, {})
    with h5py.File(run, "r") as f:
        psnr = float(f["attack/decoder"].attrs["psnr_mean"])
    acc = final_acc(run)
    figs = tmp_path / "figs"

    proc = without_torch(run, results / "n1.h5", "--plot", figs)
    assert proc.returncode == 0, proc.stderr
    assert "Table 1" in proc.stdout and f"{round(acc[1], 2):.2f}" in proc.stdout
    attack_rows = proc.stdout.split("Inversion attack by cut and method")[1].splitlines()
    assert any(f"{round(psnr, 2):.2f}" in row and "decoder" in row for row in attack_rows)
    assert {p.name for p in figs.iterdir()} == {
        "accuracy_s1.png", "accuracy_n1.png", "accuracy_by_cut_cnn5.png",
        "bytes_by_cut_cnn5.png", "attack_grid_cnn5_decoder.png", "attack_by_cut_cnn5.png"}

    wire = without_torch(run, "--plot", figs, "--wire")  # the refusal is in force
    assert wire.returncode != 0 and "torch is blocked" in wire.stderr
