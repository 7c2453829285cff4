"""Client ranks 1..R: each hosts one or more logical clients (``population.py``), each
with its data shard, extractor, classifier (u_shape) and SGD momentum, trained through
one set of working parts.

One epoch, as the server sees it (``server.py`` is the other half of each step):
  train phase  - the epoch's participants among the rank's clients take turns (``Order``,
                 by the server's schedule); per batch of the client whose turn it is:
                 send activation (the header names the client) -> (u_shape) get
                 features, classifier, loss, send feature grad -> get activation grad,
                 extractor backward, step. When none has a batch left, an empty
                 activation ends the rank's phase. Then the server's verdict: go on, or
                 stop here (a signal came).
  share        - the participants' extractors averaged over all client ranks
                 (``split.share``): a sum on each rank, one Allreduce; under
                 split.share_bn=recalibrate each participant then re-estimates the
                 extractor's BatchNorm statistics on its own training data.
  label rows   - attack.labels only: the server sends back the feature-gradient rows it
                 received, and the client scores label inference on them (its labels
                 never leave; ``label_inference``).
  eval phase   - every clients.eval_every epochs and after the last, every hosted client
                 in turn, per test batch: send activation -> get features/logits (the
                 next batch's forward runs meanwhile); then an empty activation. Then
                 this epoch's report to rank 0: each hosted client's metrics (NaN where
                 it did not train or was not evaluated) and the rank's counters.

Stopping mid-epoch (SIGUSR1/SIGTERM): a client with a signal sends, at its next step
boundary, an empty activation flagged STOP instead of its next batch. A server that is
stopping (its own signal, or such a flag) answers each client's next request with an empty
reply flagged STOP and does not serve it; the client then undoes that request's forward
(BatchNorm statistics, random state) as if it never ran. Either way the client ends its
phase at a step boundary, the verdict says stop, and every rank writes a checkpoint with
its place in the epoch (``Client.position``: each participant's place and the turn), from
which a resumed run goes on exactly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import checkpoint, data, leakage, models, population, sharing
from .audit import ClientAudit
from .config import SPLITFED
from .defense import Defense
from .runtime import SERVER, Context, clock_offsets
from .transport import Flag, Kind

log = logging.getLogger(__name__)

# A client's test metrics in an epoch without evaluation (clients.eval_every)
NOT_TESTED = {"test_loss": float("nan"), "test_accuracy": float("nan"), "test_samples": 0}


@dataclass
class Client:
    """A client rank: the working parts, and the logical clients it hosts (one, unless
    clients.count exceeds the client ranks): their state (``bank``) and data (``shards``)."""

    extractor: nn.Module  # the working parts: views into the active client's row of ``bank``
    classifier: nn.Module | None  # None in label_sharing: the server holds the output layer
    defense: Defense  # what is done to activations before they are sent
    optimizer: torch.optim.Optimizer | None  # None when nothing on the clients learns
    bank: population.Bank
    shards: data.Shards
    clients: int  # N, the logical clients of the run (this rank hosts ``bank.ids``)
    delays: np.ndarray  # simulated network delay of client k at k-1, in seconds
    audit: ClientAudit | None  # audit=true: digests of this client's raw inputs and labels
    position: dict | None = None  # a mid-epoch checkpoint's place in its epoch, until resumed

    @property
    def ids(self) -> range:
        return self.bank.ids


class Step(NamedTuple):
    """A training step between sending the activation and receiving its gradient."""
    y: torch.Tensor  # labels, on the device
    sent: torch.Tensor  # what crossed the cut (the graph back to the extractor hangs on it)
    penalty: torch.Tensor | None  # NoPeek loss term


@dataclass
class Running:
    """A logical client in its train phase: its batches, its place and when its next
    request may leave (its delay after its last step)."""

    k: int
    batches: object  # the iterator over its loader
    left: int  # batches still to train
    place: dict  # batches, loss, correct, seen, seconds so far in this epoch
    ready: float  # time.perf_counter() before which its next request does not leave
    pending: tuple | None = None  # its next batch, loaded while the server worked


def prepare(ctx: Context) -> Client:
    """Everything that can fail on bad input, before any message is exchanged."""
    cfg = ctx.cfg
    data.check_available(cfg.data)
    clients = population.count(cfg, ctx.client_count)
    ids = population.hosted(ctx.rank, ctx.client_count, clients)
    shards = data.Shards(cfg, ids, clients)
    parts = models.for_run(cfg)
    extractor = parts.extractor.to(ctx.device)
    classifier = parts.classifier.to(ctx.device) if cfg.split.topology == "u_shape" else None
    optimizer = models.sgd([extractor, classifier], cfg.train)
    bank = population.Bank({"extractor": extractor, "classifier": classifier}, optimizer,
                           ids, cfg.train.seed)
    bank.activate(ids[0])  # seeds the random state as (train.seed, client)
    audit = ClientAudit(ctx.transport) if cfg.audit else None
    defense = Defense(cfg.defense, cfg.train.epochs)
    if cfg.defense.label_epsilon > 0:
        _log_label_noise(ctx, shards, ids)
    return Client(extractor, classifier, defense, optimizer, bank, shards, clients,
                  population.delays(cfg, clients), audit)


def _log_label_noise(ctx: Context, shards: data.Shards, ids: range) -> None:
    """defense.label_epsilon: once per rank, how many of its clients' training labels
    randomized response changed (one line per client when it hosts one)."""
    changed = total = 0
    for k in ids:
        trained, true = shards.trained_labels(k)
        changed, total = changed + int((trained != true).sum()), total + len(true)
    who = f"client {ids[0]}" if len(ids) == 1 else f"clients {ids[0]}-{ids[-1]} (rank {ctx.rank})"
    log.info(f"{who}: randomized response (defense.label_epsilon="
             f"{ctx.cfg.defense.label_epsilon:g}) changed {changed} of {total} training labels")


def state(client: Client) -> dict:
    return {"bank": client.bank.state_dict(), "position": client.position or {},
            "audit": client.audit.state_dict() if client.audit and client.position else {}}


def restore(client: Client, saved: dict) -> None:
    if "bank" in saved:
        client.bank.load_state_dict(saved["bank"])
        client.position = saved.get("position") or None
    else:
        _restore_one(client, saved)
    if client.audit and saved.get("audit"):
        client.audit.load_state_dict(saved["audit"])


def _restore_one(client: Client, saved: dict) -> None:
    """A checkpoint written before logical clients: one client per rank, its parts,
    optimizer and random state as plain state dicts. They load into the bank's one row
    (the working parts and momentum buffers are views into it)."""
    models.load_part(client.extractor, saved["extractor"])
    if client.classifier is not None:
        models.load_part(client.classifier, saved["classifier"])
    if client.optimizer is not None and saved["optimizer"]:
        params = [p for g in client.optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            for i, p in enumerate(params):
                buf = saved["optimizer"]["state"].get(i, {}).get("momentum_buffer")
                if buf is not None:
                    client.optimizer.state[p]["momentum_buffer"].copy_(buf)
    checkpoint.set_rng_state(saved["rng"])
    place = saved.get("position") or None
    client.position = {"clients": {client.ids[0]: place}, "last": 0} if place else None


def run(ctx: Context, client: Client, start: int = 0) -> bool:
    """Epochs ``start``.. to the end; True when a signal stopped the run after a checkpoint."""
    cfg = ctx.cfg
    ctx.world.gather({k: client.shards.samples(k) for k in client.ids}, root=SERVER)
    clock_offsets(ctx.world)
    for epoch in range(start, cfg.train.epochs):
        drawn = population.participants(cfg, client.clients, epoch)
        members = [k for k in drawn if k in client.ids]
        train = train_epoch(ctx, client, epoch, members)
        if ctx.transport.recv(SERVER, Kind.VERDICT).item():
            client.position = train["position"]
            checkpoint.save_within(ctx.world, cfg, epoch, state(client))
            who = f"client {ctx.rank}" if client.clients == ctx.client_count else \
                f"client rank {ctx.rank}"
            log.info(f"{who} stopped within epoch {epoch + 1} after "
                     f"{sum(p['batches'] for p in train['position']['clients'].values())} "
                     f"batches ({ctx.stop.after()})")
            return True
        reports = train["clients"]
        inferred = label_inference(ctx, train["labels_sent"], epoch) if cfg.attack.labels \
            else None
        shared_bytes = share(ctx, client, epoch, members, len(drawn)) if cfg.split.share else 0
        tested = evaluate(ctx, client) if population.evaluates(cfg, epoch) else {}
        taking = set(members)
        for k in client.ids:
            reports[k].update(tested.get(k, NOT_TESTED))
            reports[k]["share_buffer_bytes"] = shared_bytes if k in taking else 0
            reports[k]["classes"] = client.shards.classes[k]
        if inferred is not None:
            reports[client.ids[0]]["labels"] = inferred
        report = {"epoch": epoch, "clients": reports, "stop_requested": bool(ctx.stop.signal),
                  **ctx.transport.counters()}
        ctx.world.send(report, dest=SERVER, tag=Kind.REPORT)
        if client.audit:
            received = ctx.world.recv(source=SERVER, tag=Kind.AUDIT)
            ctx.world.send(client.audit.check(received), dest=SERVER, tag=Kind.AUDIT)
        if checkpoint.boundary(ctx.world, cfg, epoch + 1, lambda: state(client)):
            return True
    return False


def share(ctx: Context, client: Client, epoch: int, members: list[int],
          participants: int) -> int:
    """Average the extractors of this epoch's ``participants`` (``members`` of them here)
    over all client ranks
    (``split.share_bn`` says what happens to BatchNorm, ``split.share_optimizer`` to the
    momentum, ``split.share_weights`` how the clients weigh: by the size of their training
    shard under ``samples``), and under SplitFed (``split.mode``) the u_shape classifiers
    too: FedAvg of every client-side model; returns the bytes reduced."""
    split = ctx.cfg.split
    weights = ([client.shards.samples(k) for k in members]
               if split.share_weights == "samples" else None)
    reduced = sharing.average(client.bank, client.extractor, members, ctx.clients_comm,
                              participants, split.share_bn, split.share_optimizer, weights)
    if split.mode in SPLITFED and client.classifier is not None:
        reduced += sharing.average(client.bank, client.classifier, members, ctx.clients_comm,
                                   participants, "average", split.share_optimizer, weights)
    if split.share_bn == "recalibrate":
        for k in members:
            client.bank.activate(k)
            loader = client.shards.loaders(k)[0]
            sample = data.sample_loader(loader, ctx.cfg.train.seed, k, epoch)
            with ctx.autocast():
                inputs = (x.to(ctx.device, non_blocking=True) for x, *_ in sample)
                sharing.recalibrate(client.extractor, inputs, split.bn_recalibrate_batches)
    return reduced


def _end_phase(ctx: Context, kind: Kind, like: torch.Tensor | None) -> None:
    """An activation with no samples tells the server this rank's phase is over."""
    shape = (0,) + (tuple(like.shape[1:]) if like is not None else ())
    ctx.transport.speaks_for = 0
    ctx.transport.send(torch.empty(shape), SERVER, kind)


