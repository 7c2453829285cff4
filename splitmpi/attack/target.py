"""The extractor under attack, and the utility of the model it belongs to.

``attack.checkpoint`` names one of:

- a splitmpi run: its results file ``OUTPUT.h5`` (whose checkpoints are in
  ``OUTPUT.h5.ckpt``, or the run's ``train.checkpoint_dir``), that checkpoint folder, or
  one ``epoch-NNNNN`` set in it. The target is client ``attack.client``'s extractor at the
  end of epoch ``attack.epoch`` (0: the latest saved), as the MPI run trained it: after
  sharing, if the run shares, since the set at an epoch boundary is saved after it. Sets
  taken within an epoch are not attacked. The run's own config (its checkpoint's identity)
  rebuilds the network and the data; the command line gives only what the identity leaves
  out (``checkpoint.VOLATILE``: the attack section, output, device, threads).
- a torch file holding an extractor state dict under "extractor", top level or under
  ["model"] or ["state"] (the last is what one client's ``epoch-N/rank-K.pt`` holds); the
  config must then match the one it was trained with.

When it is empty, the config's split model is
trained here in one process on client 1's shard for ``train.epochs``, by the one-process
step of ``splitmpi.monolithic`` (the run's parts, defense, NoPeek term and SGD settings)
from client 1's seed: the network a split run with that shard as its only client trains.
Clients for the partition: ``clients`` if set, else the number of class lists of an
explicit ``data.partition``, else 3 (at most the number of classes). Utility = that
model's accuracy on client 1's test split with the defense in eval mode (noise on, dropout
off).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
from torch import nn

from .. import checkpoint, data, models, monolithic, population, reader
from .. import config as config_mod
from ..config import Config
from ..defense import Defense
from ..errors import ConfigError
from ..logs import Pace, Progress

log = logging.getLogger(__name__)


@dataclass
class Target:
    extractor: nn.Module  # eval mode, parameters frozen
    defense: Defense  # eval mode: noise on, dropout off
    accuracy: float  # utility: client k's test accuracy (NaN when unknown)
    source: str
    cloud: nn.Module | None = None  # the cloud that served the client: a run's checkpoint only
    client: int = 1  # whose extractor (attack.client for a run, else 1)


def clients_for(cfg: Config) -> int:
    """Clients assumed for the partition: ``clients``, an explicit partition's length, or 3
    (at most the number of classes, so "blocks" always works)."""
    if cfg.clients.count:
        return cfg.clients.count
    if isinstance(cfg.data.partition, list):
        return len(cfg.data.partition)
    return max(1, min(3, data.spec(cfg.data).num_classes))


def describe_defense(cfg: Config) -> str:
    """The defense settings that are on, e.g. "noise_sigma=0.5", or "none"."""
    on = [f"{k}={v:g}" for k, v in dataclasses.asdict(cfg.defense).items()
          if v and (k != "act_delta" or cfg.defense.act_epsilon)]
    return ", ".join(on) or "none"


# --- a checkpoint -------------------------------------------------------------------------

def _load_checkpoint(path: str) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise ConfigError(f"attack.checkpoint {path} cannot be read as a torch file ({exc})",
                          "pass a file written by torch.save holding plain tensors") from None
    if not isinstance(ck, dict):
        raise ConfigError(f"attack.checkpoint {path} does not hold a dict",
                          'save {"extractor": extractor.state_dict()}')
    return ck


def _part(ck: dict, name: str) -> dict | None:
    """``ck[name]``, ``ck["model"][name]`` or (a splitmpi client checkpoint,
    ``OUTPUT.ckpt/epoch-N/rank-K.pt``) ``ck["state"][name]``."""
    if isinstance(ck.get(name), dict):
        return ck[name]
    for outer in ("model", "state"):
        inner = ck.get(outer)
        if isinstance(inner, dict) and isinstance(inner.get(name), dict):
            return inner[name]
    return None


def load_extractor_state(path: str) -> dict:
    return _extractor_state(_load_checkpoint(path), path)


def _extractor_state(ck: dict, path: str) -> dict:
    state = _part(ck, "extractor")
    if state is None:
        raise ConfigError(f"attack.checkpoint {path} has no extractor state dict",
                          'save it under "extractor" (top level) or ["model"]["extractor"], '
                          "or pass a splitmpi client checkpoint (OUTPUT.ckpt/epoch-N/rank-1.pt)")
    return state


def _load_into(module: nn.Module, state: dict, what: str, cfg: Config) -> None:
    try:
        models.load_part(module, state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"attack.checkpoint {cfg.attack.checkpoint}: its {what} does not "
                          f"fit model.arch={cfg.model.arch} model.cut={cfg.model.cut} "
                          f"({first})", "set model.arch/model.cut/data.* to those the "
                          "checkpoint was trained with") from None


# --- a run's checkpoint ------------------------------------------------------------------

BOUNDARY = re.compile(r"epoch-\d+")  # a set at an epoch boundary; "-step-" ones are within


def _boundary_sets(root: Path) -> list[Path]:
    """The complete epoch-boundary sets in a checkpoint folder, oldest first."""
    return [p for p in checkpoint.complete(root) if BOUNDARY.fullmatch(p.name)]


def _checkpoint_root(results: Path) -> Path:
    """Where the run of results file ``results`` saved its checkpoints: its
    ``train.checkpoint_dir``, else beside the file."""
    try:
        stored = reader.read(results).config
    except reader.NotAResult as exc:
        raise ConfigError(f"attack.checkpoint {results}: {exc}",
                          "pass a splitmpi results file, its checkpoint folder or a .pt "
                          "file") from None
    return Path(stored.get("train", {}).get("checkpoint_dir") or f"{results}.ckpt")


def _epoch_set(cfg: Config) -> Path | None:
    """The epoch-NNNNN set that ``attack.checkpoint`` names (see the module doc), or None
    when it names a torch file or nothing."""
    a, path = cfg.attack, Path(cfg.attack.checkpoint)
    if not a.checkpoint:
        return None
    if not path.exists():
        raise ConfigError(f"attack.checkpoint {path} not found",
                          "pass a results file, its checkpoint folder, a .pt file, or "
                          "leave attack.checkpoint empty to train the config's model first")
    if path.is_file() and not h5py.is_hdf5(path):
        return None
    if path.is_dir() and path.name.startswith("epoch-"):
        if not BOUNDARY.fullmatch(path.name):
            raise ConfigError(f"attack.checkpoint {path} was taken within an epoch, "
                              "where the weights are half-way through it",
                              f"pass the checkpoint folder {path.parent}, or one of its "
                              "epoch-NNNNN sets")
        if not (path / checkpoint.COMPLETE).exists():
            raise ConfigError(f"attack.checkpoint {path} is not a complete checkpoint set "
                              f"(no {checkpoint.COMPLETE} file)",
                              f"pass the checkpoint folder {path.parent}")
        if a.epoch not in (0, checkpoint.epochs_of(path)):
            raise ConfigError(f"attack.epoch={a.epoch} but attack.checkpoint {path} is "
                              f"epoch {checkpoint.epochs_of(path)}",
                              f"pass the checkpoint folder {path.parent} with attack.epoch")
        return path
    root = _checkpoint_root(path) if path.is_file() else path
    sets = _boundary_sets(root) if root.is_dir() else []
    if not sets:
        within = sorted(p.name for p in root.glob("epoch-*-step-*")) if root.is_dir() else []
        also = f" (only sets within an epoch, not attacked: {', '.join(within)})" if within \
            else ""
        if path.is_file():
            raise ConfigError(f"the run of {path} saved no checkpoint at an epoch boundary "
                              f"in {root}{also}",
                              "rerun it with train.checkpoint_every=1 (or pass "
                              "attack.checkpoint= the folder its checkpoints went to)")
        raise ConfigError(f"attack.checkpoint {path} holds no checkpoint of a finished "
                          f"epoch{also}", "pass the OUTPUT.h5.ckpt folder of a run saved "
                          "with train.checkpoint_every=1")
    if not a.epoch:
        return sets[-1]
    for found in sets:
        if checkpoint.epochs_of(found) == a.epoch:
            return found
    saved = ", ".join(str(checkpoint.epochs_of(p)) for p in sets)
    raise ConfigError(f"attack.epoch={a.epoch} was not saved in {root} (saved epochs: "
                      f"{saved})", "set attack.epoch to a saved one, or 0 for the latest")


def for_run(cfg: Config) -> Config:
    """The config the attack runs with. For a run's checkpoint (see the module doc): the
    run's config, ``clients.count`` its client count, ``attack.checkpoint`` the epoch set
    and ``attack.epoch`` its epoch; otherwise ``cfg``. ConfigError for a set, epoch or
    client the run does not have."""
    folder = _epoch_set(cfg)
    if folder is None:
        if cfg.attack.client != 1 or cfg.attack.epoch:
            raise ConfigError(f"attack.client={cfg.attack.client} attack.epoch="
                              f"{cfg.attack.epoch} pick a client and an epoch of a run",
                              "pass attack.checkpoint=OUTPUT.h5 or its checkpoint folder, "
                              "or leave attack.client and attack.epoch at their defaults")
        return cfg
    identity = dict(_load_checkpoint(str(folder / "rank-0.pt")).get("identity") or {})
    clients = (identity.get("clients") or {}).get("count") or \
        int(identity.pop("world_size", 0)) - 1
    identity.pop("world_size", None)
    if not 1 <= cfg.attack.client <= clients:
        raise ConfigError(f"attack.client={cfg.attack.client} is not a client of the run "
                          f"of {folder} (clients 1..{clients})",
                          f"set attack.client to one of 1..{clients}")
    given = cfg.to_dict()
    values = {key: dict(value) if isinstance(value, dict) else value
              for key, value in identity.items()}
    for key, names in checkpoint.VOLATILE.items():
        if names is None:
            values[key] = dict(given[key]) if isinstance(given[key], dict) else given[key]
        else:
            values.setdefault(key, {}).update({name: given[key][name] for name in names})
    values.setdefault("clients", {})["count"] = clients
    values["attack"].update(checkpoint=str(folder), epoch=checkpoint.epochs_of(folder))
    run = config_mod.from_json(json.dumps(values))
    _warn_ignored(given, run.to_dict())
    return run


def _warn_ignored(given: dict, run: dict) -> None:
    """Log the command line's settings that the run's own replace."""
    default = Config().to_dict()
    ignored = [f"{s}.{k}={v!r} (the run's: {run[s][k]!r})"
               for s, section in given.items() if isinstance(section, dict) and s != "attack"
               for k, v in section.items()
               if v != default[s].get(k) and v != run[s].get(k)]
    if ignored:
        log.warning(f"the run's config replaces: {', '.join(ignored)}")


def _run_target(cfg: Config, device: torch.device) -> Target:
    """Client k's extractor, the cloud that served it and the output layer from the epoch
    set ``attack.checkpoint``; utility = their accuracy on client k's test split."""
    folder, k = Path(cfg.attack.checkpoint), cfg.attack.client
    server = _load_checkpoint(str(folder / "rank-0.pt")).get("state", {})
    client = population.saved_client(folder, k)
    serving = server.get("copies", {}).get(k, server)  # split.mode=sfl_v1: k's own copy
    net = monolithic.build(cfg, device)
    parts = net.parts
    _load_into(parts.extractor, client["extractor"], "extractor", cfg)
    _load_into(parts.cloud, serving["cloud"], "cloud", cfg)
    # u_shape: the client's classifier; label_sharing: the server's head
    _load_into(parts.classifier, client.get("classifier") or serving["head"], "classifier",
               cfg)
    _, test_loader, _ = data.client_loaders(cfg, k, cfg.clients.count)
    acc = monolithic.evaluate(net, test_loader)["test_accuracy"]
    freeze([parts.extractor, net.defense, parts.cloud])
    return Target(parts.extractor, net.defense, acc,
                  f"client {k} of {folder} (epoch {cfg.attack.epoch})", parts.cloud, k)


