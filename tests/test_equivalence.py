"""The central correctness property: a split run trains exactly the network one process would.

A real run (3 clients and the server under mpiexec, train.device=cpu) is replayed here in one
process: each rank's parts from ``models.for_run``, its loaders from ``data.client_loaders``,
its seeds, the clients' batches in the order round_robin serves them, one forward and one
backward through the whole network extractor | cloud | classifier per batch, the server's
optimizer stepping once per request and the client's after its own step, the end-of-epoch
share, then evaluation. Every tensor of every rank's checkpoint after every epoch, and every
client's metrics in the results file, must equal the replay's bit for bit: splitting the
network across processes may change where each step runs, never what it computes.

The replay is the executable specification of the protocol, so it is written from the
protocol, not from ``client.py``/``server.py``; it calls the project only for what defines
the run (parts, loaders, optimizer, what is shared, BatchNorm recalibration).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import mpirun
from splitmpi import config, data, models, population, reader, sharing

CLIENTS = 3  # uneven shards (4/3/3 classes: 2, 1 and 1 batches), and an MPI sum of 3 terms
# One thread on both sides: the thread count changes CPU results (1 against 2 threads, two
# epochs: the cnn5 cloud's weights differed by up to 7e-9, ResNet-50's BatchNorm statistics
# by up to 0.4).
SETTINGS = ("data.train_size=100", "data.test_size=60", "data.image_size=8",
            "train.batch_size=30", "train.epochs=2", "train.checkpoint_every=1",
            "train.device=cpu", "train.threads=1")
MODELS = {"cnn5": ("model.arch=cnn5", "model.cut=2"),
          "resnet18": ("model.arch=resnet18", "model.cut=layer1")}  # BatchNorm on both sides
# Each BatchNorm mode of sharing once, whatever the default: the default as it comes, the
# other two set explicitly.
DEFAULT_BN = config.SplitConfig().share_bn
OTHER_BN = [mode for mode in ("average", "local", "recalibrate") if mode != DEFAULT_BN]
CASES = [  # model, topology, share, split.share_bn (None: the default); ResNet-18 has every
    # topology x sharing pair, cnn5 (no BatchNorm) one of each
    ("cnn5", "u_shape", True, None),
    ("cnn5", "label_sharing", False, None),
    ("resnet18", "u_shape", False, None),
    ("resnet18", "label_sharing", False, None),
    ("resnet18", "u_shape", True, None),
    ("resnet18", "label_sharing", True, OTHER_BN[0]),
    ("resnet18", "u_shape", True, OTHER_BN[1]),
]
SERIES = ("train_loss", "train_accuracy", "train_samples", "test_loss", "test_accuracy",
          "test_samples", "batches_served", "share_buffer_bytes")


# --- the replay ----------------------------------------------------------------------------

@dataclass
class Rank:
    """Each rank is a process of its own, with its own global RNG (dropout and noise would
    draw from it; the loaders draw from their own seeds)."""
    rank: int
    rng: torch.Tensor


@dataclass
class Client(Rank):
    extractor: nn.Module
    classifier: nn.Module | None  # u_shape only
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    test_loader: DataLoader


@dataclass
class Server(Rank):
    cloud: nn.Module
    head: nn.Module | None  # label_sharing only: the output layer on the server
    optimizer: torch.optim.Optimizer
    last: int  # the client round_robin served last


@contextlib.contextmanager
def running_as(rank: Rank):
    """Draw random numbers from ``rank``'s RNG, as its own process would."""
    torch.set_rng_state(rank.rng)
    try:
        yield
    finally:
        rank.rng = torch.get_rng_state()


def make_client(cfg: config.Config, k: int) -> Client:
    """Client ``k`` as its rank starts: loaders, parts, one SGD, then its seed."""
    train_loader, test_loader, _ = data.client_loaders(cfg, k, CLIENTS)
    parts = models.for_run(cfg)
    classifier = parts.classifier if cfg.split.topology == "u_shape" else None
    optimizer = models.sgd([parts.extractor, classifier], cfg.train)
    torch.manual_seed(cfg.train.seed * 1000 + k)
    return Client(k, torch.get_rng_state(), parts.extractor, classifier, optimizer,
                  train_loader, test_loader)


