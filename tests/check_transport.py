"""Run under mpiexec (any size >= 2): ``python -m check_transport spin|sleep``. Every rank
sends tensors of each dtype to the next rank and checks what it gets from the previous one,
byte for byte, the byte counts, and that recycled receive memory is never reused while a
received tensor still lives. Then: payloads packed with their header (one message) and
larger ones (header and payload) mixed on one tag, coded ones, the header's fields and the
audit hook on both paths, and, with 3 ranks or more, receives from one source while the
other sources send on the same tag."""
import sys

import torch
from mpi4py import MPI

from splitmpi.compress import Codec
from splitmpi.transport import (
    DTYPES,
    HEADER,
    HEADER_BYTES,
    HEADER_LEN,
    PACK_BYTES,
    Flag,
    Kind,
    Transport,
)

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


# Packed (payload <= PACK_BYTES: one message) and unpacked (two) tensors, interleaved on one
# tag: each arrives whole, in order, counted as 1 or 2 messages, header bytes included.
def mixed(r: int) -> list[torch.Tensor]:
    return [sample(r, torch.float32, (4, 8)),  # 128 B, packed
            torch.arange(PACK_BYTES, dtype=torch.uint8) + r,  # exactly PACK_BYTES, packed
            sample(r + 1, torch.float32, (3, 1 << 16)),  # 768 KiB, two messages
            torch.arange(PACK_BYTES + 1, dtype=torch.uint8) + r,  # one byte more: two
            torch.empty(0, 5),  # nothing but the header
            sample(r + 2, torch.bfloat16, (2, 1 << 18)),  # 2 MiB as float32: recycled memory
            sample(r + 3, torch.float64, (7,))]
MESSAGES = [1, 1, 2, 2, 1, 2, 1]  # bf16 and float64 cross as float32 (a wire kind)

counting = Transport(world, wait=mode)
seen = []
counting.on_receive = lambda src, kind, payload: seen.append((src, kind, payload.tobytes()))
counting.speaks_for = 100 + rank
sends = [counting.isend(x, dest, Kind.ACTIVATION_GRAD) for x in mixed(rank)]
got = []
for i in range(len(MESSAGES)):
    got.append(counting.recv(source, Kind.ACTIVATION_GRAD, dtype=torch.float32))
    assert counting.client == 100 + source and counting.flags == Flag(0), i
    assert 0 < counting.sent_ns <= __import__("time").monotonic_ns()
for s_ in sends:
    counting.wait(s_)
for i, (x, y) in enumerate(zip(mixed(source), got)):
    want = x.float() if x.is_floating_point() else x  # a wire kind comes back float32
    assert y.dtype == want.dtype and torch.equal(y, want), i
    assert seen[i][:2] == (source, Kind.ACTIVATION_GRAD), i
    assert seen[i][2] == counting.payload(x, Kind.ACTIVATION_GRAD).tobytes(), i  # as sent
c = counting.counters()
assert c["messages_sent"] == c["messages_received"] == sum(MESSAGES), c
for r, count in ((rank, "bytes_sent"), (source, "bytes_received")):
    wire = sum(counting.payload(x, Kind.ACTIVATION_GRAD).nbytes for x in mixed(r))
    assert c[count] == wire + len(MESSAGES) * HEADER_BYTES, (count, c)

# Flag.STOP on a packed and on an unpacked message; a received packed tensor is its own
# memory (the receive buffer is reused by the next message).
counting.stopping = True
sends = [counting.isend(x, dest, Kind.LABELS) for x in (torch.ones(3), torch.ones(1 << 17))]
first = counting.recv(source, Kind.LABELS)
assert counting.flags == Flag.STOP
second = counting.recv(source, Kind.LABELS)
assert counting.flags == Flag.STOP and torch.equal(first, torch.ones(3))
assert torch.equal(second, torch.ones(1 << 17))
for s_ in sends:
    counting.wait(s_)
counting.stopping = False

# comm.compress: a coded batch crosses packed or not, and decodes as the codec does.
coded = Transport(world, wait=mode, compress="int8")
codec = Codec.parse("int8")
small, large = sample(rank, torch.float32, (4, 16)), sample(rank, torch.float32, (64, 4096))
sends = [coded.isend(x, dest, Kind.ACTIVATION) for x in (small, large)]
for shape, messages in (((4, 16), 1), ((64, 4096), 2)):
    before = coded.counters()["messages_received"]
    y = coded.recv(source, Kind.ACTIVATION)
    want = sample(source, torch.float32, shape)
    assert torch.equal(y, codec.decode(codec.encode(want), shape)), shape
    assert coded.flags == Flag.CODED
    assert coded.counters()["messages_received"] - before == messages
for s_ in sends:
    coded.wait(s_)

# Several sources on one tag: rank 0 takes each source's tensors in turn, the last source
# first, while all of them have sent theirs; each source's stay in its order.
if size >= 3:
    many = Transport(world, wait=mode)
    if rank == 0:
        for src in reversed(range(1, size)):
            for i, x in enumerate(mixed(src)):
                assert torch.equal(many.recv(src, Kind.FEATURE_GRAD), x), (src, i)
    else:
        sends = [many.isend(x, 0, Kind.FEATURE_GRAD) for x in mixed(rank)]
        for s_ in sends:
            many.wait(s_)
    world.Barrier()  # every source is done, and none has begun the part below
    if rank == 0:
        assert many.waiting(Kind.FEATURE_GRAD) is None  # nothing left over
    world.Barrier()
    # and whoever sent first is probed, then received from, packed or not
    if rank == 0:
        left = set(range(1, size)) | {-k for k in range(1, size)}
        while left:
            src = many.probe_any(Kind.FEATURE_GRAD)
            y = many.recv(src, Kind.FEATURE_GRAD)
            key = src if y.numel() == 3 else -src
            assert key in left and torch.equal(y, torch.full((3 if key > 0 else 1 << 16,),
                                                             float(src))), key
            left.remove(key)
    else:
        sends = many.isend(torch.full((3,), float(rank)), 0, Kind.FEATURE_GRAD)
        sends += many.isend(torch.full((1 << 16,), float(rank)), 0, Kind.FEATURE_GRAD)
        many.wait(sends)

print(f"rank {rank}: transport ok ({mode})", flush=True)
