"""The extractor under attack, and the utility of the model it belongs to.

``attack.checkpoint`` names a torch file holding an extractor state dict under "extractor",
top level or under ["model"] or ["state"] (the last is what a splitmpi client checkpoint
``OUTPUT.ckpt/epoch-N/rank-1.pt`` holds). When it is empty, the config's split model is
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
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import data, monolithic
from ..config import Config
from ..defense import Defense
from ..errors import ConfigError
from ..logs import Pace, Progress

log = logging.getLogger(__name__)


@dataclass
class Target:
    extractor: nn.Module  # eval mode, parameters frozen
    defense: Defense  # eval mode: noise on, dropout off
    accuracy: float  # utility: client 1's test accuracy (NaN when unknown)
    source: str


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
    on = [f"{k}={v:g}" for k, v in dataclasses.asdict(cfg.defense).items() if v]
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
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"attack.checkpoint {cfg.attack.checkpoint}: its {what} does not "
                          f"fit model.arch={cfg.model.arch} model.cut={cfg.model.cut} "
                          f"({first})", "set model.arch/model.cut/data.* to those the "
                          "checkpoint was trained with") from None


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
        for x, y in train_loader:
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
    """The extractor under attack (and the utility of its model), see the module doc."""
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
