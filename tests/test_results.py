"""The results file's column layout (``results.ResultsWriter``) and its readers, without MPI
jobs: round trips at many and at few clients, NaN for what a client did not report, the
classes matrix, resume, the old per-client layout (read, and converted on resume), the
report's distributions over many clients, and the ``results`` benchmark's smoke run. No
timing is asserted (BENCHMARKS.md has the figures)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import mpirun
from splitmpi import config, reader, results
from splitmpi.audit import SERIES as AUDIT_SERIES
from splitmpi.leakage import SERIES as LABEL_SERIES
from splitmpi.report import training
from splitmpi.report.attacks import label_table
from splitmpi.report.cli import plot, tables

WORLD = 3


def value(name: str, k: int, epoch: int) -> float:
    """A distinct value per series, client and epoch."""
    return 1000.0 * epoch + k + results.CLIENT_SERIES.index(name) / 100


def report(k: int, epoch: int, **extra) -> dict:
    out = {name: value(name, k, epoch) for name in results.CLIENT_SERIES}
    out.update({"classes": [k % 7, 7 + k % 3], "messages_checked": 10 * k + epoch,
                "input_matches": 0, "label_matches": k % 2})
    out.update(extra)
    return out


def ranks(epoch: int) -> list[dict]:
    return [{c: (epoch + 1) * (10 * r + i + 1) for i, c in enumerate(results.COMM_COUNTERS)}
            for r in range(WORLD)]


def make_cfg(path, *overrides):
    return config.load(None, [f"output={path}", "overwrite=true", *overrides])


def write(path, n: int, epochs: int, *overrides, finish: bool = True, reports=report):
    writer = results.ResultsWriter(make_cfg(path, *overrides), WORLD, n)
    for epoch in range(epochs):
        writer.append_epoch(1.5 + epoch, {k: reports(k, epoch) for k in range(1, n + 1)},
                            ranks(epoch))
    writer.finish() if finish else writer.close()
    return path


@pytest.mark.parametrize("n", [3, 300])
def test_round_trip(tmp_path, n):
    path = write(tmp_path / "r.h5", n, 3, "audit=true")
    with h5py.File(path, "r") as f:  # the layout itself
        assert f.attrs["clients"] == n and f.attrs["layout"] == results.LAYOUT
        for name in results.CLIENT_SERIES:
            ds = f[f"clients/{name}"]
            assert ds.shape == (3, n) and ds.dtype == np.float64 and ds.chunks[1] == n
        assert f["audit/messages_checked"].shape == (3, n)
        assert f["audit/messages_checked"].dtype == np.int64
        assert f["clients/classes"].dtype == np.uint8 and f["clients/classes"].shape == (n, 10)
        assert f["comm/bytes_sent"].shape == (3, WORLD)
    run = reader.read(path)
    assert run.finished and run.epochs == 3 and run.client_count == n
    assert list(run.clients) == list(range(1, n + 1))
    for name in results.CLIENT_SERIES:
        expected = np.array([[value(name, k, e) for k in range(1, n + 1)] for e in range(3)])
        assert np.array_equal(run.series[name], expected), name
    for k in (1, n // 2 + 1, n):
        assert run.clients[k]["test_accuracy"].tolist() == [value("test_accuracy", k, e)
                                                            for e in range(3)]
        assert run.classes[k] == sorted({k % 7, 7 + k % 3})
        assert run.audit[k]["messages_checked"].tolist() == [10 * k + e for e in range(3)]
        assert run.groups["audit"][str(k)]["label_matches"].tolist() == [k % 2] * 3
    assert run.membership.sum(axis=1).tolist() == [2] * n
    assert run.final()[n] == value("test_accuracy", n, 2)
    assert np.array_equal(run.final_array("train_loss"), run.series["train_loss"][-1])
    # /comm holds each epoch's difference of the cumulative counters
    assert run.comm["messages_sent"].tolist() == [[3, 13, 23]] * 3
    assert run.epoch_seconds.tolist() == [1.5, 2.5, 3.5]
    assert len(run.label_inference) == 0 and len(run.label_series) == 0


def test_missing_values_are_nan(tmp_path):
    """A client not evaluated has NaN test metrics, one that did not train NaN train
    metrics; a missing client is a NaN column; missing label inference is NaN, a missing
    audit count 0."""
    def sparse(k, epoch):
        r = report(k, epoch, participated=float(k != 2))
        if k == 2:  # did not train
            del r["train_loss"], r["train_accuracy"]
        if epoch == 1:  # evaluated every other epoch
            del r["test_loss"], r["test_accuracy"]
        if k == 1:
            r["labels"] = {"rows": 8.0, "chance": 0.5}
        if k == 3:
            del r["messages_checked"]
        return r

    path = tmp_path / "nan.h5"
    writer = results.ResultsWriter(make_cfg(path, "audit=true", "attack.labels=true"),
                                   WORLD, 4)
    for epoch in range(2):
        writer.append_epoch(1.0, {k: sparse(k, epoch) for k in (1, 2, 3)}, ranks(epoch))
    writer.finish()
    run = reader.read(path)
    assert np.array_equal(run.series["participated"], [[1, 0, 1, np.nan]] * 2, equal_nan=True)
    assert np.isnan(run.series["train_loss"][:, 1]).all()
    assert np.isfinite(run.series["train_loss"][:, [0, 2]]).all()
    assert np.isnan(run.series["test_accuracy"][1]).all()
    assert np.isnan(run.series["test_accuracy"][:, 3]).all()  # client 4 never reported
    assert np.isfinite(run.series["test_accuracy"][0, :3]).all()
    # the last evaluated accuracy survives an epoch without evaluation
    assert run.last_finite("test_accuracy")[:3].tolist() == [
        value("test_accuracy", k, 0) for k in (1, 2, 3)]
    assert np.isnan(run.last_finite("test_accuracy")[3])
    assert np.isnan(run.final_array()).all()
    labels = run.label_inference
    assert labels[1]["rows"].tolist() == [8.0, 8.0] and labels[1]["chance"][0] == 0.5
    assert np.isnan(labels[1]["norm_auc"]).all() and np.isnan(labels[2]["rows"]).all()
    assert run.audit[3]["messages_checked"].tolist() == [0, 0]
    assert run.classes[4] == []  # never reported: holds no class
    assert sorted(run.series) == sorted(results.CLIENT_SERIES)


def test_classes_matrix_width(tmp_path):
    """As wide as the data set's classes (from the config), not only the ones held."""
    few = write(tmp_path / "a.h5", 2, 1, "data.num_classes=12",
                reports=lambda k, e: report(k, e, classes=[k - 1]))
    with h5py.File(few, "r") as f:
        assert f["clients/classes"][()].tolist() == [[1] + [0] * 11, [0, 1] + [0] * 10]
    run = reader.read(few)
    assert dict(run.classes) == {1: [0], 2: [1]}
    held = write(tmp_path / "b.h5", 2, 1, "data.num_classes=2",  # reports win where wider
                 reports=lambda k, e: report(k, e, classes=[4 * k]))
    assert reader.read(held).membership.shape == (2, 9)