class Order:
    """Which of a rank's clients sends its next request, by the server's schedule: the
    rank's clients in id order (``sequential``: each runs its whole phase; under sfl_v2 an
    order drawn per epoch), one request each in turn (``round_robin``), or whoever's delay
    is over first (``fifo``). With one client per rank there is nothing to choose."""

    def __init__(self, ctx: Context, ids: list[int], epoch: int, last: int = 0):
        self.policy = ctx.cfg.server.schedule
        if ctx.cfg.split.mode == "sfl_v2":
            g = torch.Generator().manual_seed(ctx.cfg.train.seed * 7919 + epoch)
            ids = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
        self.ids, self.last = ids, last
        self.place = {k: i for i, k in enumerate(ids)}

    def next(self, running: dict[int, Running]) -> Running:
        """The client (among ``running``, those with batches left) that goes next."""
        if self.policy == "fifo" and len(running) > 1:  # the earliest ready, ties in order
            k = min(running, key=lambda j: (running[j].ready, self.place[j]))
        else:  # the first with batches left from the last one's place on (round_robin:
            # after it), round the order; sequential serves in order, so none before the
            # last one has batches left. Clients only ever leave ``running``.
            first = (self.place.get(self.last, 0) if self.policy == "sequential"
                     else self.place.get(self.last, -1) + 1)
            n = len(self.ids)
            k = next(self.ids[(first + i) % n] for i in range(n)
                     if self.ids[(first + i) % n] in running)
        self.last = k
        return running[k]

    def keeps(self, running: dict[int, Running], r: Running) -> bool:
        """Whether ``r`` surely goes next too (so its next batch may load meanwhile)."""
        return r.left > 1 and (self.policy == "sequential" or len(running) == 1)


