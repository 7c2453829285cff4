"""Read a splitmpi results file back into plain Python and numpy (no MPI needed).

A file can be read while its run is still going: it holds every epoch flushed so far.
Both layouts are read: the column layout (``layout`` 2: /clients/<series> of shape
(epochs, N)) and the per-client groups of earlier files (/clients/<k>/<series>), which are
stacked into the same (epochs, N) arrays; ``Run.clients`` and friends give one client's
series either way.

``python -m splitmpi.reader RESULTS.h5`` prints a summary of one file (a distribution over
the clients when there are more than ``LIST_CLIENTS``).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

LIST_CLIENTS = 16  # more clients than this: summaries give distributions, not one per client
PERCENTILES = (10, 50, 90)


class NotAResult(ValueError):
    """The file is not a splitmpi results file (or not HDF5 at all)."""


class Columns(Mapping):
    """Client k (1..N) -> {series -> its column of the (epochs, N) arrays}: views, made
    when asked for, so that a run of 10,000 clients costs nothing until one is read. Keys
    are ints, or strings (``str_keys``) where the mapping stands in for the per-client
    groups of the old layout (``Run.groups["audit"]``)."""

    def __init__(self, arrays: dict[str, np.ndarray], count: int, str_keys: bool = False):
        self.arrays, self.count, self.str_keys = arrays, count, str_keys

    def _index(self, key) -> int:
        try:
            k = int(key) if self.str_keys == isinstance(key, str) else 0
        except ValueError:
            k = 0
        if not 1 <= k <= self.count:
            raise KeyError(key)
        return k - 1

    def __getitem__(self, key) -> dict[str, np.ndarray]:
        i = self._index(key)
        return {name: a[:, i] for name, a in self.arrays.items()}

    def __iter__(self) -> Iterator:
        return iter(map(str, range(1, self.count + 1)) if self.str_keys
                    else range(1, self.count + 1))

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Columns({self.count} clients, series {sorted(self.arrays)})"


class Classes(Mapping):
    """Client k -> the classes it holds (a list of ints), from the (N, classes) matrix."""

    def __init__(self, membership: np.ndarray):
        self.membership = membership

    def __getitem__(self, k) -> list[int]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or \
                not 1 <= k <= len(self.membership):
            raise KeyError(k)
        return np.flatnonzero(self.membership[k - 1]).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, len(self.membership) + 1))

    def __len__(self) -> int:
        return len(self.membership)


@dataclass
class Run:
    path: Path
    config: dict
    attrs: dict
    clients: Mapping[int, dict[str, np.ndarray]]  # k -> series name -> one value per epoch
    classes: Mapping[int, list[int]]  # k -> the classes client k holds
    epoch_seconds: np.ndarray
    comm: dict[str, np.ndarray]  # counter -> (epochs, world_size)
    groups: dict[str, dict] = field(default_factory=dict)  # other top-level groups, raw
    series: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (epochs, N)
    membership: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    audit_series: dict[str, np.ndarray] = field(default_factory=dict)  # (epochs, N) int64
    label_series: dict[str, np.ndarray] = field(default_factory=dict)  # (epochs, N) float64

    @property
    def finished(self) -> bool:
        return "finished" in self.attrs

    @property
    def epochs(self) -> int:
        return len(self.epoch_seconds)

    @property
    def client_count(self) -> int:
        """N, the logical clients (columns of every per-client series)."""
        return len(self.clients)

    @property
    def audit(self) -> Mapping[int, dict[str, np.ndarray]]:
        """``/audit`` (audit=true runs): client k -> series -> one value per epoch; empty
        for other runs."""
        return Columns(self.audit_series, self.client_count if self.audit_series else 0)

    @property
    def label_inference(self) -> Mapping[int, dict[str, np.ndarray]]:
        """``/attack/labels`` (attack.labels=true runs): client k -> series -> one value per
        epoch; empty for other runs."""
        if self.label_series:
            return Columns(self.label_series, self.client_count)
        found = self.groups.get("attack", {}).get("labels", {})  # a Run made by hand
        return {int(k): v for k, v in sorted(found.items(), key=lambda kv: int(kv[0]))
                if not k.startswith("@")}

    @property
    def epsilon(self) -> np.ndarray | None:
        """``/privacy/epsilon`` (defense.act_clip > 0 runs): the epsilon spent at
        defense.act_delta after each epoch by the DP activations; None for other runs."""
        found = self.groups.get("privacy", {}).get("epsilon")
        return None if found is None else np.asarray(found, dtype=np.float64)

    def final(self, series: str = "test_accuracy") -> dict[int, float]:
        """Each client's last value of ``series`` (NaN for a client with no epoch yet)."""
        return dict(zip(self.clients, self.final_array(series).tolist()))

    def final_array(self, series: str = "test_accuracy") -> np.ndarray:
        """The last row of ``series``: (N,), column k-1 = client k (NaN with no epoch yet).
        A client's last value, not its last finite one: use ``last_finite`` for metrics a
        client may skip (evaluated every few epochs, not sampled this round)."""
        values = self.series.get(series)
        if values is None:  # a Run made by hand
            return np.array([v[series][-1] if len(v[series]) else np.nan
                             for v in self.clients.values()], dtype=np.float64)
        return values[-1].astype(np.float64) if len(values) else np.full(values.shape[1], np.nan)

    def last_finite(self, series: str = "test_accuracy") -> np.ndarray:
        """(N,): each client's last non-NaN value of ``series`` (NaN if it has none)."""
        values = np.asarray(self.series.get(series, np.zeros((0, self.client_count))),
                            dtype=np.float64)
        ok = np.isfinite(values)
        if not values.size:
            return np.full(values.shape[1], np.nan)
        last = values.shape[0] - 1 - np.argmax(ok[::-1], axis=0)
        out = values[last, np.arange(values.shape[1])]
        out[~ok.any(axis=0)] = np.nan
        return out


