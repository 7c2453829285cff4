"""Run under mpiexec (any size >= 2): ``python -m check_transport spin|sleep``. Every rank
sends tensors of each dtype to the next rank and checks what it gets from the previous one,
byte for byte, the byte counts, and that recycled receive memory is never reused while a
received tensor still lives."""
import sys

import torch
from mpi4py import MPI

from splitmpi.transport import DTYPES, HEADER, HEADER_LEN, Kind, Transport

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
dest, source = (rank + 1) % size, (rank - 1) % size


def sample(r: int, dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(r)
    return (torch.randn(shape, generator=g) * 100).to(dtype)


mode = sys.argv[1]
plain = Transport(world, wait=mode)
for dtype in DTYPES:
    sends = plain.isend(sample(rank, dtype), dest, Kind.LABELS)
    got = plain.recv(source, Kind.LABELS)
    plain.wait(sends)
    want = sample(source, dtype)
    assert got.dtype == dtype and got.shape == want.shape, (got.dtype, got.shape)
    assert torch.equal(got, want), dtype

for shape in [(0,), (0, 4, 2, 2), (), (1,) * 8]:
    sends = plain.isend(torch.ones(shape), dest, Kind.FEATURES)
    got = plain.recv(source, Kind.FEATURES)
    plain.wait(sends)
    assert got.shape == torch.Size(shape), shape

# Wire dtypes: activations travel as bf16/fp16 (half the payload) and come back float32.
payload = {}
for wire in ("float32", "bfloat16", "float16"):
    t = Transport(world, wire_dtype=wire, wait=mode)
    x = sample(rank, torch.float32, (64, 16, 8, 8))
    sends = t.isend(x, dest, Kind.ACTIVATION)
    got = t.recv(source, Kind.ACTIVATION)
    t.wait(sends)
    want = sample(source, torch.float32, (64, 16, 8, 8))
    assert got.dtype == torch.float32
    tolerance = {"float32": 0, "bfloat16": 1e-2, "float16": 1e-3}[wire]
    assert torch.allclose(got, want, rtol=tolerance, atol=tolerance * 1e-2), wire
    payload[wire] = t.counters()["bytes_sent"] - HEADER_LEN * HEADER.itemsize
    assert t.counters()["bytes_received"] == t.counters()["bytes_sent"]
    assert t.counters()["messages_sent"] == 2
assert payload["float32"] == 64 * 16 * 8 * 8 * 4
assert payload["bfloat16"] * 2 == payload["float32"] == payload["float16"] * 2

# Big receives land in recycled memory, but only in memory nothing refers to any more.
big = (2, 1 << 18)  # 2 MiB of float32
kept, graph = [], None
for i in range(3):
    sends = plain.isend(sample(10 * rank + i, torch.float32, big), dest, Kind.FEATURES)
    got = plain.recv(source, Kind.FEATURES)
    plain.wait(sends)
    if i == 0:
        kept.append(got)  # held by the caller
    elif i == 1:
        graph = (got.requires_grad_() ** 2).sum()  # held by an autograd graph only
        freed = got.data_ptr()
        del got
    else:
        kept.append(got)
for i, got in ((0, kept[0]), (2, kept[1])):
    assert torch.equal(got, sample(10 * source + i, torch.float32, big)), i
pointers = {t.data_ptr() for t in kept}
assert len(pointers) == 2, "a live tensor's memory was received into"
del graph  # the second tensor's memory is free now, and is the one reused
sends = plain.isend(sample(99, torch.float32, big), dest, Kind.FEATURES)
again = plain.recv(source, Kind.FEATURES)
plain.wait(sends)
assert torch.equal(again, sample(99, torch.float32, big))
assert again.data_ptr() == freed
assert torch.equal(kept[0], sample(10 * source, torch.float32, big))

print(f"rank {rank}: transport ok ({mode})", flush=True)
