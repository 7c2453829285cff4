"""Client ranks 1..N: data shard, extractor, classifier (u_shape), optimizer.

One epoch, as the server sees it (``server.py`` is the other half of each step):
  train phase  - per batch: send activation -> (u_shape) get features, classifier, loss,
                 send feature grad -> get activation grad, extractor backward, step.
                 An empty activation ends the phase. Then the server's verdict: go on, or
                 stop here (a signal came).
  share        - extractors averaged over the client communicator (``split.share``);
                 under split.share_bn=recalibrate each client then re-estimates the
                 extractor's BatchNorm statistics on its own training data.
  label rows   - attack.labels only: the server sends back the feature-gradient rows it
                 received, and the client scores label inference on them (its labels
                 never leave; ``label_inference``).
  eval phase   - per test batch: send activation -> get features/logits (the next batch's
                 forward runs meanwhile); then an empty activation and this epoch's
                 report (metrics, counters) to rank 0.

Stopping mid-epoch (SIGUSR1/SIGTERM): a client with a signal sends, at its next step
boundary, an empty activation flagged STOP instead of its next batch. A server that is
stopping (its own signal, or such a flag) answers each client's next request with an empty
reply flagged STOP and does not serve it; the client then undoes that request's forward
(BatchNorm statistics, random state) as if it never ran. Either way the client ends its
phase at a step boundary, the verdict says stop, and every rank writes a checkpoint with
its place in the epoch (``Client.position``), from which a resumed run goes on exactly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import checkpoint, data, leakage, models, sharing
from .audit import ClientAudit
from .config import SPLITFED
from .defense import Defense
from .runtime import SERVER, Context, clock_offsets
from .transport import Flag, Kind

log = logging.getLogger(__name__)


@dataclass
class Client:
    extractor: nn.Module
    classifier: nn.Module | None  # None in label_sharing: the server holds the output layer
    defense: Defense  # what is done to activations before they are sent
    optimizer: torch.optim.Optimizer | None  # None when nothing on this client learns
    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    classes: list[int]
    audit: ClientAudit | None  # audit=true: digests of this client's raw inputs and labels
    position: dict | None = None  # a mid-epoch checkpoint's place in its epoch, until resumed


class Step(NamedTuple):
    """A training step between sending the activation and receiving its gradient."""
    y: torch.Tensor  # labels, on the device
    sent: torch.Tensor  # what crossed the cut (the graph back to the extractor hangs on it)
    penalty: torch.Tensor | None  # NoPeek loss term


def prepare(ctx: Context) -> Client:
    """Everything that can fail on bad input, before any message is exchanged."""
    cfg = ctx.cfg
    data.check_available(cfg.data)
    train_loader, test_loader, classes = data.client_loaders(cfg, ctx.rank, ctx.client_count)
    parts = models.for_run(cfg)
    extractor = parts.extractor.to(ctx.device)
    classifier = parts.classifier.to(ctx.device) if cfg.split.topology == "u_shape" else None
    optimizer = models.sgd([extractor, classifier], cfg.train)
    torch.manual_seed(cfg.train.seed * 1000 + ctx.rank)
    audit = ClientAudit(ctx.transport) if cfg.audit else None
    defense = Defense(cfg.defense, cfg.train.epochs)
    return Client(extractor, classifier, defense, optimizer, train_loader,
                  test_loader, classes, audit)


def state(client: Client) -> dict:
    return {"extractor": client.extractor.state_dict(),
            "classifier": client.classifier.state_dict() if client.classifier is not None else {},
            "optimizer": client.optimizer.state_dict() if client.optimizer is not None else {},
            "rng": checkpoint.rng_state(), "position": client.position or {},
            "audit": client.audit.state_dict() if client.audit and client.position else {}}


def restore(client: Client, saved: dict) -> None:
    models.load_part(client.extractor, saved["extractor"])
    if client.classifier is not None:
        models.load_part(client.classifier, saved["classifier"])
    if client.optimizer is not None:
        client.optimizer.load_state_dict(saved["optimizer"])
    checkpoint.set_rng_state(saved["rng"])
    client.position = saved.get("position") or None
    if client.audit and saved.get("audit"):
        client.audit.load_state_dict(saved["audit"])


def run(ctx: Context, client: Client, start: int = 0) -> bool:
    """Epochs ``start``.. to the end; True when a signal stopped the run after a checkpoint."""
    ctx.world.gather(len(client.train_loader.dataset), root=SERVER)  # for the server's progress
    clock_offsets(ctx.world)
    for epoch in range(start, ctx.cfg.train.epochs):
        train = train_epoch(ctx, client, epoch)
        if ctx.transport.recv(SERVER, Kind.VERDICT).item():
            client.position = train["position"]
            checkpoint.save_within(ctx.world, ctx.cfg, epoch, state(client))
            log.info(f"client {ctx.rank} stopped within epoch {epoch + 1} after "
                     f"{train['position']['batches']} batches ({ctx.stop.after()})")
            return True
        del train["position"]
        sent = train.pop("labels_sent")
        inferred = label_inference(ctx, sent, epoch) if ctx.cfg.attack.labels else None
        shared_bytes = share(ctx, client, epoch) if ctx.cfg.split.share else 0
        test = evaluate(ctx, client)
        report = {"epoch": epoch, "classes": client.classes, **train, **test,
                  "share_buffer_bytes": shared_bytes, "stop_requested": bool(ctx.stop.signal),
                  **ctx.transport.counters()}
        if inferred is not None:
            report["labels"] = inferred
        ctx.world.send(report, dest=SERVER, tag=Kind.REPORT)
        if client.audit:
            received = ctx.world.recv(source=SERVER, tag=Kind.AUDIT)
            ctx.world.send(client.audit.check(received), dest=SERVER, tag=Kind.AUDIT)
        if checkpoint.boundary(ctx.world, ctx.cfg, epoch + 1, lambda: state(client)):
            return True
    return False


def share(ctx: Context, client: Client, epoch: int) -> int:
    """Average the extractors over the clients (``split.share_bn`` says what happens to
    BatchNorm, ``split.share_optimizer`` to the momentum, ``split.share_weights`` how the
    clients weigh: by the size of their training shard under ``samples``), and under
    SplitFed (``split.mode``) the u_shape classifiers too: FedAvg of every client-side
    model; returns the bytes reduced."""
    split = ctx.cfg.split
    samples = len(client.train_loader.dataset) if split.share_weights == "samples" else None
    reduced = sharing.average_extractor(client.extractor, ctx.clients_comm, split.share_bn,
                                        client.optimizer, split.share_optimizer, samples)
    if split.mode in SPLITFED and client.classifier is not None:
        reduced += sharing.average_extractor(client.classifier, ctx.clients_comm, "average",
                                             client.optimizer, split.share_optimizer, samples)
    if split.share_bn == "recalibrate":
        sample = data.sample_loader(client.train_loader, ctx.cfg.train.seed, ctx.rank, epoch)
        with ctx.autocast():
            inputs = (x.to(ctx.device, non_blocking=True) for x, _ in sample)
            sharing.recalibrate(client.extractor, inputs, split.bn_recalibrate_batches)
    return reduced


def _end_phase(ctx: Context, kind: Kind, like: torch.Tensor | None) -> None:
    """An activation with no samples tells the server this client's phase is over."""
    shape = (0,) + (tuple(like.shape[1:]) if like is not None else ())
    ctx.transport.send(torch.empty(shape), SERVER, kind)