def test_no_clients(tmp_path):
    """The attack tool's own files: no clients, no epochs."""
    path = tmp_path / "z.h5"
    results.ResultsWriter(make_cfg(path), 1, 0).finish()
    run = reader.read(path)
    assert run.client_count == 0 and run.epochs == 0 and dict(run.clients) == {}
    assert "0 client(s)" in reader.summary(run)


def test_resume(tmp_path):
    path = write(tmp_path / "r.h5", 5, 3, "attack.labels=true", finish=False)
    cfg = make_cfg(path, "attack.labels=true")
    writer = results.ResultsWriter(cfg, WORLD, 5, resume_epochs=2)
    f = writer.file  # open for writing: checked through the writer
    assert f["clients/test_accuracy"].shape == (2, 5)
    assert f["clients/classes"].shape == (5, 10)  # not cut along the epochs
    assert f["attack/labels/rows"].shape == (2, 5)
    writer.append_epoch(9.0, {k: report(k, 7) for k in range(1, 6)}, ranks(7))
    writer.finish()
    run = reader.read(path)
    assert run.epochs == 3 and run.attrs["resumed"].tolist() == [2]
    assert run.series["test_accuracy"][:, 4].tolist() == [
        value("test_accuracy", 5, e) for e in (0, 1, 7)]
    assert run.classes[5] == [5, 9] and run.epoch_seconds.tolist() == [1.5, 2.5, 9.0]