def make_server(cfg: config.Config) -> Server:
    parts = models.for_run(cfg)
    head = parts.classifier if cfg.split.topology == "label_sharing" else None
    optimizer = models.sgd([parts.cloud, head], cfg.train)
    torch.manual_seed(cfg.train.seed * 1000)
    return Server(0, torch.get_rng_state(), parts.cloud, head, optimizer, last=0)


def round_robin(requests: dict[int, int], last: int) -> tuple[list[int], int]:
    """The order in which the server takes one phase's batches, ``requests`` per client.

    Clients take turns in rank order, starting after ``last`` (the turn carries over from
    phase to phase and from epoch to epoch). A client with no batch left uses its turn to
    end its phase and leaves the turn. Returns the client of each batch, and the new last.
    """
    left, active, order = dict(requests), sorted(requests), []
    while active:
        last = next((k for k in active if k > last), active[0])
        if left[last]:
            order.append(last)
            left[last] -= 1
        else:
            active.remove(last)
    return order, last


def drawn(client: Client, loader: DataLoader) -> list:
    """All batches of one pass over ``loader``, drawn as client's process draws them.
    Training draws no random number here (no dropout, no defense), so drawing a phase's
    batches up front changes nothing."""
    with running_as(client):
        return list(loader)


def output_layer(client: Client, server: Server) -> nn.Module:
    return client.classifier if client.classifier is not None else server.head


def networks(server: Server, clients: list[Client]) -> list[nn.Module]:
    return [m for m in [server.cloud, server.head,
                        *(p for c in clients for p in (c.extractor, c.classifier))]
            if m is not None]


def train_step(client: Client, server: Server, x: torch.Tensor, y: torch.Tensor):
    """One split step, as one process: the activation crosses the cut to the cloud, the
    features go on to the output layer (the client's classifier, or the server's head with
    the labels); the one backward carries the gradients back over the cut (features, then
    activation). The server's optimizer steps for this request, the client's for its step.
    Returns the summed loss and the hits of the batch."""
    client.optimizer.zero_grad(set_to_none=True)
    server.optimizer.zero_grad(set_to_none=True)
    logits = output_layer(client, server)(server.cloud(client.extractor(x)))
    loss = nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    server.optimizer.step()
    client.optimizer.step()
    return loss.item() * len(y), int((logits.argmax(1) == y).sum())


def train_phase(server: Server, clients: list[Client]) -> dict[int, dict]:
    """One epoch's training steps in round_robin order; each client's loss and hits summed
    in its own batch order, as the client sums them."""
    for m in networks(server, clients):
        m.train()
    batches = {c.rank: iter(drawn(c, c.train_loader)) for c in clients}
    order, server.last = round_robin({c.rank: len(c.train_loader) for c in clients},
                                     server.last)
    sums = {c.rank: [0.0, 0, 0] for c in clients}  # loss, hits, samples
    for k in order:
        x, y = next(batches[k])
        loss, hits = train_step(clients[k - 1], server, x, y)
        sums[k] = [sums[k][0] + loss, sums[k][1] + hits, sums[k][2] + len(y)]
    return {k: {"train_loss": loss / max(seen, 1), "train_accuracy": hits / max(seen, 1),
                "train_samples": seen, "batches_served": order.count(k)}
            for k, (loss, hits, seen) in sums.items()}


