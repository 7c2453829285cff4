"""Extractor sharing: average all clients' extractors with one Allreduce of one flat buffer."""
from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn


def extractor_state(extractor: nn.Module) -> list[torch.Tensor]:
    """Parameters, then floating BatchNorm buffers (running mean/var), in a fixed order.

    Integer buffers (``num_batches_tracked``) count steps and are not averaged.
    """
    tensors = [p.data for p in extractor.parameters()]
    tensors += [b for b in extractor.buffers() if b.is_floating_point()]
    return tensors


def average_extractor(extractor: nn.Module, clients: MPI.Comm) -> int:
    """Replace every client's extractor by the mean of all of them; returns bytes reduced."""
    tensors = extractor_state(extractor)
    if not tensors:
        return 0
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])
    buffer = flat.numpy()
    clients.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    flat /= clients.Get_size()
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    return buffer.nbytes
