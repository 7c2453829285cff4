"""The order in which the server serves clients' requests (``server.schedule``)."""
from __future__ import annotations

from mpi4py import MPI


class Schedule:
    """Picks the next client to serve among ``active`` for requests on ``tag``."""

    def __init__(self, world: MPI.Comm):
        self.world = world

    def next(self, active: list[int], tag: int) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint must keep so a resumed run serves in the same order."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Sequential(Schedule):
    """Vanilla split learning: the lowest-ranked client runs its whole phase first."""

    def next(self, active: list[int], tag: int) -> int:
        return active[0]


class RoundRobin(Schedule):
    """One request per client in turn, waiting for each in rank order."""

    def __init__(self, world: MPI.Comm):
        super().__init__(world)
        self.last = 0

    def next(self, active: list[int], tag: int) -> int:
        later = [k for k in active if k > self.last]
        self.last = later[0] if later else active[0]
        return self.last

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = int(state["last"])


class Fifo(Schedule):
    """The spatio-temporal paper's queue: whoever's request arrived first is served first."""

    def next(self, active: list[int], tag: int) -> int:
        status = MPI.Status()
        self.world.Probe(MPI.ANY_SOURCE, tag, status)
        return status.Get_source()


POLICIES = {"sequential": Sequential, "round_robin": RoundRobin, "fifo": Fifo}


def make(name: str, world: MPI.Comm) -> Schedule:
    return POLICIES[name](world)