def share(clients: list[Client], cfg: config.Config, epoch: int) -> int:
    """Every client's shared tensors become the mean over the clients; returns the bytes
    reduced per client.

    MPICH's Allreduce (the pip mpich these tests launch) over 3 clients adds in rank order,
    (1 + 2) + 3, at every size measured (5 thousand to 6 million float32), and float
    addition is not associative: another order changes the last bit of about one element in
    five. So the mean here adds in rank order too; under an MPI library that adds in
    another order this test would fail with no bug in splitmpi.
    """
    shared = [sharing.shared_tensors(c.extractor, cfg.split.share_bn) for c in clients]
    flats = [torch.cat([t.reshape(-1) for t in tensors]) for tensors in shared]
    mean = flats[0].clone()
    for flat in flats[1:]:
        mean += flat
    mean /= len(clients)
    with torch.no_grad():
        for tensors in shared:
            for t, part in zip(tensors, mean.split([t.numel() for t in tensors])):
                t.copy_(part.view_as(t))
    if cfg.split.share_bn == "recalibrate":
        for c in clients:
            with running_as(c):
                sample = data.sample_loader(c.train_loader, cfg.train.seed, c.rank, epoch)
                sharing.recalibrate(c.extractor, (x for x, _ in sample),
                                    cfg.split.bn_recalibrate_batches)
    return mean.nbytes


@torch.no_grad()
def evaluate(client: Client, server: Server, batches: list) -> dict:
    loss, hits, seen = 0.0, 0, 0
    for x, y in batches:
        logits = output_layer(client, server)(server.cloud(client.extractor(x)))
        loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        hits += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return {"test_loss": loss / max(seen, 1), "test_accuracy": hits / max(seen, 1),
            "test_samples": seen}


def eval_phase(server: Server, clients: list[Client]) -> dict[int, dict]:
    """Nothing learns while evaluating, so the order of the requests changes no number;
    it still moves round_robin's turn on."""
    for m in networks(server, clients):
        m.eval()
    batches = {c.rank: drawn(c, c.test_loader) for c in clients}
    _, server.last = round_robin({k: len(b) for k, b in batches.items()}, server.last)
    return {c.rank: evaluate(c, server, batches[c.rank]) for c in clients}


def states(server: Server, clients: list[Client]) -> dict[int, dict]:
    """Each rank's checkpoint state, live (``rng``: the CPU generator, the one a CPU run
    uses)."""
    out = {0: {"cloud": server.cloud.state_dict(),
               "head": server.head.state_dict() if server.head is not None else {},
               "optimizer": server.optimizer.state_dict(), "schedule": {"last": server.last},
               "copies": {},  # sfl_v1's per-client clouds; split learning has one
               "rng": {"torch": server.rng}, "position": {}, "audit": {}}}
    for c in clients:
        parts = {"extractor": c.extractor, "classifier": c.classifier}
        momentum = {f"{part}.{name}": c.optimizer.state[p]["momentum_buffer"]
                    for part, m in parts.items() if m is not None
                    for name, p in m.named_parameters()}
        out[c.rank] = {"extractor": c.extractor.state_dict(),
                       "classifier": c.classifier.state_dict() if c.classifier is not None
                       else {},
                       "momentum": momentum, "rng": {"torch": c.rng}, "position": {},
                       "audit": {}}
    return out


def saved_client(folder, rank: int, saved: dict, replayed: dict) -> dict:
    """A client rank's checkpoint (its one client's row of ``population.Bank``) in the
    replay's terms: the parts' state dicts, each parameter's momentum, the random state."""
    bank = saved["bank"]
    assert bank["ids"] == [rank]
    where = {f"{part}.{name}": (offset, n, shape)
             for part, name, floating, offset, n, shape in bank["layout"]}
    momentum = {}
    for name in replayed["momentum"]:
        offset, n, shape = where[name]
        momentum[name] = bank["momentum"][0, offset:offset + n].reshape(shape)
    return {**population.saved_client(folder, rank), "momentum": momentum,
            "rng": bank["rng"][0], "position": saved["position"], "audit": saved["audit"]}


