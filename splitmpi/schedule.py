"""The order in which the server serves clients' requests (``server.schedule``)."""
from __future__ import annotations

import torch

from .transport import Kind, Transport


class Schedule:
    """Picks the next client to serve among ``active`` for requests of ``kind``."""

    def __init__(self, transport: Transport):
        self.transport = transport

    def next(self, active: list[int], kind: Kind) -> int:
        raise NotImplementedError

    def more(self, active: list[int], kind: Kind) -> int | None:
        """The next client to join a gathered batch (``split.mode=parallel``), None when no
        more should: by default the next in order, waited for."""
        return self.next(active, kind) if active else None

    def begin(self, epoch: int) -> None:
        """An epoch starts (0-based)."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep so a resumed run serves in the same order."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Sequential(Schedule):
    """Vanilla split learning: the lowest-ranked client runs its whole phase first."""

    def next(self, active: list[int], kind: Kind) -> int:
        return active[0]


class Shuffled(Schedule):
    """SplitFed v2: one client after another, in an order drawn from (seed, epoch) for each
    epoch, so a resumed epoch repeats it and nothing needs saving."""

    def __init__(self, transport: Transport, seed: int):
        super().__init__(transport)
        self.seed, self.order = seed, []

    def begin(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        self.order = (torch.randperm(self.transport.comm.Get_size() - 1, generator=g) + 1).tolist()

    def next(self, active: list[int], kind: Kind) -> int:
        return next(k for k in self.order if k in active)


class RoundRobin(Schedule):
    """One request per client in turn, waiting for each in rank order."""

    def __init__(self, transport: Transport):
        super().__init__(transport)
        self.last = 0

    def next(self, active: list[int], kind: Kind) -> int:
        later = [k for k in active if k > self.last]
        self.last = later[0] if later else active[0]
        return self.last

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = int(state["last"])


class Fifo(Schedule):
    """The spatio-temporal paper's queue: whoever's request arrived first is served first."""

    def next(self, active: list[int], kind: Kind) -> int:
        return self.transport.probe_any(kind)

    def more(self, active: list[int], kind: Kind) -> int | None:
        """Only a request that has already arrived joins: fifo never waits for one."""
        return self.transport.waiting(kind)


POLICIES = {"sequential": Sequential, "round_robin": RoundRobin, "fifo": Fifo}


def make(name: str, transport: Transport, mode: str = "sl", seed: int = 0) -> Schedule:
    """``server.schedule``'s policy; SplitFed v2 (``split.mode``) draws its own order."""
    return Shuffled(transport, seed) if mode == "sfl_v2" else POLICIES[name](transport)