def test_resume_adds_label_series(tmp_path):
    path = write(tmp_path / "r.h5", 2, 2, finish=False)
    writer = results.ResultsWriter(make_cfg(path, "attack.labels=true"), WORLD, 2,
                                   resume_epochs=2)
    writer.append_epoch(1.0, {k: report(k, 2, labels={"rows": 3.0}) for k in (1, 2)},
                        ranks(2))
    writer.finish()
    rows = reader.read(path).label_series["rows"]
    assert np.array_equal(rows, [[np.nan] * 2, [np.nan] * 2, [3.0, 3.0]], equal_nan=True)


def write_old(path, n: int, epochs: int, audit: bool = True, labels: bool = True):
    """A file as splitmpi wrote it before layout 2: one group per client."""
    cfg = make_cfg(path)
    with h5py.File(path, "w") as f:
        f.attrs.update({"config": cfg.to_json(), "splitmpi_version": "0.2.0",
                        "mpi_library": "MPICH", "world_size": n + 1, "clients": n,
                        "started": "2026-11-01T00:00:00+00:00",
                        "finished": "2026-11-01T00:01:00+00:00"})
        old_series = [s for s in results.CLIENT_SERIES if s != "participated"]
        for k in range(1, n + 1):
            group = f.create_group(f"clients/{k}")
            group.attrs["classes"] = np.array([k - 1, k], dtype=np.int64)
            for name in old_series:
                group[name] = np.array([value(name, k, e) for e in range(epochs)])
            if audit:
                for name in AUDIT_SERIES:
                    f[f"audit/{k}/{name}"] = np.arange(epochs, dtype=np.int64) + k
            if labels:
                for name in LABEL_SERIES:
                    f[f"attack/labels/{k}/{name}"] = np.full(epochs, 0.25 * k)
        f.create_dataset("epochs/seconds", data=np.ones(epochs), maxshape=(None,))
        for name in results.COMM_COUNTERS:
            f.create_dataset(f"comm/{name}", data=np.ones((epochs, n + 1), dtype=np.int64),
                             maxshape=(None, n + 1))
    return path


def test_reads_the_old_layout(tmp_path):
    run = reader.read(write_old(tmp_path / "old.h5", 3, 2))
    assert run.client_count == 3 and run.epochs == 2 and run.finished
    assert run.series["test_accuracy"].shape == (2, 3)
    assert "participated" not in run.series
    for k in (1, 2, 3):
        assert run.clients[k]["train_loss"].tolist() == [value("train_loss", k, e)
                                                         for e in range(2)]
        assert run.classes[k] == [k - 1, k]
        assert run.audit[k]["input_matches"].tolist() == [k, k + 1]
        assert run.groups["audit"][str(k)]["messages_checked"].tolist() == [k, k + 1]
        assert run.label_inference[k]["chance"].tolist() == [0.25 * k] * 2
    assert run.audit_series["label_matches"].dtype == np.int64
    assert run.membership.shape == (3, 4)
    assert "client 3 classes [2, 3]" in reader.summary(run)


def test_resume_converts_the_old_layout(tmp_path):
    path = write_old(tmp_path / "old.h5", 3, 3)
    with h5py.File(path, "a") as f:
        del f.attrs["finished"]
    writer = results.ResultsWriter(make_cfg(path, "audit=true", "attack.labels=true"), 4, 3,
                                   resume_epochs=2)
    writer.append_epoch(1.0, {k: report(k, 5) for k in (1, 2, 3)},
                        [{c: 1 for c in results.COMM_COUNTERS}] * 4)
    writer.finish()
    with h5py.File(path, "r") as f:
        assert f.attrs["layout"] == results.LAYOUT and "1" not in f["clients"]
    run = reader.read(path)
    assert run.series["train_loss"][:, 0].tolist() == [value("train_loss", 1, e)
                                                       for e in (0, 1, 5)]
    assert run.series["participated"][:2].tolist() == [[1.0] * 3] * 2  # all trained then
    assert run.classes[3] == [2, 3]
    assert run.audit[2]["input_matches"].tolist() == [2, 3, 0]
    assert run.label_inference[1]["chance"][:2].tolist() == [0.25, 0.25]