def _wait_until(ready: float) -> None:
    """clients.delay_ms: a far-away or slow end-system, simulated before each request."""
    left = ready - time.perf_counter()
    if left > 0:
        time.sleep(left)


def train_epoch(ctx: Context, client: Client, epoch: int, members: list[int]) -> dict:
    """One pass of each of this epoch's participants (``members``) over its shard, from a
    mid-epoch checkpoint's place if there is one, the clients taking turns as ``Order``
    says. While the server works on a request, the client's next batch loads when it
    surely goes next (prefetch only: every step still uses the weights of the step
    before). ``position`` in the result is the place reached, for a checkpoint should the
    server's verdict be to stop; ``labels_sent`` the labels of the first
    ``attack.label_rows`` samples trained on in this process (attack.labels, one client
    per rank), in the order the server recorded their rows, and always the true labels
    (under defense.label_epsilon the client trains on the randomized-response labels, and
    the attacker wants the true ones); ``clients`` each hosted client's train metrics (NaN
    for those not taking part), their loss and accuracy against the labels trained on."""
    client.extractor.train()
    client.defense.train()
    if client.classifier is not None:
        client.classifier.train()
    resumed = client.position or {"clients": {}, "counters": {}, "last": 0}
    client.position = None
    ctx.transport.carry(resumed["counters"])
    at_start = ctx.transport.since(resumed["counters"])  # this epoch's start, as if unbroken
    began = time.perf_counter()
    running, places = {}, {}
    for k in members:
        place = resumed["clients"].get(k) or {"batches": 0, "loss": 0.0, "correct": 0,
                                              "seen": 0, "seconds": 0.0}
        places[k] = place
        loader = client.shards.loaders(k)[0]
        loader.sampler.set_epoch(epoch, start=place["batches"] * loader.batch_size)
        batches = len(loader)  # before iter(): loader workers start the sampler at once
        if batches:
            running[k] = Running(k, iter(loader), batches, place,
                                 began + client.delays[k - 1])
    order = Order(ctx, list(client.ids), epoch, resumed["last"])
    like, turned_down = None, False
    labels_sent, room = [], ctx.cfg.attack.label_rows if ctx.cfg.attack.labels else 0
    while running and not ctx.stop.signal:  # a signal: stop at this boundary
        turn = order.last
        r = order.next(running)
        client.bank.activate(r.k)
        ctx.transport.speaks_for = r.k
        x, y, *truth = r.pending or next(r.batches)
        r.pending = None
        undo = _undo_point(ctx, client)
        started = time.perf_counter()
        step, sends = _send_activation(ctx, client, x, y, r.ready)
        if order.keeps(running, r):
            r.pending = next(r.batches)  # overlaps the server's forward
        result = _finish_step(ctx, client, step, sends)
        if result is None:  # the server is stopping: this step did not happen
            undo()
            order.last = turn  # nor did this turn
            turned_down = True
            break
        if client.audit:
            client.audit.see(x, y)
        if room > 0:
            labels_sent.append((truth[0] if truth else y)[:room].cpu())
            room -= len(labels_sent[-1])
        ctx.stop.steps += 1
        batch_loss, batch_correct = result
        ended = time.perf_counter()
        p = r.place
        p["batches"] += 1
        p["loss"] += batch_loss
        p["correct"] += batch_correct
        p["seen"] += len(y)
        p["seconds"] += ended - started
        r.left -= 1
        r.ready = ended + client.delays[r.k - 1]
        like = step.sent
        if r.left == 0:
            del running[r.k]
    if not turned_down:  # the end of the phase, flagged STOP if a signal ended it early
        ctx.transport.stopping = bool(running)
        _end_phase(ctx, Kind.ACTIVATION, like)
        ctx.transport.stopping = False
    position = {"clients": places, "last": order.last,
                "counters": ctx.transport.since(at_start)}
    nan = float("nan")
    reports = {}
    for k in client.ids:
        p = places.get(k)
        if p is None:
            reports[k] = {"participated": 0.0, "train_loss": nan, "train_accuracy": nan,
                          "train_samples": 0, "train_seconds": 0.0, "samples_per_s": nan}
            continue
        seen, seconds = p["seen"], p["seconds"]
        reports[k] = {"participated": 1.0, "train_loss": p["loss"] / max(seen, 1),
                      "train_accuracy": p["correct"] / max(seen, 1), "train_samples": seen,
                      "train_seconds": seconds,
                      "samples_per_s": seen / seconds if seconds > 0 else 0.0}
    return {"clients": reports, "position": position, "labels_sent": labels_sent}


