"""Run under mpiexec: clients (ranks 1..N) with different extractors average them; every
client must end with the exact mean of what all had, BatchNorm buffers included."""
import torch
from mpi4py import MPI

from splitmpi.config import ModelConfig
from splitmpi.models import build
from splitmpi.sharing import average_extractor, shared_tensors

world = MPI.COMM_WORLD
rank = world.Get_rank()
clients = world.Split(MPI.UNDEFINED if rank == 0 else 1, rank)
if rank != 0:
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
    print(f"rank {rank}: sharing ok", flush=True)
