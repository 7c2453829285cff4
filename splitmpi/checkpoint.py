"""Checkpoints at epoch boundaries, and within an epoch when a signal stops the run: every
rank saves its role's state, rank 0 marks the set complete, and the last two complete sets
are kept.

Layout: ``DIR/epoch-NNNNN/rank-R.pt`` (one plain dict per rank, written to a temporary file
and renamed) and ``DIR/epoch-NNNNN/COMPLETE`` once every rank's file is in place; NNNNN
counts finished epochs. A set taken within epoch NNNNN+1 is ``epoch-NNNNN-step-SSSSSSS``
(SSSSSSS: training steps the server had served in that epoch), and its states hold each
rank's place in the epoch (``position``). DIR is ``train.checkpoint_dir`` or
``OUTPUT.ckpt``. Files are read with ``weights_only=True``: a
checkpoint that would need arbitrary pickled objects (and could run code) is refused.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from mpi4py import MPI

from .config import Config
from .errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1
KEEP = 2
COMPLETE = "COMPLETE"
# Keys that may differ between the run that saved and the run that resumes (data.workers
# and clients.delay_ms change no number: ``data.EpochOrder``, a sleep; model.weights only
# starts a run: a resumed one takes its weights from the checkpoint).
VOLATILE = {"train": {"epochs", "resume", "checkpoint_every", "checkpoint_dir", "log_every",
                      "log_seconds", "device", "threads"},
            "data": {"workers"}, "clients": {"delay_ms"}, "model": {"weights"},
            "attack": None, "output": None, "overwrite": None}
# Keys added after 0.1, with the value that does what a checkpoint saved before they
# existed did (None: irrelevant to such a run, so whatever the resuming run says).
ADDED = {"split": {"share_bn": "average", "bn_recalibrate_batches": None,
                   "share_optimizer": "keep", "share_weights": "equal", "mode": "sl"},
         "data": {"emnist_split": None, "shards_per_client": None, "test_limit": 0},
         "clients": {"per_epoch": 1.0, "eval_every": 1},
         "comm": {"compress": "none", "compress_grad": False},
         "server": {"batch_clients": None},
         "defense": {"grad_clip": 0.0, "grad_noise": 0.0, "grad_maxnorm": False, "act_clip": 0.0,
                     "act_epsilon": 0.0, "act_delta": 1e-5, "label_epsilon": 0.0}}


def directory(cfg: Config) -> Path:
    return Path(cfg.train.checkpoint_dir or f"{cfg.output}.ckpt")


def identity(cfg: Config, world_size: int) -> dict:
    """What must match for a checkpoint to be resumed: the config less VOLATILE keys."""
    d = _stable(cfg.to_dict())
    d["world_size"] = world_size
    return d


def _stable(d: dict) -> dict:
    """``d`` less the VOLATILE keys (a saved identity may hold some: older runs kept them)."""
    for key, names in VOLATILE.items():
        if names is None:
            d.pop(key, None)
        elif isinstance(d.get(key), dict):
            for name in names:
                d[key].pop(name, None)
    return d


def _place(folder: Path) -> tuple[int, int]:
    """(finished epochs, steps into the next) of a checkpoint folder's name."""
    parts = folder.name.split("-")
    return int(parts[1]), int(parts[3]) if len(parts) == 4 else -1


def complete(root: Path) -> list[Path]:
    """The complete checkpoint sets in ``root`` (boundary and within an epoch), oldest
    first."""
    found = [p for p in root.glob("epoch-*") if (p / COMPLETE).exists()]
    return sorted(found, key=_place)


