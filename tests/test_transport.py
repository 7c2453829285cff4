"""Transport over real MPI ranks: every dtype, odd shapes, wire dtypes, byte counts,
recycled receive memory, payloads packed with their header or not, several sources on one
tag, with either way of waiting. And, in one process over ``splitmpi.loopback``, the host
staging of CUDA tensors on the CPU and the two message layouts."""
import pytest
import torch

import mpirun
from splitmpi import loopback
from splitmpi.transport import HEADER_BYTES, PACK_BYTES, Kind, Transport


@pytest.mark.parametrize("n, wait", [(2, "spin"), (3, "spin"), (3, "sleep")])
def test_tensors_cross_byte_for_byte(n, wait):
    proc = mpirun.ok(n, wait, module="check_transport", timeout=120)
    assert proc.stdout.count(f"transport ok ({wait})") == n


class Staging(Transport):
    """Stages every tensor, as a GPU rank without GPU-aware MPI stages CUDA tensors."""

    def _stages(self, t: torch.Tensor) -> bool:
        return True


def test_staged_sends_in_flight_keep_their_values():
    """``client.evaluate`` starts sending batch i+1 before it waits for batch i. MPICH
    reads a message of 8 KiB or more from the sender's buffer only when the receiver
    matches it, so a staging buffer refilled for i+1 while i is in flight would deliver
    i+1's values as i's."""
    shape = (128, 256)  # 128 KiB of float32
    batches = [torch.full(shape, float(i)) for i in range(6)]
    with loopback.World(2) as world:
        sender, receiver = Staging(world.comm(0)), Transport(world.comm(1))
        first = sender.isend(batches[0], 1, Kind.EVAL_ACTIVATION)
        second = sender.isend(batches[1], 1, Kind.EVAL_ACTIVATION)
        got = [receiver.recv(0, Kind.EVAL_ACTIVATION) for _ in range(2)]
        sender.wait(first)
        sender.wait(second)
        assert [g.unique().tolist() for g in got] == [[0.0], [1.0]]

        # evaluate's pipeline, two sends in flight at a time: two buffers are enough
        waiting = sender.isend(batches[0], 1, Kind.EVAL_ACTIVATION)
        for i in range(1, len(batches)):
            sends = sender.isend(batches[i], 1, Kind.EVAL_ACTIVATION)
            assert torch.equal(receiver.recv(0, Kind.EVAL_ACTIVATION), batches[i - 1]), i
            sender.wait(waiting)
            waiting = sends
        assert torch.equal(receiver.recv(0, Kind.EVAL_ACTIVATION), batches[-1])
        sender.wait(waiting)
        assert [len(pool) for pool in sender._outgoing.values()] == [2]


@pytest.mark.parametrize("wait", ["spin", "sleep"])
def test_packed_and_unpacked_tensors_interleave_per_source(wait):
    """A payload of at most PACK_BYTES crosses in its header's message, a larger one as a
    second message. Two senders mix both on one tag, and the receiver takes one sender's
    tensors, then the other's: each arrives whole and in its sender's order, a staging
    sender stages only what it does not pack, and the counters count 1 or 2 messages."""
    def tensors(rank: int) -> list[torch.Tensor]:
        return [torch.full((5,), float(rank)),
                torch.full((PACK_BYTES // 4 + 1,), float(rank) + 0.5),  # just too big to pack
                torch.arange(PACK_BYTES // 8, dtype=torch.int64) * rank,  # exactly packed
                torch.empty(0, 3),
                torch.full((256, 256), -float(rank))]  # 256 KiB
    messages = [1, 2, 1, 1, 2]
    with loopback.World(3) as w:
        def sender(rank):
            def send():
                t = (Staging if rank == 1 else Transport)(w.comm(rank), wait=wait)
                for x in tensors(rank):
                    t.send(x, 0, Kind.FEATURE_GRAD)
                return t
            return send

        def receiver():
            t = Transport(w.comm(0), wait=wait)
            got = {src: [t.recv(src, Kind.FEATURE_GRAD) for _ in messages] for src in (2, 1)}
            return got, t.counters()

        (got, received), first, second = loopback.run(receiver, sender(1), sender(2))
    for src in (1, 2):
        for i, (x, y) in enumerate(zip(tensors(src), got[src])):
            assert y.dtype == x.dtype and torch.equal(y, x), (src, i)
    assert [len(pool) for pool in first._outgoing.values()] == [1, 1]  # the two unpacked
    for t in (first, second):
        assert t.counters()["messages_sent"] == sum(messages)
        assert t.counters()["bytes_sent"] == (sum(x.nbytes for x in tensors(1))
                                              + len(messages) * HEADER_BYTES)
    assert received["messages_received"] == 2 * sum(messages)
    assert received["bytes_received"] == first.counters()["bytes_sent"] * 2