def train_epoch(ctx: Context, client: Client, epoch: int) -> dict:
    """One pass over the shard, from a mid-epoch checkpoint's place if there is one. The
    next batch is loaded while the server works on the current one (prefetch only: every
    step still uses the weights of the step before). ``position`` in the result is the
    place reached, for a checkpoint should the server's verdict be to stop;
    ``labels_sent`` the labels of the first ``attack.label_rows`` samples trained on in
    this process (attack.labels), in the order the server recorded their rows."""
    client.extractor.train()
    client.defense.train()
    if client.classifier is not None:
        client.classifier.train()
    place = client.position or {"batches": 0, "loss": 0.0, "correct": 0, "seen": 0,
                                "seconds": 0.0, "counters": {}}
    client.position = None
    ctx.transport.carry(place["counters"])
    at_start = ctx.transport.since(place["counters"])  # this epoch's start, as if unbroken
    loss_sum, correct, seen, done = place["loss"], place["correct"], place["seen"], 0
    start = time.perf_counter() - place["seconds"]
    loader = client.train_loader
    loader.sampler.set_epoch(epoch, start=place["batches"] * loader.batch_size)
    batches = iter(loader)
    batch, like, turned_down = next(batches, None), None, False
    labels_sent, room = [], ctx.cfg.attack.label_rows if ctx.cfg.attack.labels else 0
    while batch is not None and not ctx.stop.signal:  # a signal: stop at this boundary
        x, y = batch
        undo = _undo_point(ctx, client)
        step, sends = _send_activation(ctx, client, x, y)
        batch = next(batches, None)  # overlaps the server's forward
        result = _finish_step(ctx, client, step, sends)
        if result is None:  # the server is stopping: this step did not happen
            undo()
            turned_down = True
            break
        if client.audit:
            client.audit.see(x, y)
        if room > 0:
            labels_sent.append(y[:room].cpu())
            room -= len(labels_sent[-1])
        ctx.stop.steps += 1
        batch_loss, batch_correct = result
        loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + len(y)
        done, like = done + 1, step.sent
    if not turned_down:  # the end of the phase, flagged STOP if a signal ended it early
        ctx.transport.stopping = batch is not None
        _end_phase(ctx, Kind.ACTIVATION, like)
        ctx.transport.stopping = False
    seconds = time.perf_counter() - start
    position = {"batches": place["batches"] + done, "loss": loss_sum, "correct": correct,
                "seen": seen, "seconds": seconds,
                "counters": ctx.transport.since(at_start)}
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "train_samples": seen, "train_seconds": seconds,
            "samples_per_s": seen / seconds if seconds > 0 else 0.0, "position": position,
            "labels_sent": labels_sent}


