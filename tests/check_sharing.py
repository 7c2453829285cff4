"""Run under mpiexec: clients (ranks 1..N) with different extractors average them; every
client must end with the exact mean of what all had, BatchNorm buffers included. Then the
same with different sample counts and SGD momentum per client, for every
split.share_weights and split.share_optimizer, and the defaults against 0.1's averaging."""
import copy

import numpy as np
import torch
from mpi4py import MPI

from splitmpi.config import ModelConfig
from splitmpi.models import build
from splitmpi.runtime import client_comm
from splitmpi.sharing import _shared, average_extractor, shared_tensors

world = MPI.COMM_WORLD
rank = world.Get_rank()
clients = client_comm(world)  # None on the server


def check_the_mean():
    """The plain call (0.1's signature): the mean, identical on every client."""
    for arch, cut in (("resnet50", "layer1"), ("cnn5", 3)):
        extractor = build(ModelConfig(arch, cut), 3, 32, 10, seed=rank).extractor
        with torch.no_grad():  # make the BatchNorm running stats differ per client too
            for b in extractor.buffers():
                if b.is_floating_point():
                    b.add_(rank)
        mine = [t.clone() for t in shared_tensors(extractor)]
        everyone = clients.allgather([t.numpy() for t in mine])
        reduced = average_extractor(extractor, clients)
        assert reduced == 4 * sum(t.numel() for t in mine)
        after = shared_tensors(extractor)
        for i, t in enumerate(after):
            mean = torch.stack([torch.from_numpy(e[i]) for e in everyone]).mean(0)
            assert torch.allclose(t, mean, atol=1e-6), (arch, i)
        # identical on every client, bit for bit
        gathered = clients.allgather(torch.cat([t.reshape(-1) for t in after]).numpy())
        assert all((g == gathered[0]).all() for g in gathered)
        if clients.Get_size() > 1:
            assert not torch.equal(after[0], mine[0])


RESNET = build(ModelConfig("resnet50", "layer1"), 3, 32, 10, seed=rank).extractor


def with_momentum():
    """A ResNet extractor of its own per client (BatchNorm statistics too) and an SGD with a
    momentum buffer of its own for every parameter, except on rank 1, which has taken no
    step yet (no buffers)."""
    extractor = copy.deepcopy(RESNET)
    optimizer = torch.optim.SGD(extractor.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(100 + rank)
    with torch.no_grad():
        for b in extractor.buffers():
            if b.is_floating_point():
                b.add_(rank)
    if rank != 1:
        for p in extractor.parameters():
            optimizer.state[p]["momentum_buffer"] = torch.randn_like(p) + rank
    return extractor, optimizer


def momenta(optimizer, params):
    """Each parameter's momentum buffer, zeros where there is none: what a client adds."""
    return [optimizer.state.get(p, {}).get("momentum_buffer", torch.zeros_like(p)).clone()
            for p in params]


def as_averaged_in_0_1(extractor, share_bn):
    """0.1's averaging, written out: the plain mean in float32, one Allreduce, no optimizer."""
    tensors = shared_tensors(extractor, share_bn)
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    clients.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
    flat /= clients.Get_size()
    return flat


def check_defaults_are_0_1():
    """keep + equal: parameters, statistics, momentum and the bytes of 0.1, bit for bit."""
    for share_bn in ("average", "local", "recalibrate"):
        extractor, optimizer = with_momentum()
        params, _ = _shared(extractor, share_bn)
        before = momenta(optimizer, extractor.parameters())
        had = [p in optimizer.state for p in extractor.parameters()]
        expected = as_averaged_in_0_1(extractor, share_bn)
        reduced = average_extractor(extractor, clients, share_bn, optimizer, "keep", None)
        assert reduced == expected.numel() * 4
        after = torch.cat([t.reshape(-1) for t in shared_tensors(extractor, share_bn)])
        assert torch.equal(after, expected), share_bn
        assert had == [p in optimizer.state for p in extractor.parameters()]
        assert all(torch.equal(a, b) for a, b in
                   zip(before, momenta(optimizer, extractor.parameters())))


def check_weights_and_optimizer(share_weights, share_optimizer, share_bn):
    """Every client ends with the weighted mean (weights: its sample count, or 1) of the
    shared tensors and, under ``average``, of the shared parameters' momentum (rank 1's
    missing buffers count as zeros); ``reset`` drops the shared parameters' buffers;
    the momentum of what is not shared (BatchNorm under ``local``) is the client's own."""
    extractor, optimizer = with_momentum()
    samples = 10 * rank + 7 if share_weights == "samples" else None
    params, stats = _shared(extractor, share_bn)
    shared = {id(p) for p in params}
    local = [p for p in extractor.parameters() if id(p) not in shared]
    mine = [t.clone() for t in shared_tensors(extractor, share_bn)]
    mine_momenta = momenta(optimizer, params)
    local_before = momenta(optimizer, local)
    averaged = mine + (mine_momenta if share_optimizer == "average" else [])
    everyone = clients.allgather(([t.numpy() for t in averaged], samples or 1))
    weights = np.array([w for _, w in everyone], dtype=np.float64)

    reduced = average_extractor(extractor, clients, share_bn, optimizer, share_optimizer,
                                samples)
    assert reduced == 4 * (sum(t.numel() for t in averaged) + (samples is not None))
    after = shared_tensors(extractor, share_bn)
    if share_optimizer == "average":
        after += [optimizer.state[p]["momentum_buffer"] for p in params]
    for i, t in enumerate(after):
        stack = np.stack([e[i].astype(np.float64) for e, _ in everyone])
        mean = torch.from_numpy(np.tensordot(weights, stack, 1) / weights.sum())
        assert torch.allclose(t.double(), mean, rtol=1e-5, atol=1e-5), (share_weights, i)
    gathered = clients.allgather(torch.cat([t.reshape(-1) for t in after]).numpy())
    assert all((g == gathered[0]).all() for g in gathered)
    if share_optimizer == "reset":
        assert not any("momentum_buffer" in optimizer.state.get(p, {}) for p in params)
    if share_optimizer == "keep":
        assert all(torch.equal(a, b) for a, b in zip(mine_momenta, momenta(optimizer, params)))
    assert all(torch.equal(a, b) for a, b in zip(local_before, momenta(optimizer, local)))
    assert (share_bn == "local") == bool(local)


if rank != 0:
    check_the_mean()
    check_defaults_are_0_1()
    for share_weights in ("equal", "samples"):
        for share_optimizer in ("keep", "average", "reset"):
            for share_bn in ("average", "local"):
                check_weights_and_optimizer(share_weights, share_optimizer, share_bn)
    print(f"rank {rank}: sharing ok", flush=True)
