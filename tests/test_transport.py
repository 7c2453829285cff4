"""Transport over real MPI ranks: every dtype, odd shapes, wire dtypes, byte counts,
recycled receive memory, with either way of waiting. And, in one process over
``splitmpi.loopback``, the host staging of CUDA tensors on the CPU."""
import pytest
import torch

import mpirun
from splitmpi import loopback
from splitmpi.transport import Kind, Transport


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
