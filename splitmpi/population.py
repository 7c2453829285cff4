"""Logical clients: ``clients.count`` clients on fewer client ranks.

Client rank r hosts a contiguous block of the clients 1..N (``hosted``). Each client has
its own extractor, classifier, SGD momentum, data shard, random state and metrics, but
the rank builds one working extractor and classifier only: the clients' weights, BatchNorm
statistics and momentum are rows of a few flat tensors (``Bank``), and the working modules'
tensors are views into the row of the client that trains (``Bank.activate``), so switching
clients copies nothing and a client that is not training costs its rows, not another
copy of the runtime. With one client per rank the bank has one row and never switches:
a run is what it was before logical clients existed.

Which clients take part in an epoch (``clients.per_epoch``, ``participants``), when
every client is evaluated (``clients.eval_every``, ``evaluates``) and each client's
simulated network delay (``clients.delay_ms``, ``delays``) are functions of the config and
the epoch, the same on every rank, so nothing about them crosses MPI.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import checkpoint
from .config import ClientsConfig, Config, parse_delay
from .errors import ConfigError

PARTICIPATION_STREAM, DELAY_STREAM = 101, 102  # seed streams, apart from data.py's


def count(cfg: Config, ranks: int) -> int:
    """N, the logical clients of a run on ``ranks`` client ranks."""
    return cfg.clients.count or ranks


def hosted(rank: int, ranks: int, clients: int) -> range:
    """The logical clients client rank ``rank`` (1..ranks) hosts: contiguous blocks, the
    first ``clients % ranks`` ranks one client more."""
    size, extra = divmod(clients, ranks)
    first = (rank - 1) * size + min(rank - 1, extra)
    return range(first + 1, first + 1 + size + (rank <= extra))


def per_epoch(cfg: ClientsConfig, clients: int) -> int:
    """How many clients take part in each epoch: ``per_epoch`` as a count (an int) or a
    fraction of ``clients`` (a float in (0, 1], rounded, at least one)."""
    wanted = cfg.per_epoch
    if isinstance(wanted, float):
        return max(1, min(clients, round(wanted * clients)))
    return wanted


def participants(cfg: Config, clients: int, epoch: int) -> list[int]:
    """The sorted ids of the clients that train (and share) in ``epoch``: all, or a draw
    without replacement from (train.seed, epoch)."""
    m = per_epoch(cfg.clients, clients)
    if m >= clients:
        return list(range(1, clients + 1))
    rng = np.random.default_rng([cfg.train.seed, PARTICIPATION_STREAM, epoch])
    return (np.sort(rng.choice(clients, size=m, replace=False)) + 1).tolist()


def evaluates(cfg: Config, epoch: int) -> bool:
    """Whether every client is evaluated after ``epoch`` (0-based): each
    ``clients.eval_every`` epochs, and always after the last."""
    every = cfg.clients.eval_every
    return epoch + 1 == cfg.train.epochs or (every > 0 and (epoch + 1) % every == 0)


def delays(cfg: Config, clients: int) -> np.ndarray:
    """Each client's simulated network delay in seconds (index k-1 for client k): the list
    given, or one draw per client from the distribution, seeded by train.seed."""
    given = cfg.clients.delay_ms
    if isinstance(given, str):
        name, a, b = parse_delay(given)
        rng = np.random.default_rng([cfg.train.seed, DELAY_STREAM])
        ms = rng.uniform(a, b, clients) if name == "uniform" else rng.lognormal(a, b, clients)
    else:
        ms = np.asarray(given or [0.0] * clients, dtype=np.float64)
    return ms / 1000


class _Place(NamedTuple):
    """Where one tensor of a part's state dict lives in a bank row."""

    part: str  # extractor or classifier
    name: str  # its state dict key
    owner: nn.Module  # the submodule that holds it
    key: str  # its name there
    is_param: bool
    floating: bool  # in ``values`` (else ``ints``)
    offset: int
    numel: int
    shape: tuple


