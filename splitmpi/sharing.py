"""Extractor sharing: average the clients' extractors with one Allreduce of one flat buffer.

BatchNorm needs care (``split.share_bn``, measured in ``docs/sharing.md``). Clients with
different classes see different activation statistics, so the average of their running
means and variances normalises no client's data the way training did, and the cloud and
classifier then get inputs they were never trained on: test accuracy falls to chance
while training accuracy looks fine. The modes:

- ``average``: every parameter and running statistic averaged (the plain FedAvg reading).
- ``local``: BatchNorm's affine parameters and statistics stay on each client (FedBN,
  SiloBN); everything else is averaged.
- ``recalibrate``: every parameter averaged, then each client re-estimates the running
  statistics of the averaged extractor on its own training data (a forward pass without
  gradients over at most ``split.bn_recalibrate_batches`` batches).
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable

import torch
from mpi4py import MPI
from torch import nn

_NORM = nn.modules.batchnorm._BatchNorm

# One flat float32 buffer per extractor, kept between epochs: a fresh one would fault in
# and zero new pages every time (resnet50 layer3: 34 MB, 35 ms of the 57 ms on one core).
_FLAT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_layers(module: nn.Module) -> list[_NORM]:
    return [m for m in module.modules() if isinstance(m, _NORM)]


def shared_tensors(extractor: nn.Module, share_bn: str = "average") -> list[torch.Tensor]:
    """What the clients average, in a fixed order: parameters (less BatchNorm's under
    ``local``), then, under ``average`` only, the floating BatchNorm buffers (running
    mean/var). Integer buffers (``num_batches_tracked``) count steps and are not averaged.
    """
    norms = _norm_layers(extractor)
    kept = ({id(p) for m in norms for p in m.parameters(recurse=False)}
            if share_bn == "local" else set())
    tensors = [p.data for p in extractor.parameters() if id(p) not in kept]
    if share_bn == "average":
        tensors += [b for b in extractor.buffers() if b.is_floating_point()]
    return tensors


def average_extractor(extractor: nn.Module, clients: MPI.Comm,
                      share_bn: str = "average") -> int:
    """Replace the shared part of every client's extractor by the mean over all clients;
    returns the bytes reduced."""
    tensors = shared_tensors(extractor, share_bn)
    if not tensors:
        return 0
    sizes = [t.numel() for t in tensors]
    flat = _FLAT.get(extractor)
    if flat is None or flat.numel() != sum(sizes):
        flat = _FLAT[extractor] = torch.empty(sum(sizes), dtype=torch.float32)
    torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors], out=flat)
    buffer = flat.numpy()
    clients.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    flat /= clients.Get_size()
    with torch.no_grad():
        for t, part in zip(tensors, flat.split(sizes)):
            t.copy_(part.view_as(t))
    return buffer.nbytes


@torch.no_grad()
def recalibrate(extractor: nn.Module, inputs: Iterable[torch.Tensor], batches: int) -> int:
    """Re-estimate the BatchNorm running statistics of ``extractor`` from at most
    ``batches`` input batches: an equal-weight average over the batches (momentum None),
    as training would have recorded had these weights produced them. Returns the samples
    seen. Weights, the step counters and the train/eval mode are left as they were.
    """
    norms = [m for m in _norm_layers(extractor) if m.track_running_stats]
    if not norms:
        return 0
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    training = extractor.training
    extractor.train()
    seen = 0
    for x in itertools.islice(inputs, batches):
        extractor(x)
        seen += len(x)
    extractor.train(training)
    for m, (momentum, steps) in zip(norms, kept):
        m.momentum = momentum
        m.num_batches_tracked.copy_(steps)
    return seen
