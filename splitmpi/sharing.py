"""Extractor sharing: average the clients' extractors with one Allreduce of one flat buffer.

What the average weighs and what happens to the SGD momentum of the averaged parameters
are ``split.share_weights`` and ``split.share_optimizer`` (``average``).

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

from .population import Bank

_NORM = nn.modules.batchnorm._BatchNorm

# One flat float32 buffer per shared module (the extractor; under SplitFed the classifier
# too, averaged right after it), kept between epochs: a fresh one would fault in
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


def average(bank: Bank, module: nn.Module, members: list[int], clients: MPI.Comm,
            participants: int, share_bn: str = "average", share_optimizer: str = "keep",
            weights: list[float] | None = None) -> int:
    """Replace the shared part of ``module`` (the extractor, or under SplitFed the
    classifier) of every participating client by the mean over all participants; returns
    the bytes reduced. ``members`` are this rank's participants (rows of ``bank``),
    ``participants`` their number over all ranks.

    Each rank sums its members' shared columns (scaled by their ``weights``, when given)
    into one flat buffer, in id order; one Allreduce over the client ranks sums the ranks'
    sums; the mean goes back into every member's row. ``weights`` None: every client
    weighs the same and the sum is divided by ``participants``; otherwise by the total
    weight, which travels as one extra element of the same buffer. A rank with no member
    this epoch takes part in the Allreduce with zeros.

    ``share_optimizer`` is what happens to the SGD momentum of the shared parameters (the
    momentum of what stays local is always kept): ``keep`` each client's own, which pulls
    the identical extractors apart again for the next steps; ``average`` it in the same
    buffer and with the same weights as the parameters; ``reset`` it (zeros: the next
    step starts it afresh from the gradient, as SGD does without a buffer). SGD without
    momentum has no buffers: nothing to do."""
    # the spans are read off the active row's views, whichever client's: the same in every row
    rows = [bank.row[k] for k in members]
    params, stats = _shared(module, share_bn)
    spans = bank.spans([p.data for p in params] + stats)
    momentum = bank.momentum is not None
    averaged = share_optimizer == "average" and momentum
    # (bank, start, stop) of each piece of the flat buffer, in order
    pieces = [(bank.values, a, b) for a, b in spans]
    if momentum:
        moment_pieces = [(bank.momentum, a, b) for a, b in bank.spans([p.data for p in params])]
        pieces += moment_pieces if averaged else []
    total = sum(b - a for _, a, b in pieces)
    if total == 0:
        return 0
    length = total + (weights is not None)
    flat = _FLAT.get(module)
    if flat is None or flat.numel() != length:
        flat = _FLAT[module] = torch.empty(length, dtype=torch.float32)
    values = flat[:total]
    values.zero_()
    for n, i in enumerate(rows):
        at = 0
        for rows_of, a, b in pieces:
            part = rows_of[i, a:b].to("cpu", torch.float32)
            if weights is not None:
                part = part * weights[n]
            values[at:at + b - a] += part
            at += b - a
    if weights is not None:
        flat[total] = float(sum(weights))
    buffer = flat.numpy()
    clients.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    values /= participants if weights is None else flat[total]
    mean = values.to(bank.values.device)
    with torch.no_grad():
        for i in rows:
            at = 0
            for rows_of, a, b in pieces:
                rows_of[i, a:b] = mean[at:at + b - a]
                at += b - a
            if share_optimizer == "reset" and momentum:
                for rows_of, a, b in moment_pieces:
                    rows_of[i, a:b] = 0
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