# --- or trained here ----------------------------------------------------------------------

def train_split_model(cfg: Config, device: torch.device) -> tuple[monolithic.Network, float]:
    """The config's split model trained in one process on client 1's shard (see the module
    doc). Returns (network, test accuracy)."""
    clients = clients_for(cfg)
    train_loader, test_loader, classes = data.client_loaders(cfg, 1, clients)
    net = monolithic.build(cfg, device)
    torch.manual_seed(cfg.train.seed * 1000 + 1)  # client 1's own seed, as client.prepare
    log.info(f"training {cfg.model.arch} cut {cfg.model.cut} on client 1 of {clients} "
             f"(classes {classes}, {len(train_loader.dataset)} images), defense "
             f"{describe_defense(cfg)}")
    acc = float("nan")
    for epoch in range(cfg.train.epochs):
        loss_sum = seen = 0
        progress = Progress(log, f"  epoch {epoch + 1}/{cfg.train.epochs}",
                            len(train_loader.dataset), "samples", Pace.of(cfg.train),
                            repeats=cfg.train.epochs - epoch - 1)
        for x, y, *_ in train_loader:  # defense.label_epsilon: (x, trained, true label)
            loss, _ = monolithic.step(net, x, y)
            loss_sum, seen = loss_sum + loss, seen + len(y)
            progress.update(len(y))
        acc = monolithic.evaluate(net, test_loader)["test_accuracy"]
        log.info(f"  epoch {epoch + 1}/{cfg.train.epochs}: train loss "
                 f"{loss_sum / max(seen, 1):.4f}, test accuracy {acc:.4f}")
    return net, acc


