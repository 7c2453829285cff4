"""A world of ranks inside one process: each rank a thread, all over one MPI.COMM_SELF.

So a client step and a server step can run without mpiexec (as mpi4py's and Heat's own
tests do), through the real ``Transport``: headers, payload buffers, wire-dtype casts,
requests and waiting. Each rank gets a communicator view (``World.comm(rank)``) with the
point-to-point calls ``Transport`` makes. Every message goes through one duplicate of
``MPI.COMM_SELF``, with the virtual source and destination carried in the tag, so MPI's
matching and non-overtaking rules hold between two virtual ranks as between two processes.
``run`` starts one thread per rank: mpi4py asks for MPI_THREAD_MULTIPLE and releases the
GIL while it waits, as torch does while it computes.

Collectives (extractor sharing) and pickled messages are not offered: what needs them is
tested under mpiexec.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from mpi4py import MPI

PROBE_SLEEP_S = 50e-6  # between the polls of a blocking probe


class World:
    """``size`` virtual ranks; use as a context manager (it frees its communicator)."""

    def __init__(self, size: int):
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            raise RuntimeError("a loopback world needs MPI_THREAD_MULTIPLE (mpi4py's default, "
                               "unless mpi4py.rc.thread_level says otherwise)")
        self.size = size
        self.base = MPI.COMM_SELF.Dup()
        self.max_tag = self.base.Get_attr(MPI.TAG_UB) // (size * size)

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc) -> None:
        self.base.Free()

    def comm(self, rank: int) -> Comm:
        """Rank ``rank``'s view of the world."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside a world of {self.size}")
        return Comm(self, rank)

    def tag(self, tag: int, source: int, dest: int) -> int:
        """The real tag of a message with ``tag`` from ``source`` to ``dest``."""
        if not 0 <= tag <= self.max_tag:
            raise ValueError(f"tag {tag} does not fit a loopback world of {self.size} ranks "
                             f"(at most {self.max_tag})")
        return (tag * self.size + source) * self.size + dest


class Comm:
    """One virtual rank's communicator: ranks and tags as ``Transport`` uses them."""

    def __init__(self, world: World, rank: int):
        self.world, self.rank = world, rank

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.world.size

    def Isend(self, buf, dest: int, tag: int) -> MPI.Request:
        return self.world.base.Isend(buf, 0, self.world.tag(tag, self.rank, dest))

    def Irecv(self, buf, source: int, tag: int) -> MPI.Request:
        return self.world.base.Irecv(buf, 0, self.world.tag(tag, source, self.rank))

    def Recv(self, buf, source: int, tag: int) -> None:
        self.world.base.Recv(buf, 0, self.world.tag(tag, source, self.rank))

    def Iprobe(self, source: int, tag: int, status: MPI.Status | None = None) -> bool:
        """Whether a message waits; ``status`` gets its virtual source."""
        sources = range(self.world.size) if source == MPI.ANY_SOURCE else [source]
        for s in sources:
            if self.world.base.Iprobe(0, self.world.tag(tag, s, self.rank), status):
                if status is not None:
                    status.Set_source(s)
                return True
        return False

    def Probe(self, source: int, tag: int, status: MPI.Status | None = None) -> None:
        """Block until a message waits, polling: MPI cannot probe for several real tags at
        once, and a probe from any source needs one per rank."""
        while not self.Iprobe(source, tag, status):
            time.sleep(PROBE_SLEEP_S)


def run(*ranks: Callable[[], object], timeout: float = 60.0) -> list:
    """Call each function in a thread of its own, as ranks 0, 1, ...; their results in
    rank order. The first error of any rank is raised here at once (the others, likely
    waiting for a message that will never come, are left behind as daemon threads); a
    TimeoutError when some rank has not finished after ``timeout`` seconds."""
    outcomes: queue.Queue = queue.Queue()

    def call(rank: int, fn: Callable[[], object]) -> None:
        try:
            outcomes.put((rank, fn(), None))
        except BaseException as exc:  # handed to the caller's thread
            outcomes.put((rank, None, exc))

    for rank, fn in enumerate(ranks):
        threading.Thread(target=call, args=(rank, fn), name=f"loopback rank {rank}",
                         daemon=True).start()
    results, deadline = [None] * len(ranks), time.monotonic() + timeout
    for _ in ranks:
        try:
            rank, result, error = outcomes.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"loopback ranks still running after {timeout} s") from None
        if error is not None:
            raise error  # its traceback runs through the failing rank's code
        results[rank] = result
    return results