def replay(cfg: config.Config) -> Iterator[tuple[dict[int, dict], dict[int, dict]]]:
    """Train the run in this process; after each epoch, every rank's state (valid until
    the next epoch) and each client's metrics."""
    server = make_server(cfg)
    clients = [make_client(cfg, k) for k in range(1, CLIENTS + 1)]
    for epoch in range(cfg.train.epochs):
        train = train_phase(server, clients)
        shared_bytes = share(clients, cfg, epoch) if cfg.split.share else 0
        test = eval_phase(server, clients)
        yield states(server, clients), {k: {**train[k], **test[k],
                                            "share_buffer_bytes": shared_bytes}
                                        for k in train}


# --- the comparison ------------------------------------------------------------------------

def differences(saved, replayed, where: str) -> list[str]:
    """Every place where a checkpoint's value is not exactly the replay's."""
    if isinstance(replayed, torch.Tensor):
        if torch.equal(saved, replayed):
            return []
        if saved.shape != replayed.shape:
            return [f"{where}: shape {tuple(saved.shape)}, replay {tuple(replayed.shape)}"]
        if not replayed.is_floating_point():
            return [f"{where}: {int((saved != replayed).sum())} of {replayed.numel()} differ"]
        gap = (saved.double() - replayed.double()).abs().max().item()
        return [f"{where}: maxdiff {gap:.3g}"]
    if isinstance(replayed, dict):
        if saved.keys() != replayed.keys():
            return [f"{where}: keys {sorted(saved)}, replay {sorted(replayed)}"]
        return [d for key in replayed for d in differences(saved[key], replayed[key],
                                                           f"{where}.{key}")]
    if isinstance(replayed, (list, tuple)):
        if len(saved) != len(replayed):
            return [f"{where}: {len(saved)} items, replay {len(replayed)}"]
        return [d for i, (s, r) in enumerate(zip(saved, replayed))
                for d in differences(s, r, f"{where}[{i}]")]
    return [] if saved == replayed else [f"{where}: {saved!r}, replay {replayed!r}"]


@pytest.fixture
def one_process():
    """The replay's conditions: one thread, as each rank has; the test's own RNG left alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


def case_id(case: tuple) -> str:
    model, topology, share_on, share_bn = case
    mode = share_bn or f"{DEFAULT_BN}_default"
    return f"{model}-{topology}-" + (f"share-{mode}" if share_on else "no_share")


@pytest.mark.parametrize("model, topology, share_on, share_bn", CASES,
                         ids=[case_id(c) for c in CASES])
def test_split_run_is_the_network_trained_in_one_process(tmp_path, one_process, model,
                                                         topology, share_on, share_bn):
    settings = [*SETTINGS, *MODELS[model], f"split.topology={topology}",
                f"split.share={share_on}", *([f"split.share_bn={share_bn}"] if share_bn else [])]
    mpirun.ok(CLIENTS + 1, *settings, "output=run.h5", cwd=tmp_path)
    run, cfg = reader.read(tmp_path / "run.h5"), config.load(None, settings)
    assert run.finished and run.epochs == cfg.train.epochs
    found = []
    for epoch, (replayed, metrics) in enumerate(replay(cfg), start=1):
        folder = tmp_path / "run.h5.ckpt" / f"epoch-{epoch:05d}"
        for rank, state in replayed.items():
            saved = torch.load(folder / f"rank-{rank}.pt", weights_only=True)["state"]
            if rank != 0:
                saved = saved_client(folder, rank, saved, state)
            saved["rng"] = {"torch": saved["rng"]["torch"]}  # CUDA's, if saved, is unused
            found += differences(saved, state, f"epoch {epoch} rank {rank}")
        for k, values in metrics.items():
            for name in SERIES:
                if run.clients[k][name][epoch - 1] != values[name]:
                    found.append(f"epoch {epoch} client {k} {name}: run "
                                 f"{run.clients[k][name][epoch - 1]!r}, replay {values[name]!r}")
    assert not found, f"{len(found)} differences:\n" + "\n".join(found[:40])