def save(world: MPI.Comm, cfg: Config, epoch: int, state: dict,
         steps: int | None = None) -> Path:
    """Collective. ``epoch`` counts finished epochs, ``steps`` those served in the next
    (rank 0's count; None at an epoch boundary); ``state`` is this rank's role state."""
    rank = world.Get_rank()
    steps = world.bcast(steps, root=0)
    name = f"epoch-{epoch:05d}" + (f"-step-{steps:07d}" if steps is not None else "")
    folder = directory(cfg) / name
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "epoch": epoch, "rank": rank,
               "identity": identity(cfg, world.Get_size()), "state": state}
    target = folder / f"rank-{rank}.pt"
    temporary = folder / f".rank-{rank}.pt.tmp"
    blob = io.BytesIO()
    torch.save(payload, blob)  # serialise first: a full disk then fails as a plain OSError
    try:
        with open(temporary, "wb") as f:
            f.write(blob.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise RuntimeError(f"cannot write checkpoint {target} ({exc}); the last complete "
                           f"checkpoint in {folder.parent} is intact") from exc
    world.Barrier()
    if rank == 0:
        marker = folder / f".{COMPLETE}.tmp"
        marker.write_text(f"{world.Get_size()} ranks\n")
        os.replace(marker, folder / COMPLETE)
        for old in complete(folder.parent)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    world.Barrier()
    return folder


def locate(cfg: Config) -> Path | None:
    """The checkpoint set ``train.resume`` names: ``auto`` = latest complete (or None)."""
    choice = cfg.train.resume
    if not choice:
        return None
    if choice == "auto":
        root = directory(cfg)
        found = complete(root) if root.is_dir() else []
        return found[-1] if found else None
    path = Path(choice)
    if not (path / COMPLETE).exists():
        raise ConfigError(f"train.resume={choice} is not a complete checkpoint set "
                          f"(no {COMPLETE} file)",
                          "use train.resume=auto or an epoch-NNNNN folder holding COMPLETE")
    return path


def epochs_of(folder: Path) -> int:
    return _place(folder)[0]


def load(folder: Path, cfg: Config, world: MPI.Comm) -> dict:
    """This rank's payload, checked against the current config and world."""
    path = folder / f"rank-{world.Get_rank()}.pt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} is missing",
                          "resume with the world size that saved it, or start afresh")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"checkpoint {path} holds objects other than tensors and plain "
                          f"data, which could run code when loaded ({str(exc)[:120]}...)",
                          "only resume from checkpoints written by splitmpi") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ConfigError(f"checkpoint {path} is unreadable or truncated ({exc})",
                          "resume from an older epoch-NNNNN folder") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a splitmpi checkpoint", "point train.resume elsewhere")
    want = identity(cfg, world.Get_size())
    saved = _as_saved(payload["identity"], want)
    if saved != want:
        diff = _differences(saved, want)
        raise ConfigError(f"checkpoint {folder} was saved by a different run ({diff})",
                          "resume with the config and world size that saved it, or set "
                          "train.resume= (empty) and a new output to start afresh")
    return payload


def _as_saved(saved: dict, current: dict) -> dict:
    """A saved identity with the keys added since it was written filled in (``ADDED``):
    an older run resumes when the new settings ask for what it did, e.g.
    ``split.share_bn=average``, and the difference names them otherwise."""
    filled = _stable({key: dict(value) if isinstance(value, dict) else value
                      for key, value in saved.items()})
    for section, added in ADDED.items():
        if not isinstance(filled.get(section), dict):
            continue
        for name, value in added.items():
            if name not in filled[section]:
                filled[section][name] = current[section][name] if value is None else value
    return filled


def _differences(saved: dict, current: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            if inner:
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return "; ".join(out)


def boundary(world: MPI.Comm, cfg: Config, epochs_done: int, state, decision=None) -> bool:
    """Collective end of an epoch: rank 0 passes ``decision`` = (save, stop) and every rank
    gets it; all save together if asked (``state()`` builds this rank's state). Returns stop."""
    save_it, stop = world.bcast(decision, root=0)
    if save_it:
        folder = save(world, cfg, epochs_done, state())
        if world.Get_rank() == 0:  # the set is rank 0's to mark complete, and to announce
            log.info(f"checkpoint {folder} written")
    return stop


def save_within(world: MPI.Comm, cfg: Config, epochs_done: int, state: dict,
                steps: int | None = None) -> None:
    """Collective: the checkpoint of a run that a signal stopped within an epoch."""
    folder = save(world, cfg, epochs_done, state, steps)
    if world.Get_rank() == 0:
        log.info(f"checkpoint {folder} written")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