def label_inference(ctx: Context, sent: list[torch.Tensor], epoch: int) -> dict:
    """attack.labels: the feature-gradient rows the server received from this client in
    the training phase come back, and the client scores what they tell of the true labels
    of the samples it trained them with (``leakage.score``; under defense.label_epsilon
    not the randomized-response labels it trained on). Only the scores go to the server."""
    rows = ctx.world.recv(source=SERVER, tag=Kind.LABEL_ROWS)
    y = torch.cat(sent).numpy() if sent else np.zeros(0, np.int64)
    if len(rows) != len(y):
        raise RuntimeError(f"client {ctx.rank}: the server recorded {len(rows)} feature-"
                           f"gradient rows of this epoch, the client {len(y)} labels")
    rng = np.random.default_rng([ctx.cfg.train.seed, ctx.rank, epoch])
    return leakage.score(rows, y, ctx.cfg.attack.known_labels, rng)


def _undo_point(ctx: Context, client: Client):
    """What a step's forward changes before the server has answered: the extractor's and
    the defense's buffers (BatchNorm statistics) and the random state. Returns the function
    that puts them back, for a request the server turns down because it is stopping."""
    kept = [(b, b.clone()) for m in (client.extractor, client.defense) for b in m.buffers()]
    rng = checkpoint.rng_state()

    def undo() -> None:
        with torch.no_grad():
            for live, saved in kept:
                live.copy_(saved)
        checkpoint.set_rng_state(rng)

    return undo


