"""Read a splitmpi results file back into plain Python and numpy (no MPI needed).

A file can be read while its run is still going: it holds every epoch flushed so far.

``python -m splitmpi.reader RESULTS.h5`` prints a summary of one file.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np


class NotAResult(ValueError):
    """The file is not a splitmpi results file (or not HDF5 at all)."""


@dataclass
class Run:
    path: Path
    config: dict
    attrs: dict
    clients: dict[int, dict[str, np.ndarray]]  # k -> series name -> one value per epoch
    classes: dict[int, list[int]]
    epoch_seconds: np.ndarray
    comm: dict[str, np.ndarray]  # counter -> (epochs, world_size)
    groups: dict[str, dict] = field(default_factory=dict)  # other top-level groups, raw

    @property
    def finished(self) -> bool:
        return "finished" in self.attrs

    @property
    def epochs(self) -> int:
        return len(self.epoch_seconds)

    @property
    def label_inference(self) -> dict[int, dict[str, np.ndarray]]:
        """``/attack/labels`` (attack.labels=true runs): client k -> series -> one value per
        epoch; empty for other runs."""
        found = self.groups.get("attack", {}).get("labels", {})
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
        return {k: float(v[series][-1]) if len(v[series]) else float("nan")
                for k, v in self.clients.items()}


def _load_group(group: h5py.Group) -> dict:
    out = {}
    for name, item in group.items():
        out[name] = _load_group(item) if isinstance(item, h5py.Group) else item[()]
    out.update({f"@{k}": v for k, v in group.attrs.items()})
    return out


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
        groups = f.get("clients", {})
        clients = {int(k): {name: ds[()] for name, ds in g.items()} for k, g in groups.items()}
        classes = {int(k): [int(c) for c in g.attrs.get("classes", [])]
                   for k, g in groups.items()}
        known = {"clients", "epochs", "comm"}
        return Run(path=path, config=json.loads(attrs["config"]), attrs=attrs,
                   clients=dict(sorted(clients.items())), classes=classes,
                   epoch_seconds=f["epochs/seconds"][()] if "epochs" in f else np.zeros(0),
                   comm={name: ds[()] for name, ds in f.get("comm", {}).items()},
                   groups={n: _load_group(g) for n, g in f.items() if n not in known})


def summary(run: Run) -> str:
    lines = [f"{run.path}: splitmpi {run.attrs['splitmpi_version']}, world size "
             f"{run.attrs['world_size']}, {run.epochs} epoch(s), "
             + ("finished " + run.attrs["finished"] if run.finished else "NOT FINISHED")]
    for k, series in run.clients.items():
        acc = series["test_accuracy"]
        last = f"{acc[-1]:.4f}" if len(acc) else "-"
        lines.append(f"  client {k} classes {run.classes[k]}: test accuracy {last}")
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
