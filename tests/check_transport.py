"""Run under mpiexec (any size >= 2): every rank sends tensors of each dtype to the next
rank and checks what it gets from the previous one, byte for byte, and the byte counts."""
import torch
from mpi4py import MPI

from splitmpi.transport import DTYPES, Kind, Transport, wait

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
dest, source = (rank + 1) % size, (rank - 1) % size


def sample(r: int, dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(r)
    return (torch.randn(shape, generator=g) * 100).to(dtype)


plain = Transport(world)
for dtype in DTYPES:
    sends = plain.isend(sample(rank, dtype), dest, Kind.LABELS)
    got = plain.recv(source, Kind.LABELS)
    wait(sends)
    want = sample(source, dtype)
    assert got.dtype == dtype and got.shape == want.shape, (got.dtype, got.shape)
    assert torch.equal(got, want), dtype

for shape in [(0,), (0, 4, 2, 2), (), (1,) * 8]:
    sends = plain.isend(torch.ones(shape), dest, Kind.FEATURES)
    got = plain.recv(source, Kind.FEATURES)
    wait(sends)
    assert got.shape == torch.Size(shape), shape

# Wire dtypes: activations travel as bf16/fp16 (half the payload) and come back float32.
payload = {}
for wire in ("float32", "bfloat16", "float16"):
    t = Transport(world, wire_dtype=wire)
    x = sample(rank, torch.float32, (64, 16, 8, 8))
    sends = t.isend(x, dest, Kind.ACTIVATION)
    got = t.recv(source, Kind.ACTIVATION)
    wait(sends)
    want = sample(source, torch.float32, (64, 16, 8, 8))
    assert got.dtype == torch.float32
    tolerance = {"float32": 0, "bfloat16": 1e-2, "float16": 1e-3}[wire]
    assert torch.allclose(got, want, rtol=tolerance, atol=tolerance * 1e-2), wire
    payload[wire] = t.counters()["bytes_sent"] - 88  # minus the header
    assert t.counters()["bytes_received"] == t.counters()["bytes_sent"]
    assert t.counters()["messages_sent"] == 2
assert payload["float32"] == 64 * 16 * 8 * 8 * 4
assert payload["bfloat16"] * 2 == payload["float32"] == payload["float16"] * 2

print(f"rank {rank}: transport ok", flush=True)
