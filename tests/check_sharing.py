"""Run under mpiexec: each client rank (1..R) hosts two logical clients, whose extractors
(BatchNorm buffers and SGD momentum included) differ; after ``sharing.average`` every
participating client must hold the exact (weighted) mean over all participants on all
ranks, for every split.share_weights, split.share_optimizer and split.share_bn, and a
client that did not take part must keep its own. With one client per rank and the
defaults, the result is 0.1's averaging bit for bit."""
import numpy as np
import torch
from mpi4py import MPI

from splitmpi import population
from splitmpi.config import ModelConfig
from splitmpi.models import build
from splitmpi.runtime import client_comm
from splitmpi.sharing import _shared, average, shared_tensors

world = MPI.COMM_WORLD
rank = world.Get_rank()
clients = client_comm(world)  # None on the server
ranks = world.Get_size() - 1


def banked(arch: str, cut, per_rank: int, momentum: bool = True):
    """An extractor, its SGD and a bank of ``per_rank`` clients (ids 1.. over the ranks),
    client k's row made its own: BatchNorm statistics + k, parameters and momentum drawn
    from k's seed; client 1 has no momentum yet (zeros, as before its first step)."""
    extractor = build(ModelConfig(arch, cut), 3, 32, 10, seed=0).extractor
    optimizer = torch.optim.SGD(extractor.parameters(), lr=0.1, momentum=0.9 if momentum else 0)
    ids = population.hosted(rank, ranks, per_rank * ranks)
    bank = population.Bank({"extractor": extractor}, optimizer, ids, seed=0)
    g = torch.Generator()
    for k in ids:
        bank.activate(k)
        g.manual_seed(k)
        with torch.no_grad():
            for p in extractor.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                if momentum and k != 1:
                    optimizer.state[p]["momentum_buffer"].copy_(torch.randn(p.shape, generator=g))
            for b in extractor.buffers():
                if b.is_floating_point():
                    b.add_(k)
    return extractor, optimizer, bank


def snapshot(extractor, optimizer, bank, k, share_bn, with_momentum):
    """Client k's shared tensors (and the shared parameters' momentum), copied."""
    bank.activate(k)
    params, _ = _shared(extractor, share_bn)
    out = [t.clone() for t in shared_tensors(extractor, share_bn)]
    if with_momentum:
        out += [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    return out


def check_defaults_are_0_1():
    """One client per rank, keep + equal: parameters, statistics, momentum and the bytes
    of 0.1's averaging (the plain float32 mean, one Allreduce), bit for bit."""
    for share_bn in ("average", "local", "recalibrate"):
        extractor, optimizer, bank = banked("resnet50", "layer1", 1)
        k = bank.ids[0]
        momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in extractor.parameters()]
        flat = torch.cat([t.reshape(-1).float() for t in shared_tensors(extractor, share_bn)])
        clients.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
        flat /= clients.Get_size()
        reduced = average(bank, extractor, [k], clients, ranks, share_bn, "keep", None)
        assert reduced == flat.numel() * 4
        after = torch.cat([t.reshape(-1) for t in shared_tensors(extractor, share_bn)])
        assert torch.equal(after, flat), share_bn
        assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"])
                   for a, p in zip(momenta, extractor.parameters()))


def check_many(share_weights, share_optimizer, share_bn, arch="resnet50", cut="layer1"):
    """Two clients per rank, the second of rank 1 not taking part: every participant ends
    with the weighted mean (weights: sample counts 10 k + 7, or 1) over all participants,
    identical bit for bit; momentum averaged, zeroed (reset) or kept; the one that did
    not take part keeps everything."""
    extractor, optimizer, bank = banked(arch, cut, 2)
    everyone_ids = population.hosted(1, ranks, 2 * ranks)
    absent = everyone_ids[1]
    members = [k for k in bank.ids if k != absent]
    participants = 2 * ranks - 1
    weights = [10 * k + 7 for k in members] if share_weights == "samples" else None
    averaged = share_optimizer == "average"
    mine = {k: snapshot(extractor, optimizer, bank, k, share_bn, True) for k in bank.ids}
    everyone = clients.allgather({k: ([t.numpy() for t in mine[k]],
                                      (10 * k + 7) if weights else 1) for k in members})
    gathered = {k: v for part in everyone for k, v in part.items()}
    w = np.array([gathered[k][1] for k in sorted(gathered)], dtype=np.float64)

    reduced = average(bank, extractor, members, clients, participants, share_bn,
                      share_optimizer, weights)
    count = len(shared_tensors(extractor, share_bn))
    n_values = sum(t.numel() for t in mine[bank.ids[0]][:count])
    n_momenta = sum(t.numel() for t in mine[bank.ids[0]][count:])
    assert reduced == 4 * (n_values + (n_momenta if averaged else 0) + (weights is not None))
    for k in bank.ids:
        after = snapshot(extractor, optimizer, bank, k, share_bn, True)
        if k == absent:
            assert all(torch.equal(a, b) for a, b in zip(after, mine[k])), "absent changed"
            continue
        for i, t in enumerate(after):
            if i >= count and not averaged:
                expected = torch.zeros_like(t) if share_optimizer == "reset" else mine[k][i]
                assert torch.equal(t, expected), (share_optimizer, i)
                continue
            stack = np.stack([gathered[j][0][i].astype(np.float64) for j in sorted(gathered)])
            mean = torch.from_numpy(np.tensordot(w, stack, 1) / w.sum())
            assert torch.allclose(t.double(), mean, rtol=1e-5, atol=1e-5), (share_weights, i)
    values = [torch.cat([t.reshape(-1) for t in snapshot(extractor, optimizer, bank, k,
                                                           share_bn, averaged)]).numpy()
              for k in members]
    all_values = [v for part in clients.allgather(values) for v in part]
    assert all((v == all_values[0]).all() for v in all_values), "participants differ"
    if share_bn == "local":  # BatchNorm's own parameters and statistics stay each client's
        params, _ = _shared(extractor, share_bn)
        assert len(params) < len(list(extractor.parameters()))


if rank != 0:
    check_defaults_are_0_1()
    for share_weights in ("equal", "samples"):
        for share_optimizer in ("keep", "average", "reset"):
            for share_bn in ("average", "local"):
                check_many(share_weights, share_optimizer, share_bn)
    check_many("equal", "keep", "average", "cnn5", 3)
    print(f"rank {rank}: sharing ok", flush=True)
