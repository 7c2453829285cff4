"""Where an attack's results go: ``/attack/<method>`` of a splitmpi results file.

The output is ``attack.output`` (or ``output``): an existing splitmpi results file (the
training run's own, say) gets the group added or replaced and is otherwise left alone;
otherwise a new results file is made. docs/privacy.md has the layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from ..config import Config
from ..errors import ConfigError
from ..reader import NotAResult, read
from ..results import ResultsWriter
from . import metrics
from .target import Target, clients_for


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def output_path(cfg: Config) -> Path:
    return Path(cfg.attack.output or cfg.output)


def _is_result(cfg: Config, path: Path) -> bool:
    """Whether ``path`` is a splitmpi results file to add to. A missing file is not; a
    foreign one is replaced only with overwrite=true, a ConfigError otherwise."""
    if not path.exists():
        return False
    try:
        read(path)
        return True
    except NotAResult:
        if not cfg.overwrite:
            raise ConfigError(f"output {path} exists and is not a splitmpi results file",
                              "pass attack.output=OTHER.h5, or overwrite=true to replace it"
                              ) from None
        return False


def check_output(cfg: Config) -> None:
    """Before any work: the output can be written (see ``_is_result``), its folder exists."""
    path = output_path(cfg)
    _is_result(cfg, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {path.parent}: {exc.strerror}",
                          "set attack.output= to a writable path") from None


def _open_results(cfg: Config, path: Path) -> h5py.File:
    """An open results file to add the attack to: the existing one, or a new one whose
    root attributes ``results.ResultsWriter`` writes (world size 1, no epochs)."""
    if _is_result(cfg, path):
        return h5py.File(path, "a")
    writer = ResultsWriter(dataclasses.replace(cfg, output=str(path)), world_size=1, clients=0)
    writer.file.attrs["clients"] = clients_for(cfg)
    writer.file.attrs["finished"] = now()  # nothing else will be written at the root
    return writer.file


@contextlib.contextmanager
def _new_group(cfg: Config, method: str) -> Iterator[h5py.Group]:
    """``/attack/<method>`` of the output, empty (an older one is replaced)."""
    with _open_results(cfg, output_path(cfg)) as f:
        name = f"attack/{method}"
        if name in f:
            del f[name]
        yield f.create_group(name)


def _target_attrs(cfg: Config, method: str, target: Target) -> dict:
    """What every attack's group says of its target: the model, the defense, the utility."""
    return {"method": method, "arch": cfg.model.arch, "cut": cfg.model.cut,
            "data": cfg.data.name, "client": target.client,
            **{f"defense_{k}": float(v) for k, v in dataclasses.asdict(cfg.defense).items()},
            "utility_accuracy": float(target.accuracy), "utility_source": target.source,
            "config": cfg.to_json()}


def write(cfg: Config, method: str, target: Target, evaluated: torch.Tensor, result: dict,
          info: dict) -> dict[str, float]:
    """Add or replace ``/attack/<method>`` (layout in docs/privacy.md); returns the
    summary of the metrics it stored (``<metric>_mean``, ``<metric>_std``)."""
    original = metrics.to_unit(evaluated)
    recon = metrics.to_unit(result["reconstruction"])
    values = metrics.metrics(original, recon)
    summary = metrics.summarise(values)
    with _new_group(cfg, method) as g:
        for key, v in values.items():
            g.create_dataset(key, data=v)
        for key, v in result["series"].items():
            g.create_dataset(key, data=v)
        k = min(cfg.attack.grid, len(original))
        g.create_dataset("originals", data=metrics.to_uint8(original[:k]))
        g.create_dataset("reconstructions", data=metrics.to_uint8(recon[:k]))
        attrs = {
            **_target_attrs(cfg, method, target),
            "image_shape": np.asarray(evaluated.shape[1:]),
            "pixel_range": metrics.PIXEL_RANGE,
            "score_formula": "1 - 1000 * MSE, MSE on [0,1] pixels",
            "psnr_formula": "10 log10(1 / MSE), data range 1",
            "ssim_settings": "Gaussian window 11x11 sigma 1.5, K1=0.01 K2=0.03, data range 1, "
                             "valid positions, mean over channels",
            "std": "population std over the evaluated images",
            "eval_samples": len(evaluated), **info,
            **summary, **result["attrs"], "finished": now()}
        for key, v in attrs.items():
            g.attrs[key] = v
    return summary


def write_completion(cfg: Config, target: Target, result: dict, info: dict) -> None:
    """Add or replace ``/attack/completion``: ``completion.completion_attack``'s arrays as
    data sets, its scalars and ``info`` as attributes (layout in docs/privacy.md)."""
    with _new_group(cfg, "completion") as g:
        attrs = {**_target_attrs(cfg, "completion", target),
                 "known_labels": cfg.attack.known_labels, **info}
        for key, v in result.items():
            if isinstance(v, np.ndarray):
                g.create_dataset(key, data=v)
            else:
                attrs[key] = v
        for key, v in {**attrs, "finished": now()}.items():
            g.attrs[key] = v