class Bank:
    """The state of the clients a rank hosts, as rows of flat tensors: ``values`` (every
    floating-point tensor of the parts' state dicts: parameters and BatchNorm statistics),
    ``ints`` (integer buffers: BatchNorm's step counts), ``momentum`` (SGD momentum of the
    parameters, when SGD has momentum) and each client's torch random state.

    Every row starts as the working modules are built (the common starting network).
    ``activate(k)`` points the working modules' tensors, and
    the SGD momentum buffers, at client k's row and swaps the random state, so training
    the working modules trains client k. Momentum buffers exist from the start (zeros):
    SGD's first step then gives the gradient, exactly what it gives when it makes one."""

    def __init__(self, parts: dict[str, nn.Module | None],
                 optimizer: torch.optim.Optimizer | None, ids: range, seed: int):
        self.ids, self.seed = ids, seed
        self.row = {k: i for i, k in enumerate(ids)}
        self.optimizer = optimizer
        self.places: list[_Place] = []
        floats = ints = 0
        for part, module in parts.items():
            if module is None:
                continue
            for name, t in module.state_dict(keep_vars=True).items():
                owner_name, _, key = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                is_param = key in owner._parameters
                floating = t.is_floating_point()
                offset = floats if floating else ints
                self.places.append(_Place(part, name, owner, key, is_param, floating, offset,
                                          t.numel(), tuple(t.shape)))
                if floating:
                    floats += t.numel()
                else:
                    ints += t.numel()
        some = next((t for m in parts.values() if m is not None for t in m.state_dict().values()),
                    None)
        device = some.device if some is not None else torch.device("cpu")
        rows = len(ids)
        self.values = torch.empty(rows, floats, device=device)
        self.ints = torch.empty(rows, ints, dtype=torch.int64, device=device)
        momentum = optimizer is not None and optimizer.defaults.get("momentum", 0) != 0
        self.momentum = torch.zeros(rows, floats, device=device) if momentum else None
        with torch.no_grad():
            for pl in self.places:
                t = pl.owner._parameters[pl.key] if pl.is_param else pl.owner._buffers[pl.key]
                bank = self.values if pl.floating else self.ints
                bank[:, pl.offset:pl.offset + pl.numel] = t.detach().reshape(1, -1)
        self.rng: list[dict | None] = [None] * rows
        self.active: int | None = None

    def activate(self, k: int) -> None:
        """Make the working modules client k's: their tensors (and the momentum buffers)
        become views into k's row, and k's random state is loaded (the previous client's
        is kept). The first activation of a client seeds its random state from
        (train.seed, k), as a rank seeded its one client."""
        if k == self.active:
            return
        if self.active is not None:
            self.rng[self.row[self.active]] = checkpoint.rng_state()
        i = self.row[k]
        for pl in self.places:
            span = slice(pl.offset, pl.offset + pl.numel)
            view = (self.values if pl.floating else self.ints)[i, span].view(pl.shape)
            if pl.is_param:
                p = pl.owner._parameters[pl.key]
                p.data = view
                if self.momentum is not None:
                    self.optimizer.state[p]["momentum_buffer"] = \
                        self.momentum[i, span].view(pl.shape)
            else:
                pl.owner._buffers[pl.key] = view
        if self.rng[i] is None:
            if torch.cuda.is_available():  # its CUDA generators too, as a rank seeded
                torch.manual_seed(self.seed * 1000 + k)
            else:  # the same, without torch's lazy calls for absent devices (0.7 ms)
                torch.default_generator.manual_seed(self.seed * 1000 + k)
        else:
            checkpoint.set_rng_state(self.rng[i])
        self.active = k

    def spans(self, tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
        """The column ranges ``(start, stop)`` of ``values`` (and ``momentum``) that
        ``tensors``, views into the active row, occupy: in their order, neighbours merged.
        The same for every row, and on every rank of a run."""
        base = self.values[self.row[self.active]]
        size = base.element_size()
        spans: list[tuple[int, int]] = []
        for t in tensors:
            start = (t.data_ptr() - base.data_ptr()) // size
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], start + t.numel())
            else:
                spans.append((start, start + t.numel()))
        return spans

    def state_dict(self) -> dict:
        """For a checkpoint: the rows and the random states (the active client's taken now)."""
        if self.active is not None:
            self.rng[self.row[self.active]] = checkpoint.rng_state()
        return {"ids": list(self.ids), "values": self.values, "ints": self.ints,
                "momentum": self.momentum if self.momentum is not None else torch.zeros(0),
                "rng": [r or {} for r in self.rng],
                "layout": [(pl.part, pl.name, pl.floating, pl.offset, pl.numel, list(pl.shape))
                           for pl in self.places]}

    def load_state_dict(self, saved: dict) -> None:
        with torch.no_grad():
            self.values.copy_(saved["values"])
            self.ints.copy_(saved["ints"])
            if self.momentum is not None:
                self.momentum.copy_(saved["momentum"])
        self.rng = [r or None for r in saved["rng"]]
        active, self.active = self.active, None
        if active is not None:
            self.activate(active)


def saved_client(folder: Path, k: int) -> dict[str, dict]:
    """Client k's extractor and classifier state dicts (``{}`` for a classifier it does
    not have) from the checkpoint set ``folder``: the rank that hosted it is found from
    the run's identity (its world size and clients.count). Sets written before logical
    clients hold a rank's one client's state dicts themselves."""
    identity = torch.load(folder / "rank-0.pt", map_location="cpu",
                          weights_only=True).get("identity")
    rank = k  # a set without an identity: one client per rank
    if identity:
        ranks = int(identity["world_size"]) - 1
        clients = int(identity.get("clients", {}).get("count") or ranks)
        if not 1 <= k <= clients:
            raise ConfigError(f"client {k} is not a client of the run of {folder} "
                              f"(clients 1..{clients})", f"pick a client in 1..{clients}")
        rank = next(r for r in range(1, ranks + 1) if k in hosted(r, ranks, clients))
    state = torch.load(folder / f"rank-{rank}.pt", map_location="cpu",
                       weights_only=True)["state"]
    if "bank" not in state:
        return {"extractor": state["extractor"], "classifier": state.get("classifier") or {}}
    bank = state["bank"]
    i = bank["ids"].index(k)
    parts = {"extractor": {}, "classifier": {}}
    for part, name, floating, offset, n, shape in bank["layout"]:
        rows = bank["values"] if floating else bank["ints"]
        parts[part][name] = rows[i, offset:offset + n].reshape(shape).clone()
    return parts