def _send_activation(ctx: Context, client: Client, x: torch.Tensor, y: torch.Tensor,
                     ready: float):
    """Extractor forward, defense, send (with labels in label_sharing) once the client's
    delay is over (``ready``). Returns the step so far and the requests in flight."""
    dev = ctx.device
    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
    if client.optimizer is not None:
        client.optimizer.zero_grad(set_to_none=True)
    with ctx.autocast():
        a = client.extractor(x)
        sent = client.defense(a)
        penalty = client.defense.penalty(x, a)
    _wait_until(ready)
    sends = ctx.transport.isend(sent, SERVER, Kind.ACTIVATION)
    if client.classifier is None:  # label_sharing: the server computes the loss
        sends += ctx.transport.isend(y, SERVER, Kind.LABELS)
    return Step(y, sent, penalty), sends


def _finish_step(ctx: Context, client: Client, step: Step, sends: list):
    """The rest of the step: loss (here or on the server), backward, optimizer step.
    Returns (loss sum, hits), or None when the server turned the request down (stopping)."""
    t, dev = ctx.transport, ctx.device
    y, sent, penalty = step
    if client.classifier is None:
        stats = t.recv(SERVER, Kind.LOSS)
        if t.flags & Flag.STOP:
            t.wait(sends)
            return None
        batch_loss, batch_correct = float(stats[0]), int(stats[1])
    else:
        h = t.recv(SERVER, Kind.FEATURES, dev)
        if t.flags & Flag.STOP:
            t.wait(sends)
            return None
        h.requires_grad_()
        with ctx.autocast():
            logits = client.classifier(h)
            loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        t.wait(sends)
        sends = t.isend(client.defense.gradient(h.grad), SERVER, Kind.FEATURE_GRAD)
        batch_loss = loss.item() * len(y)
        batch_correct = int((logits.argmax(1) == y).sum())
    if sent.requires_grad:
        grad = t.recv(SERVER, Kind.ACTIVATION_GRAD, dev, sent.dtype)
        extra = [] if penalty is None else [penalty]
        torch.autograd.backward([sent] + extra, [grad] + [None] * len(extra))
    if client.optimizer is not None:
        client.optimizer.step()
    t.wait(sends)
    return batch_loss, batch_correct