def many_run(tmp_path, name="many", n=40, share=True):
    """A run of n clients (more than training.MANY_CLIENTS): client k's final test accuracy
    is k / n."""
    def rep(k, epoch):
        r = report(k, epoch, test_accuracy=(k / n) * (epoch + 1) / 2,
                   labels={"rows": 4.0, "cosine_accuracy": 0.5, "cluster_accuracy": 0.75,
                           "chance": 0.5})
        r["label_matches"] = int(k == 3)
        return r
    return write(tmp_path / f"{name}.h5", n, 2, "audit=true", "attack.labels=true",
                 f"split.share={str(share).lower()}", reports=rep)


def test_report_summarises_many_clients(tmp_path):
    n = 40
    runs = [reader.read(many_run(tmp_path, "s", n, True)),
            reader.read(many_run(tmp_path, "n", n, False))]
    acc = 100 * np.arange(1, n + 1) / n
    (listing,) = training.runs_table(runs)
    row = listing.rows[0]
    assert not any(key.startswith("acc_1") for key in row)  # no column per client
    assert row["clients"] == n and row["acc_mean"] == pytest.approx(acc.mean(), abs=0.005)
    assert (row["acc_min"], row["acc_max"]) == (pytest.approx(2.5), pytest.approx(100.0))
    assert row["acc_p50"] == pytest.approx(np.percentile(acc, 50), abs=0.005)
    assert row["acc_p10"] == pytest.approx(np.percentile(acc, 10), abs=0.005)

    (table1,) = training.sharing_table(runs)
    assert [r["client"] for r in table1.rows] == list(training.STATS)
    mean = table1.rows[0]
    assert (mean["sharing"], mean["non_sharing"], mean["difference"], mean["runs"]) == (
        pytest.approx(acc.mean(), abs=0.005), pytest.approx(acc.mean(), abs=0.005), 0.0, "1/1")

    (audit,) = training.audit_table(runs[:1])
    assert len(audit.rows) == 1 and audit.rows[0]["client"] == f"all {n}"
    assert audit.rows[0]["clients_leaking"] == 1 and audit.rows[0]["labels"] == 2
    assert audit.rows[0]["verdict"] == "RAW DATA SENT"

    (labels,) = label_table(runs[:1])
    assert len(labels.rows) == 1 and labels.rows[0]["cluster"] == 0.75
    assert labels.rows[0]["rows"] == 4 * n

    assert training.mean_accuracy(runs[0])[-1] == pytest.approx(acc.mean() / 100)
    titles = [t for t, _ in tables(runs)]
    assert any(t.startswith("Table 1") for t in titles)

    text = reader.summary(runs[0])
    assert len(text.splitlines()) < 10 and "p90" in text
    assert f"final test accuracy over {n} client(s): mean {acc.mean() / 100:.4f}" in text
    assert "clients that trained per epoch" in text

    pytest.importorskip("matplotlib")
    written = {p.name for p in plot(runs, tmp_path / "figs")}
    assert {"client_accuracy_cdf.png", "accuracy_s.png", "accuracy_n.png"} <= written
    assert (tmp_path / "figs" / "client_accuracy_cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_report_keeps_per_client_tables_for_few_clients(tmp_path):
    run = reader.read(write(tmp_path / "few.h5", 3, 2, "audit=true"))
    (listing,) = training.runs_table([run])
    assert [k for k in listing.rows[0] if k.startswith("acc_")] == ["acc_1", "acc_2", "acc_3"]
    (audit,) = training.audit_table([run])
    assert [r["client"] for r in audit.rows] == [1, 2, 3]
    (table1,) = training.sharing_table([run])
    assert [r["client"] for r in table1.rows] == [1, 2, 3, "mean"]
    pytest.importorskip("matplotlib")
    assert "client_accuracy_cdf.png" not in {p.name for p in plot([run], tmp_path / "f")}


def test_results_benchmark_smoke(tmp_path):
    path = tmp_path / "b.json"
    proc = mpirun.ok(1, "results", "--smoke", "--json", str(path), module="splitmpi.bench",
                     cwd=tmp_path, timeout=180)
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "results" and doc["ratio_line"] in proc.stdout
    assert [(r["layout"], r["clients"]) for r in doc["rows"]] == [("new", 40), ("old", 40)]
    for row in doc["rows"]:
        assert row["append_ms"] > 0 and row["read_s"] > 0 and row["file_mb"] > 0
