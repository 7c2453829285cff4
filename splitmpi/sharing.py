"""Extractor sharing: average the clients' extractors with one Allreduce of one flat buffer.

What the average weighs and what happens to the SGD momentum of the averaged parameters
are ``split.share_weights`` and ``split.share_optimizer`` (``average_extractor``).

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


def _shared(extractor: nn.Module,
            share_bn: str) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The parameters the clients average (less BatchNorm's under ``local``) and, under
    ``average`` only, the floating BatchNorm buffers (running mean/var). Integer buffers
    (``num_batches_tracked``) count steps and are not averaged."""
    norms = _norm_layers(extractor)
    kept = ({id(p) for m in norms for p in m.parameters(recurse=False)}
            if share_bn == "local" else set())
    params = [p for p in extractor.parameters() if id(p) not in kept]
    stats = ([b for b in extractor.buffers() if b.is_floating_point()]
             if share_bn == "average" else [])
    return params, stats


def shared_tensors(extractor: nn.Module, share_bn: str = "average") -> list[torch.Tensor]:
    """What the clients average, in a fixed order: the shared parameters, then the shared
    BatchNorm statistics (``_shared``)."""
    params, stats = _shared(extractor, share_bn)
    return [p.data for p in params] + stats


def _momentum_buffer(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> torch.Tensor:
    """``p``'s SGD momentum buffer, made zeros (and kept) where no step has made it yet."""
    state = optimizer.state[p]
    if state.get("momentum_buffer") is None:
        state["momentum_buffer"] = torch.zeros_like(p)
    return state["momentum_buffer"]


def average_extractor(extractor: nn.Module, clients: MPI.Comm, share_bn: str = "average",
                      optimizer: torch.optim.Optimizer | None = None,
                      share_optimizer: str = "keep", samples: int | None = None) -> int:
    """Replace the shared part of every client's extractor by the mean over all clients;
    returns the bytes reduced.

    ``samples`` None: every client weighs the same (the plain mean). Otherwise each client
    scales its tensors by its ``samples`` before the sum and the sum is divided by the
    total, which travels as one extra element of the same buffer.

    ``share_optimizer`` is what happens to the SGD momentum of the shared parameters (the
    momentum of what stays local is always kept): ``keep`` each client's own, which pulls
    the identical extractors apart again for the next steps; ``average`` it in the same
    buffer and with the same weights as the parameters; ``reset`` it (dropped, so the next
    step starts it afresh from the gradient). A client that has no buffer yet counts as
    zeros and gets the average: SGD (dampening 0) starts a missing buffer as the gradient,
    which is what a zero buffer gives. SGD without momentum has no buffers: nothing to do.
    """
    params, stats = _shared(extractor, share_bn)
    tensors = [p.data for p in params] + stats
    momentum = optimizer is not None and optimizer.defaults.get("momentum", 0) != 0
    if share_optimizer == "average" and momentum:
        tensors += [_momentum_buffer(optimizer, p) for p in params]
    if not tensors:
        return 0
    sizes = [t.numel() for t in tensors]
    total = sum(sizes)
    length = total + (samples is not None)
    flat = _FLAT.get(extractor)
    if flat is None or flat.numel() != length:
        flat = _FLAT[extractor] = torch.empty(length, dtype=torch.float32)
    values = flat[:total]
    torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors], out=values)
    if samples is not None:
        values *= samples
        flat[total] = samples
    buffer = flat.numpy()
    clients.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    values /= clients.Get_size() if samples is None else flat[total]
    with torch.no_grad():
        for t, part in zip(tensors, values.split(sizes)):
            t.copy_(part.view_as(t))
    if share_optimizer == "reset" and momentum:
        for p in params:
            optimizer.state.get(p, {}).pop("momentum_buffer", None)
    return buffer.nbytes


@torch.no_grad()
def weighted_mean(modules: list[nn.Module], weights: list[float]) -> None:
    """Every module's floating-point state (parameters, BatchNorm statistics) becomes
    sum(w_k * x_k) / sum(w_k) over ``modules`` (same architecture), summed in their order;
    integer state (BatchNorm's step count) the largest. In one process: SplitFed v1's
    cloud copies on the server."""
    states = [m.state_dict() for m in modules]
    total = float(sum(weights))
    for name, first in states[0].items():
        if first.is_floating_point():
            mean = sum(float(w) * s[name].float() for w, s in zip(weights, states)) / total
        else:
            mean = torch.stack([s[name] for s in states]).amax(dim=0)
        for s in states:
            s[name].copy_(mean.to(first.dtype))


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
