"""The split network trained as one network in one process: what a split run must equal.

A split step runs extractor -> defense -> cloud -> output layer across ranks (client.py and
server.py); here the same parts, the same defense and NoPeek term, and the same SGD
settings run that chain in one process. The attack trains its target with this step
(``attack.target``) and the train benchmark times it as its baseline (``bench.train``), so
neither can train something a real run would not; tests/test_step.py holds this step to
the split step bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .config import Config
from .defense import Defense


@dataclass
class Network:
    parts: models.SplitModel  # on ``device``
    defense: Defense  # what the client does to the activation before it is sent
    optimizer: torch.optim.SGD  # every part's parameters: one SGD, as the ranks' SGDs together
    device: torch.device
    amp: str  # train.amp, as the ranks' autocast

    def modules(self) -> tuple[nn.Module, ...]:
        return self.parts.extractor, self.defense, self.parts.cloud, self.parts.classifier

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16")


def build(cfg: Config, device: torch.device) -> Network:
    """The run's network (``models.for_run``: the run's seed, so the ranks' starting
    weights), its defense and one SGD with the run's settings."""
    parts = models.for_run(cfg)
    for m in (parts.extractor, parts.cloud, parts.classifier):
        m.to(device)
    optimizer = models.sgd([parts.extractor, parts.cloud, parts.classifier], cfg.train)
    return Network(parts, Defense(cfg.defense, cfg.train.epochs), optimizer, device, cfg.train.amp)


def step(net: Network, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One training step on a batch; returns its summed loss and hits, as the client
    counts them (the NoPeek term is trained on, not counted)."""
    x, y = x.to(net.device, non_blocking=True), y.to(net.device, non_blocking=True)
    for m in net.modules():
        m.train()
    with net.autocast():
        a = net.parts.extractor(x)
        sent = net.defense(a)
        penalty = net.defense.penalty(x, a)
        logits = net.parts.classifier(net.parts.cloud(sent))
        loss = nn.functional.cross_entropy(logits.float(), y)
    total = loss if penalty is None else loss + penalty
    net.optimizer.zero_grad(set_to_none=True)
    total.backward()
    net.optimizer.step()
    return loss.item() * len(y), int((logits.argmax(1) == y).sum())


@torch.no_grad()
def evaluate(net: Network, loader) -> dict:
    """Loss and accuracy over ``loader`` in eval mode (the defense's noise on, dropout
    off), in the client's report's terms."""
    for m in net.modules():
        m.eval()
    loss, hits, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(net.device, non_blocking=True), y.to(net.device, non_blocking=True)
        with net.autocast():
            logits = net.parts.classifier(net.parts.cloud(net.defense(net.parts.extractor(x))))
        loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        hits += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return {"test_loss": loss / max(seen, 1), "test_accuracy": hits / max(seen, 1),
            "test_samples": seen}