def _load_group(group: h5py.Group) -> dict:
    out = {}
    for name, item in group.items():
        out[name] = _load_group(item) if isinstance(item, h5py.Group) else item[()]
    out.update({f"@{k}": v for k, v in group.attrs.items()})
    return out


def _per_client(group: h5py.Group | None) -> bool:
    """The old layout: one group per client, named by its number."""
    return group is not None and any(k.isdigit() for k in group)


def _stack(group: h5py.Group | None, clients: int, dtype) -> dict[str, np.ndarray]:
    """The old layout's /<top>/<k>/<series> as (epochs, N) arrays (NaN, or 0 for integer
    series, where a client lacks one)."""
    if group is None:
        return {}
    keys = {int(k): g for k, g in group.items() if k.isdigit()}
    clients = max([clients, *keys])
    data = {int(k): {n: d[()] for n, d in g.items()} for k, g in keys.items()}
    names = list(dict.fromkeys(n for d in data.values() for n in d))
    out = {}
    for name in names:
        found = [d[name] for d in data.values() if name in d]
        kind = np.result_type(*found) if dtype is None else dtype
        rows = max(len(f) for f in found)
        table = np.full((rows, clients), 0 if np.issubdtype(kind, np.integer) else np.nan,
                        dtype=kind)
        for k, d in data.items():
            if name in d:
                table[:len(d[name]), k - 1] = d[name]
        out[name] = table
    return out


def _columns(group: h5py.Group | None, skip: tuple = ()) -> dict[str, np.ndarray]:
    """The column layout's /<top>/<series> datasets, each read at once."""
    if group is None:
        return {}
    return {n: d[()] for n, d in group.items() if isinstance(d, h5py.Dataset) and n not in skip}