# --- the target ---------------------------------------------------------------------------

def freeze(target_parts: list[nn.Module]) -> None:
    """Eval mode and no gradients: the attacker observes the model, it does not train it."""
    for m in target_parts:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def get_target(cfg: Config, device: torch.device) -> Target:
    """The extractor under attack (and the utility of its model), see the module doc;
    ``cfg`` is ``for_run``'s."""
    if cfg.attack.checkpoint and Path(cfg.attack.checkpoint).is_dir():
        return _run_target(cfg, device)
    if not cfg.attack.checkpoint:
        net, acc = train_split_model(cfg, device)
        parts = net.parts
        if cfg.attack.save:
            Path(cfg.attack.save).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": {"extractor": parts.extractor.state_dict(),
                                  "cloud": parts.cloud.state_dict(),
                                  "classifier": parts.classifier.state_dict()},
                        "test_accuracy": acc, "config": cfg.to_json()}, cfg.attack.save)
            log.info(f"saved the trained model to {cfg.attack.save}")
        source = f"trained here: {cfg.train.epochs} epochs on client 1 of {clients_for(cfg)}"
        freeze([parts.extractor, net.defense])
        return Target(parts.extractor, net.defense, acc, source)
    ck = _load_checkpoint(cfg.attack.checkpoint)
    net = monolithic.build(cfg, device)
    parts = net.parts
    _load_into(parts.extractor, _extractor_state(ck, cfg.attack.checkpoint), "extractor", cfg)
    acc = float("nan")
    cloud, head = _part(ck, "cloud"), _part(ck, "classifier")
    if cloud is not None and head is not None:
        _load_into(parts.cloud, cloud, "cloud", cfg)
        _load_into(parts.classifier, head, "classifier", cfg)
        _, test_loader, _ = data.client_loaders(cfg, 1, clients_for(cfg))
        acc = monolithic.evaluate(net, test_loader)["test_accuracy"]
    elif isinstance(ck.get("test_accuracy"), (int, float)):
        acc = float(ck["test_accuracy"])
    freeze([parts.extractor, net.defense])
    return Target(parts.extractor, net.defense, acc, f"checkpoint {cfg.attack.checkpoint}")


@torch.no_grad()
def observe(target: Target, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """What the server receives for images ``x`` (eval mode: noise on, dropout off)."""
    dev = next(iter(target.extractor.parameters()), x).device
    return torch.cat([target.defense(target.extractor(x[i:i + batch].to(dev)))
                      for i in range(0, len(x), batch)])


@torch.no_grad()
def feature_rms(target: Target, x: torch.Tensor) -> float:
    """Root mean square of the clean activations (the scale noise_sigma compares with)."""
    dev = next(iter(target.extractor.parameters()), x).device
    return float(target.extractor(x.to(dev)).pow(2).mean().sqrt())