def label_inference(ctx: Context, sent: list[torch.Tensor], epoch: int) -> dict:
    """attack.labels: the feature-gradient rows the server received from this client in
    the training phase come back, and the client scores what they tell of the labels it
    trained them with (``leakage.score``). Only the scores go to the server."""
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


def _delay(ctx: Context) -> None:
    """clients.delay_ms: a far-away or slow end-system, simulated before each request."""
    delays = ctx.cfg.clients.delay_ms
    if delays and delays[ctx.rank - 1]:
        time.sleep(delays[ctx.rank - 1] / 1000)


def _send_activation(ctx: Context, client: Client, x: torch.Tensor, y: torch.Tensor):
    """Extractor forward, defense, send (with labels in label_sharing). Returns the step
    so far and the requests in flight."""
    dev = ctx.device
    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
    if client.optimizer is not None:
        client.optimizer.zero_grad(set_to_none=True)
    with ctx.autocast():
        a = client.extractor(x)
        sent = client.defense(a)
        penalty = client.defense.penalty(x, a)
    _delay(ctx)
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
def evaluate(ctx: Context, client: Client) -> dict:
    """One pass over the test split. The next batch's extractor forward overlaps the
    server's work on the current one: no weights change while evaluating, so the numbers
    are exactly those of one batch at a time."""
    client.extractor.eval()
    client.defense.eval()
    if client.classifier is not None:
        client.classifier.eval()
    totals = {"loss": 0.0, "correct": 0, "seen": 0}
    a, waiting = None, None
    for x, y in client.test_loader:
        if client.audit:
            client.audit.see(x, y)
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        with ctx.autocast():
            a = client.defense(client.extractor(x))
        _delay(ctx)
        sends = ctx.transport.isend(a, SERVER, Kind.EVAL_ACTIVATION)
        if waiting:
            _score(ctx, client, *waiting, totals)
        waiting = y, sends
    if waiting:
        _score(ctx, client, *waiting, totals)
    _end_phase(ctx, Kind.EVAL_ACTIVATION, a)
    seen = totals["seen"]
    return {"test_loss": totals["loss"] / max(seen, 1),
            "test_accuracy": totals["correct"] / max(seen, 1), "test_samples": seen}


def _score(ctx: Context, client: Client, y: torch.Tensor, sends: list, totals: dict) -> None:
    """Features (or logits) of one test batch back from the server: loss and hits."""
    h = ctx.transport.recv(SERVER, Kind.FEATURES, ctx.device)
    with ctx.autocast():
        logits = h if client.classifier is None else client.classifier(h)
    totals["loss"] += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
    totals["correct"] += int((logits.argmax(1) == y).sum())
    totals["seen"] += len(y)
    ctx.transport.wait(sends)