@torch.no_grad()
def evaluate(ctx: Context, client: Client) -> dict[int, dict]:
    """Every hosted client in turn: one pass over its test split. The next batch's
    extractor forward overlaps the server's work on the current one: no weights change
    while evaluating, so the numbers are exactly those of one batch at a time."""
    client.extractor.eval()
    client.defense.eval()
    if client.classifier is not None:
        client.classifier.eval()
    results, a, waiting = {}, None, None
    for k in client.ids:
        client.bank.activate(k)
        ctx.transport.speaks_for = k
        totals = results[k] = {"loss": 0.0, "correct": 0, "seen": 0}
        delay, ready = client.delays[k - 1], time.perf_counter()
        for x, y in client.shards.loaders(k)[1]:
            if client.audit:
                client.audit.see(x, y)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with ctx.autocast():
                a = client.defense(client.extractor(x))
            _wait_until(ready + delay)
            ready = time.perf_counter()
            sends = ctx.transport.isend(a, SERVER, Kind.EVAL_ACTIVATION)
            if waiting:
                _score(ctx, client, *waiting)
            waiting = y, sends, totals
        if waiting:  # the classifier is k's until the next client's
            _score(ctx, client, *waiting)
            waiting = None
    _end_phase(ctx, Kind.EVAL_ACTIVATION, a)
    return {k: {"test_loss": t["loss"] / max(t["seen"], 1),
                "test_accuracy": t["correct"] / max(t["seen"], 1), "test_samples": t["seen"]}
            for k, t in results.items()}


def _score(ctx: Context, client: Client, y: torch.Tensor, sends: list, totals: dict) -> None:
    """Features (or logits) of one test batch back from the server: loss and hits."""
    h = ctx.transport.recv(SERVER, Kind.FEATURES, ctx.device)
    with ctx.autocast():
        logits = h if client.classifier is None else client.classifier(h)
    totals["loss"] += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
    totals["correct"] += int((logits.argmax(1) == y).sum())
    totals["seen"] += len(y)
    ctx.transport.wait(sends)
