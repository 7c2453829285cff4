"""The run's HDF5 file, written by rank 0 alone (contract: docs/architecture.md#results-file).

Layout (N = the root attribute ``clients``, logical clients 1..N; every series has one row
per finished epoch and one column per client, column k-1 = client k):
  /                     attrs: config (JSON), splitmpi_version, mpi_library, world_size,
                        clients, started, finished (only once the run finished), layout (2)
  /clients/<series>     float64 (epochs, N), series in CLIENT_SERIES; NaN where a client had
                        no value (not evaluated, did not train in that epoch)
  /clients/classes      uint8 (N, num_classes): 1 where client k holds the class (row k-1);
                        written with the first epoch
  /epochs/seconds       float64 wall seconds of each epoch
  /comm/<counter>       int64 (epochs, world_size): per-rank bytes/messages sent/received
                        during that epoch (transport messages; sharing bytes are per client)
  /audit/<series>       int64 (epochs, N), audit=true only: messages_checked, input_matches,
                        label_matches (messages that carried raw inputs / labels)
  /attack/labels/<series>  float64 (epochs, N), NaN fill, attack.labels=true only: label
                        inference from the feature gradients each client sent (leakage.SERIES)
  /privacy/epsilon      float64, defense.act_clip > 0 only: the epsilon spent (at
                        defense.act_delta) after each epoch by the DP activations
                        (accountant.spent); attrs: sigma, delta

Per-client series are 2D and chunked along the epochs (``chunks``), so appending an epoch is
one resize and one write per series whatever N is, and reading a file is one read per
series. Files written before layout 2 hold one group per client (/clients/<k>/<series>,
attr classes; /audit/<k>/..., /attack/labels/<k>/...): ``reader.read`` reads both, and a
resumed run converts its file to this layout (``upgrade``).

Structure is created up front; rows are appended and flushed each epoch, so a killed job
leaves a readable file holding every finished epoch.
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from . import __version__, accountant
from .audit import SERIES as AUDIT_SERIES
from .config import Config
from .errors import ConfigError
from .leakage import SERIES as LABEL_SERIES

CLIENT_SERIES = ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
                 "train_samples", "test_samples", "samples_per_s", "train_seconds",
                 "share_buffer_bytes", "batches_served", "queue_wait_seconds",
                 "server_idle_seconds", "server_compute_seconds", "classifier_wait_seconds",
                 "phase_end_seconds", "participated")
COMM_COUNTERS = ("bytes_sent", "bytes_received", "messages_sent", "messages_received")
LAYOUT = 2  # root attribute ``layout``: 2 = one (epochs, N) dataset per series
CHUNK_VALUES = 16384  # values per chunk of a per-client series: 128 KiB of float64


def chunks(clients: int) -> tuple[int, int]:
    """The chunk shape of an (epochs, N) series: all N clients (up to CHUNK_VALUES) and as
    many epochs as fill CHUNK_VALUES (1 to 64). Appending a row touches one chunk, which
    stays in HDF5's chunk cache (1 MiB); a whole read touches epochs / rows chunks."""
    cols = max(1, min(clients, CHUNK_VALUES))
    return max(1, min(64, CHUNK_VALUES // cols)), cols


def mpi_library() -> str:
    """The MPI library's own description (Open MPI's ends in a NUL, which HDF5 strings
    cannot hold)."""
    return MPI.Get_library_version().replace("\0", "").strip()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_output(cfg: Config, world_size: int, resume_epochs: int | None = None) -> None:
    """Refuse to clobber results or to start a run whose file cannot be written; a resumed
    run needs the file it is continuing, holding at least the checkpointed epochs."""
    path = Path(cfg.output)
    if resume_epochs is not None:
        _check_resumable(path, world_size, resume_epochs)
    elif path.exists() and not cfg.overwrite:
        raise ConfigError(f"output {path} already exists",
                          "pass output=OTHER.h5, or overwrite=true to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {folder}: {exc.strerror}",
                          "set output= to a writable path") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"output folder {folder} is not writable",
                          "set output= to a writable path")


def _check_resumable(path: Path, world_size: int, epochs: int) -> None:
    fix = "set output= to the results file the checkpointed run wrote"
    try:
        with h5py.File(path, "r") as f:
            rows = f["epochs/seconds"].shape[0] if "epochs/seconds" in f else -1
            size = f.attrs.get("world_size")
    except OSError:
        raise ConfigError(f"resuming needs the results file {path}, which is missing or "
                          "unreadable", fix) from None
    if size != world_size or rows < epochs:
        raise ConfigError(f"{path} is not the results file of the checkpointed run (world "
                          f"size {size}, {rows} epochs; the checkpoint has {epochs})", fix)


def _series(group: h5py.Group, names, clients: int, epochs: int, dtype: str,
            fill) -> None:
    """One (epochs, clients) dataset per name in ``group``, growable along the epochs."""
    for name in names:
        group.create_dataset(name, shape=(epochs, clients), maxshape=(None, clients),
                             dtype=dtype, chunks=chunks(clients), fillvalue=fill)


def _num_classes(cfg: Config, classes: list[list[int]]) -> int:
    """The width of /clients/classes: the data set's classes where they are known without
    reading data (synthetic data; ``data.spec`` when the data module is already loaded, as
    on a training rank), and at least the largest class any client holds + 1."""
    held = max((max(c) + 1 for c in classes if len(c)), default=0)
    known = cfg.data.num_classes if cfg.data.name == "synthetic" else 0
    data = sys.modules.get(f"{__package__}.data")  # never imported here: it brings torch
    if not known and data is not None:
        try:
            known = int(data.spec(cfg.data).num_classes)
        except Exception:  # noqa: BLE001  a user's data set that cannot be read here
            known = 0
    return max(held, known)


def upgrade(file: h5py.File, clients: int) -> None:
    """Convert a file of the per-client layout (one group per client: /clients/<k>/<series>
    with attr classes, /audit/<k>/<series>, /attack/labels/<k>/<series>) in place to the
    column layout, so that a run resumed from it goes on appending rows. Its clients all
    trained every epoch, so ``participated`` is 1.0 where the file has no such series."""
    for top, dtype, fill in (("clients", "f8", np.nan), ("audit", "i8", 0),
                             ("attack/labels", "f8", np.nan)):
        group = file.get(top)
        keys = sorted((k for k in group if k.isdigit()), key=int) if group is not None else []
        if not keys:
            continue
        clients = max(clients, int(keys[-1]))
        epochs = max(d.shape[0] for k in keys for d in group[k].values())
        names = list(dict.fromkeys(n for k in keys for n in group[k]))
        if top == "clients" and "participated" not in names:
            names.append("participated")
        table = {n: np.full((epochs, clients), fill, dtype=dtype) for n in names}
        if "participated" in table and top == "clients":
            table["participated"][:] = 1.0
        held = {}
        for k in keys:
            for n, d in group[k].items():
                table[n][:d.shape[0], int(k) - 1] = d[()]
            held[int(k)] = [int(c) for c in group[k].attrs.get("classes", [])]
            del group[k]
        for n, values in table.items():
            ds = group.create_dataset(n, shape=values.shape, maxshape=(None, clients),
                                      dtype=dtype, chunks=chunks(clients), fillvalue=fill)
            ds[...] = values
        if top == "clients":
            width = max((max(c) + 1 for c in held.values() if c), default=0)
            matrix = np.zeros((clients, width), dtype=np.uint8)
            for k, c in held.items():
                matrix[k - 1, c] = 1
            group.create_dataset("classes", data=matrix)
    file.attrs["layout"] = LAYOUT


class ResultsWriter:
    def __init__(self, cfg: Config, world_size: int, clients: int,
                 resume_epochs: int | None = None):
        self.cfg = cfg  # /privacy/epsilon is computed from it each epoch
        self.clients = clients
        self.world_size = world_size
        if resume_epochs is not None:
            self._continue(cfg, resume_epochs, world_size, clients)
            return
        self.file = h5py.File(cfg.output, "w")
        attrs = self.file.attrs
        attrs["config"] = cfg.to_json()
        attrs["splitmpi_version"] = __version__
        attrs["mpi_library"] = mpi_library()
        attrs["world_size"] = world_size
        attrs["clients"] = clients
        attrs["layout"] = LAYOUT
        attrs["started"] = _now()
        if clients:
            _series(self.file.create_group("clients"), CLIENT_SERIES, clients, 0, "f8",
                    np.nan)
            if cfg.audit:
                _series(self.file.create_group("audit"), AUDIT_SERIES, clients, 0, "i8", 0)
        if cfg.attack.labels:
            self._label_series(clients, 0)
        self.file.create_dataset("epochs/seconds", shape=(0,), maxshape=(None,), dtype="f8")
        self._privacy(cfg)
        for name in COMM_COUNTERS:
            self.file.create_dataset(f"comm/{name}", shape=(0, world_size),
                                     maxshape=(None, world_size), dtype="i8")
        self.previous = np.zeros((len(COMM_COUNTERS), world_size), dtype=np.int64)
        self.file.flush()

    def _privacy(self, cfg: Config) -> None:
        """The /privacy/epsilon series of a run with DP activations (none otherwise): a
        function of the epoch and the config, so rank 0 computes it itself."""
        if cfg.defense.act_clip > 0 and "privacy/epsilon" not in self.file:
            series = self.file.create_dataset("privacy/epsilon", shape=(0,), maxshape=(None,),
                                              dtype="f8")
            series.attrs["sigma"] = accountant.sigma_of(cfg.defense, cfg.train.epochs)
            series.attrs["delta"] = cfg.defense.act_delta

    def _label_series(self, clients: int, epochs: int) -> None:
        """The /attack/labels series, NaN for the ``epochs`` a resumed run did not measure."""
        if clients:
            _series(self.file.require_group("attack/labels"), LABEL_SERIES, clients, epochs,
                    "f8", np.nan)

    def _continue(self, cfg: Config, epochs: int, world_size: int, clients: int) -> None:
        """Reopen a resumed run's file (converted to the column layout if it was written in
        the per-client one); rows past the checkpoint (written after it by a run that was
        killed) are dropped, since they are about to be recomputed. attack.labels may differ
        from the saved run's: missing label series start as NaN rows, and a run that
        measures none adds NaN rows to existing ones."""
        self.file = h5py.File(cfg.output, "r+")
        attrs = self.file.attrs
        if attrs.get("layout", 1) < LAYOUT:
            upgrade(self.file, clients)
        for top in ("clients", "epochs", "comm", "audit", "privacy", "attack/labels"):
            if top in self.file:
                for name, item in self.file[top].items():
                    if isinstance(item, h5py.Dataset) and f"{top}/{name}" != "clients/classes":
                        item.resize(epochs, axis=0)
        if cfg.attack.labels and "attack/labels" not in self.file:
            self._label_series(clients, epochs)
        self._privacy(cfg)
        if "finished" in attrs:
            del attrs["finished"]
        attrs["resumed"] = np.append(attrs.get("resumed", np.zeros(0, np.int64)), epochs)
        self.previous = np.zeros((len(COMM_COUNTERS), world_size), dtype=np.int64)
        self.file.flush()

    @staticmethod
    def _append(dataset: h5py.Dataset, row) -> None:
        """One row at the end of ``dataset``: one resize and one write."""
        n = dataset.shape[0]
        dataset.resize(n + 1, axis=0)
        dataset[n] = row

    def _classes(self, reports: dict[int, dict]) -> None:
        """/clients/classes from the first epoch's reports: row k-1 = client k."""
        held = [list(reports.get(k, {}).get("classes", ())) for k in range(1, self.clients + 1)]
        matrix = np.zeros((self.clients, _num_classes(self.cfg, held)), dtype=np.uint8)
        rows = np.repeat(np.arange(self.clients), [len(c) for c in held])
        matrix[rows, np.fromiter((c for cs in held for c in cs), dtype=np.int64,
                                 count=len(rows))] = 1
        self.file.create_dataset("clients/classes", data=matrix)

    def _rows(self, reports: dict[int, dict], names, value) -> dict[str, np.ndarray]:
        """Per series one (N,) row, column k-1 = ``value(report of client k, name)``."""
        found = [reports.get(k, {}) for k in range(1, self.clients + 1)]
        return {name: [value(r, name) for r in found] for name in names}

    def append_epoch(self, seconds: float, reports: dict[int, dict],
                     ranks: list[dict]) -> None:
        """One row everywhere. ``reports``: logical client k (1..N) -> its report (the
        CLIENT_SERIES keys, ``classes``, the AUDIT_SERIES keys under audit=true, optionally
        ``labels``: {series: value}); a missing value is written as NaN (0 in the audit's
        integer series). ``ranks``: per MPI rank 0..world_size-1 its cumulative transport
        counters (COMM_COUNTERS) at this epoch's report; /comm gets the differences."""
        if len(ranks) != self.world_size:
            raise ValueError(f"append_epoch: {len(ranks)} rank counters for a world of "
                             f"{self.world_size}")
        nan = np.nan
        if self.clients:
            if "clients/classes" not in self.file:
                self._classes(reports)
            group = self.file["clients"]
            for name, row in self._rows(reports, CLIENT_SERIES,
                                        lambda r, n: r.get(n, nan)).items():
                self._append(group[name], np.asarray(row, dtype=np.float64))
            if "audit" in self.file:
                group = self.file["audit"]
                for name, row in self._rows(reports, AUDIT_SERIES,
                                            lambda r, n: r.get(n, 0)).items():
                    self._append(group[name], np.asarray(row, dtype=np.int64))
            if "attack/labels" in self.file:
                group = self.file["attack/labels"]
                for name, row in self._rows(reports, LABEL_SERIES,
                                            lambda r, n: (r.get("labels") or {}).get(n, nan)
                                            ).items():
                    self._append(group[name], np.asarray(row, dtype=np.float64))
        self._append(self.file["epochs/seconds"], seconds)
        if "privacy/epsilon" in self.file:
            done = self.file["epochs/seconds"].shape[0]
            self._append(self.file["privacy/epsilon"],
                         accountant.spent(self.cfg.defense, self.cfg.train.epochs, done))
        totals = np.array([[r[c] for r in ranks] for c in COMM_COUNTERS], dtype=np.int64)
        for i, name in enumerate(COMM_COUNTERS):
            self._append(self.file[f"comm/{name}"], totals[i] - self.previous[i])
        self.previous = totals
        self.file.flush()

    def finish(self) -> None:
        self.file.attrs["finished"] = _now()
        self.file.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()
