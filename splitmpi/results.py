"""The run's HDF5 file, written by rank 0 alone (contract: docs/architecture.md#results-file).

Layout (every series has one row per finished epoch):
  /                     attrs: config (JSON), splitmpi_version, mpi_library, world_size,
                        clients, started, finished (only once the run finished)
  /clients/<k>/<series> float64; k = 1..N; attrs: classes (the client's classes)
  /epochs/seconds       float64 wall seconds of each epoch
  /comm/<counter>       int64 (epochs, world_size): per-rank bytes/messages sent/received
                        during that epoch (transport messages; sharing bytes are per client)
  /audit/<k>/<series>   int64, audit=true only: messages_checked, input_matches,
                        label_matches (messages that carried raw inputs / labels)
  /attack/labels/<k>/<series>  float64, attack.labels=true only: label inference from the
                        feature gradients client k sent (leakage.SERIES)
  /privacy/epsilon      float64, defense.act_clip > 0 only: the epsilon spent (at
                        defense.act_delta) after each epoch by the DP activations
                        (accountant.spent); attrs: sigma, delta

Structure is created up front; rows are appended and flushed each epoch, so a killed job
leaves a readable file holding every finished epoch.
"""
from __future__ import annotations

import datetime
import os
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
                 "phase_end_seconds")
COMM_COUNTERS = ("bytes_sent", "bytes_received", "messages_sent", "messages_received")


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


class ResultsWriter:
    def __init__(self, cfg: Config, world_size: int, clients: int,
                 resume_epochs: int | None = None):
        self.cfg = cfg  # /privacy/epsilon is computed from it each epoch
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
        attrs["started"] = _now()
        for k in range(1, clients + 1):
            group = self.file.create_group(f"clients/{k}")
            for name in CLIENT_SERIES:
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype="f8")
        if cfg.audit:
            for k in range(1, clients + 1):
                for name in AUDIT_SERIES:
                    self.file.create_dataset(f"audit/{k}/{name}", shape=(0,), maxshape=(None,),
                                             dtype="i8")
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
        for k in range(1, clients + 1):
            for name in LABEL_SERIES:
                self.file.create_dataset(f"attack/labels/{k}/{name}", shape=(epochs,),
                                         maxshape=(None,), dtype="f8", fillvalue=np.nan)

    def _continue(self, cfg: Config, epochs: int, world_size: int, clients: int) -> None:
        """Reopen a resumed run's file; rows past the checkpoint (written after it by a run
        that was killed) are dropped, since they are about to be recomputed. attack.labels
        may differ from the saved run's: missing label series start as NaN rows, and a run
        that measures none adds NaN rows to existing ones."""
        self.file = h5py.File(cfg.output, "r+")
        attrs = self.file.attrs
        for name, item in self.file.items():
            if name in ("clients", "epochs", "comm", "audit", "privacy"):
                item.visititems(lambda _, d: d.resize(epochs, axis=0)
                                if isinstance(d, h5py.Dataset) else None)
        if "attack/labels" in self.file:
            self.file["attack/labels"].visititems(lambda _, d: d.resize(epochs, axis=0)
                                                  if isinstance(d, h5py.Dataset) else None)
        elif cfg.attack.labels:
            self._label_series(clients, epochs)
        self._privacy(cfg)
        if "finished" in attrs:
            del attrs["finished"]
        attrs["resumed"] = np.append(attrs.get("resumed", np.zeros(0, np.int64)), epochs)
        self.previous = np.zeros((len(COMM_COUNTERS), world_size), dtype=np.int64)
        self.file.flush()

    @staticmethod
    def _append(dataset: h5py.Dataset, row) -> None:
        dataset.resize(dataset.shape[0] + 1, axis=0)
        dataset[-1] = row

    def append_epoch(self, seconds: float, reports: dict[int, dict], server: dict) -> None:
        """One row everywhere: ``reports`` per client (metrics, counters), ``server`` counters."""
        for k, report in reports.items():
            group = self.file[f"clients/{k}"]
            if "classes" not in group.attrs:
                group.attrs["classes"] = np.asarray(report["classes"], dtype=np.int64)
            for name in CLIENT_SERIES:
                self._append(group[name], report[name])
            if "audit" in self.file:
                for name in AUDIT_SERIES:
                    self._append(self.file[f"audit/{k}/{name}"], report[name])
            if "attack/labels" in self.file:
                found = report.get("labels", {})
                for name in LABEL_SERIES:
                    self._append(self.file[f"attack/labels/{k}/{name}"],
                                 found.get(name, np.nan))
        self._append(self.file["epochs/seconds"], seconds)
        if "privacy/epsilon" in self.file:
            done = self.file["epochs/seconds"].shape[0]
            self._append(self.file["privacy/epsilon"],
                         accountant.spent(self.cfg.defense, self.cfg.train.epochs, done))
        totals = np.array([[server[c]] + [reports[k][c] for k in sorted(reports)]
                           for c in COMM_COUNTERS], dtype=np.int64)
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