def read(path: str | Path) -> Run:
    path = Path(path)
    try:
        f = h5py.File(path, "r", locking=False)  # readable while a run still writes it
    except OSError as exc:
        raise NotAResult(f"{path} is not a readable HDF5 file ({exc})") from None
    with f:
        if "splitmpi_version" not in f.attrs or "config" not in f.attrs:
            raise NotAResult(f"{path} is not a splitmpi results file "
                             "(no splitmpi_version/config attributes)")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        count = int(attrs.get("clients", 0))
        group, audit, labels = f.get("clients"), f.get("audit"), f.get("attack/labels")
        if _per_client(group):  # files written before layout 2
            series = _stack(group, count, np.float64)
            held = {int(k): [int(c) for c in g.attrs.get("classes", [])]
                    for k, g in group.items() if k.isdigit()}
            count = max([count, *held])
            membership = np.zeros((count, max((max(c) + 1 for c in held.values() if c),
                                              default=0)), dtype=np.uint8)
            for k, c in held.items():
                membership[k - 1, c] = 1
        else:
            series = _columns(group, skip=("classes",))
            membership = (group["classes"][()] if group is not None and "classes" in group
                          else np.zeros((count, 0), np.uint8))
        audit_series = _stack(audit, count, None) if _per_client(audit) else _columns(audit)
        label_series = (_stack(labels, count, np.float64) if _per_client(labels)
                        else _columns(labels))
        if series:
            count = next(iter(series.values())).shape[1]
        if len(membership) < count:
            membership = np.vstack([membership, np.zeros((count - len(membership),
                                                          membership.shape[1]), np.uint8)])
        known = {"clients", "epochs", "comm", "audit"}
        groups = {}
        for name, item in f.items():
            if name in known:
                continue
            if name == "attack" and isinstance(item, h5py.Group):
                groups[name] = {n: _load_group(g) for n, g in item.items()
                                if n != "labels" and isinstance(g, h5py.Group)}
                groups[name].update({n: d[()] for n, d in item.items()
                                     if isinstance(d, h5py.Dataset)})
                groups[name].update({f"@{k}": v for k, v in item.attrs.items()})
                if labels is not None:  # as the old layout had it: "k" -> series
                    groups[name]["labels"] = Columns(label_series, count, str_keys=True)
            else:
                groups[name] = _load_group(item) if isinstance(item, h5py.Group) else item[()]
        if audit is not None:
            groups["audit"] = Columns(audit_series, count, str_keys=True)
        return Run(path=path, config=json.loads(attrs["config"]), attrs=attrs,
                   clients=Columns(series, count if series else 0),
                   classes=Classes(membership),
                   epoch_seconds=f["epochs/seconds"][()] if "epochs" in f else np.zeros(0),
                   comm={name: ds[()] for name, ds in f.get("comm", {}).items()},
                   groups=groups, series=series, membership=membership,
                   audit_series=audit_series, label_series=label_series)


def distribution(values: np.ndarray) -> dict[str, float]:
    """mean, min, p10, p50, p90, max of the finite values (NaN each when there is none),
    and n, how many were finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"n": 0, "mean": np.nan, "min": np.nan,
                **{f"p{p}": np.nan for p in PERCENTILES}, "max": np.nan}
    cuts = np.percentile(values, PERCENTILES)
    return {"n": int(len(values)), "mean": float(values.mean()), "min": float(values.min()),
            **{f"p{p}": float(c) for p, c in zip(PERCENTILES, cuts)},
            "max": float(values.max())}


def summary(run: Run) -> str:
    lines = [f"{run.path}: splitmpi {run.attrs['splitmpi_version']}, world size "
             f"{run.attrs['world_size']}, {run.client_count} client(s), {run.epochs} epoch(s), "
             + ("finished " + run.attrs["finished"] if run.finished else "NOT FINISHED")]
    if run.client_count <= LIST_CLIENTS:
        for k, series in run.clients.items():
            acc = series["test_accuracy"]
            last = f"{acc[-1]:.4f}" if len(acc) else "-"
            lines.append(f"  client {k} classes {run.classes[k]}: test accuracy {last}")
        return "\n".join(lines)
    if not run.epochs:
        return "\n".join(lines)
    held = run.membership.sum(axis=1)
    for title, values in (("final test accuracy", run.final_array("test_accuracy")),
                          ("last evaluated test accuracy", run.last_finite("test_accuracy")),
                          ("final train loss", run.final_array("train_loss")),
                          ("classes per client", held)):
        d = distribution(values)
        lines.append(f"  {title} over {d['n']} client(s): mean {d['mean']:.4f}, min "
                     f"{d['min']:.4f}, p10 {d['p10']:.4f}, p50 {d['p50']:.4f}, p90 "
                     f"{d['p90']:.4f}, max {d['max']:.4f}")
    if "participated" in run.series:
        took = np.nansum(run.series["participated"], axis=1)
        lines.append(f"  clients that trained per epoch: mean {took.mean():.1f}, min "
                     f"{took.min():.0f}, max {took.max():.0f} (of {run.client_count})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m splitmpi.reader RESULTS.h5 ...", file=sys.stderr)
        return 2
    for p in paths:
        try:
            print(summary(read(p)))
        except NotAResult as exc:
            print(f"splitmpi.reader: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
