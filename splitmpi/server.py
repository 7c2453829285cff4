"""Rank 0, the cloud server: cloud model (+ output layer in label_sharing), optimizer,
the schedule of client requests, and the one HDF5 writer.

One epoch, as the clients see it (``client.py`` is the other half of each step):
  train phase  - per request: get activation -> cloud forward -> (u_shape) send features,
                 get feature grad | (label_sharing) get labels, loss, send loss
                 -> backward -> send activation grad -> step. Ends when every client
                 has sent an empty activation. split.mode=parallel takes the requests of
                 up to server.batch_clients clients into one step: one forward on their
                 batches together, each client its slice of every reply.
  label rows   - attack.labels only: each client gets back the feature-gradient rows the
                 server received from it (``send_label_rows``) and scores label inference
                 on them where the labels are; its report carries the scores.
  eval phase   - per request: get activation -> forward -> send features/logits.
  reports      - one report per client; one HDF5 row per series; one log line per client.

Stopping mid-epoch: once the server is stopping (its own SIGUSR1/SIGTERM, or a client's
empty activation flagged STOP), it serves no more training requests: each client's next one
is answered with an empty reply flagged STOP (``client.py`` undoes its forward). When every
client has ended its phase, the verdict after the train phase tells each client whether to
go on or to stop; on stop, every rank checkpoints its place in the epoch and exits 75.

Progress lines during the train phase (``train.log_every``, ``train.log_seconds``) count
the samples served per client against each client's shard size, which every client
sends once at the start of ``run``: the server has no data of its own to count.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import accountant, checkpoint, models, population, results, schedule, sharing
from .audit import ServerAudit
from .logs import Pace, Progress
from .runtime import SERVER, Context, clock_offsets
from .transport import Flag, Kind

log = logging.getLogger(__name__)

# Per client and train phase (docs/architecture.md#results-file defines each).
SERVE_SERIES = ("batches_served", "queue_wait_seconds", "server_idle_seconds",
                "server_compute_seconds", "classifier_wait_seconds", "phase_end_seconds")


@dataclass
class Trainable:
    """What a training request updates: a cloud model, its output layer (label_sharing
    only) and their SGD."""

    cloud: nn.Module
    head: nn.Module | None
    optimizer: torch.optim.Optimizer


@dataclass
class Request:
    """A client's batch the server has taken, with the times its served stats need (ns)."""

    rank: int  # the client rank that sent it
    client: int  # the logical client it speaks for (the header's ``client``)
    activation: torch.Tensor
    free: int  # the server turned to it
    got: int  # it had arrived
    sent: int  # the client sent it, on the server's clock


@dataclass
class Server:
    cloud: nn.Module  # the model the clients are evaluated through
    head: nn.Module | None  # the output layer, label_sharing only
    optimizer: torch.optim.Optimizer
    schedule: schedule.Schedule
    send_grad: bool  # False when the clients' extractors have nothing to learn (cnn5 cut 0)
    audit: ServerAudit | None  # audit=true: digests of every message received
    replies: dict = field(default_factory=dict)  # eval features in flight, per client rank
    position: dict | None = None  # a mid-epoch checkpoint's place in its epoch, until resumed
    clock_offsets: dict = field(default_factory=dict)  # ns to add to client k's clock
    clients: int = 0  # N, the logical clients of the run (the client ranks host them)
    copies: dict[int, Trainable] = field(default_factory=dict)  # sfl_v1: client k's own
    gather: int = 1  # clients whose batches one training step takes (split.mode=parallel)
    # attack.labels: feature-gradient rows received from each client in this train phase
    label_rows: dict[int, list[torch.Tensor]] | None = None
    diverged: bool = False  # a client's train loss was not finite: warned once

    def model(self) -> Trainable:
        """The one model: what sl and sfl_v2 train, and what clients are evaluated through."""
        return Trainable(self.cloud, self.head, self.optimizer)

    def trainable(self, k: int) -> Trainable:
        """What client k's training requests update: its copy (sfl_v1) or the one model."""
        return self.copies.get(k) or self.model()


def prepare(ctx: Context, resume_epochs: int | None) -> Server:
    cfg = ctx.cfg
    results.check_output(cfg, ctx.world.Get_size(), resume_epochs)
    parts = models.for_run(cfg)
    cloud = parts.cloud.to(ctx.device)
    head = parts.classifier.to(ctx.device) if cfg.split.topology == "label_sharing" else None
    optimizer = models.sgd([cloud, head], cfg.train)
    torch.manual_seed(cfg.train.seed * 1000)
    audit = ServerAudit() if cfg.audit else None
    if audit:
        ctx.transport.on_receive = audit.record
    server = Server(cloud, head, optimizer,
                    schedule.make(cfg.server.schedule, ctx.transport, cfg.split.mode,
                                  cfg.train.seed),
                    models.has_parameters(parts.extractor), audit,
                    clients=population.count(cfg, ctx.client_count))
    if cfg.split.mode == "sfl_v1":  # every client's copy starts as the one model
        for k in range(1, ctx.client_count + 1):
            own = copy.deepcopy((cloud, head))
            server.copies[k] = Trainable(*own, models.sgd(list(own), cfg.train))
    if cfg.split.mode == "parallel":
        wanted = cfg.server.batch_clients
        server.gather = ctx.client_count if wanted == "all" else min(wanted, ctx.client_count)
    if cfg.attack.labels:
        server.label_rows = defaultdict(list)
    return server


def _trainable_state(m: Trainable) -> dict:
    return {"cloud": m.cloud.state_dict(),
            "head": m.head.state_dict() if m.head is not None else {},
            "optimizer": m.optimizer.state_dict()}


def _restore_trainable(m: Trainable, saved: dict) -> None:
    models.load_part(m.cloud, saved["cloud"])
    if m.head is not None:
        models.load_part(m.head, saved["head"])
    m.optimizer.load_state_dict(saved["optimizer"])


def state(server: Server) -> dict:
    return {**_trainable_state(server.model()), "schedule": server.schedule.state_dict(),
            "copies": {k: _trainable_state(m) for k, m in server.copies.items()},
            "rng": checkpoint.rng_state(), "position": server.position or {},
            "audit": server.audit.state_dict() if server.audit and server.position else {}}


def restore(server: Server, saved: dict) -> None:
    _restore_trainable(server.model(), saved)
    for k, m in server.copies.items():
        _restore_trainable(m, saved["copies"][k])
    server.schedule.load_state_dict(saved["schedule"])
    checkpoint.set_rng_state(saved["rng"])
    server.position = saved.get("position") or None
    if server.audit and saved.get("audit"):
        server.audit.load_state_dict(saved["audit"])


def run(ctx: Context, server: Server, writer: results.ResultsWriter, start: int = 0) -> bool:
    """Epochs ``start``.. to the end; True when a signal stopped the run after a checkpoint."""
    cfg = ctx.cfg
    shards = {k: n for hosted in ctx.world.gather(None, root=SERVER)[1:]
              for k, n in hosted.items()}  # training samples per client
    server.clock_offsets = clock_offsets(ctx.world)
    rest = 0.0  # the last epoch's time after its train phase: sharing, evaluation, reports
    for epoch in range(start, cfg.train.epochs):
        place = server.position or {"stats": {}, "served": {}, "seconds": 0.0, "counters": {}}
        server.position = None
        ctx.transport.carry(place["counters"])
        at_start = ctx.transport.since(place["counters"])  # as if the epoch were unbroken
        began = time.perf_counter() - place["seconds"]
        title = f"epoch {epoch + 1}/{cfg.train.epochs}"
        members = population.participants(cfg, server.clients, epoch)
        left = _samples_left(ctx, server, shards, members, place["served"])
        progress = Progress(log, title, sum(left.values()), "samples", Pace.of(cfg.train),
                            totals=left, after=rest, repeats=cfg.train.epochs - epoch - 1)
        server.schedule.begin(epoch)
        served, stopped = serve_phase(ctx, server, Kind.ACTIVATION, train_step, progress,
                                      place["stats"])
        for k in range(1, ctx.client_count + 1):
            ctx.transport.send(torch.tensor([int(bool(stopped))]), k, Kind.VERDICT)
        if stopped:
            steps = sum(s["batches_served"] for s in served.values())
            server.position = {
                "stats": served, "seconds": time.perf_counter() - began,
                "served": {part: place["served"].get(part, 0) + n
                           for part, n in progress.parts.items()},
                "counters": ctx.transport.since(at_start)}
            checkpoint.save_within(ctx.world, cfg, epoch, state(server), steps)
            writer.close()
            how = ", ".join(f"client {k} {what}" for k, what in sorted(stopped.items()))
            log.info(f"stopped by a signal within epoch {epoch + 1}, after {steps} training "
                     f"steps (server: {ctx.stop.after()}; {how}); rerun with "
                     "train.resume=auto to go on from there")
            return True
        ctx.transport.stopping = False
        if server.label_rows is not None:
            send_label_rows(ctx, server)
        if server.copies:  # sfl_v1: the copies' sample-weighted mean, in every copy
            average_copies(server, [shards[k] for k in sorted(server.copies)])
        trained = time.perf_counter()
        if population.evaluates(cfg, epoch):  # else the clients send no test batch
            serve_phase(ctx, server, Kind.EVAL_ACTIVATION, eval_step)
        for sends in server.replies.values():
            ctx.transport.wait(sends)
        server.replies.clear()
        from_ranks = [ctx.world.recv(source=r, tag=Kind.REPORT)
                      for r in range(1, ctx.client_count + 1)]
        reports = {k: report for r in from_ranks for k, report in r["clients"].items()}
        if server.audit:  # one client per rank (config.check_world): client k is rank k
            audit_epoch(ctx, server.audit, reports)
        ended = time.perf_counter()
        seconds, rest = ended - began, ended - trained
        for k, report in reports.items():
            report.update(served[k])
        _log_clients(title, reports)
        _warn_divergence(server, title, reports)
        writer.append_epoch(seconds, reports, [ctx.transport.counters()] + from_ranks)
        if cfg.defense.act_clip > 0:
            log.info(f"{title} DP activations: epsilon "
                     f"{accountant.spent(cfg.defense, cfg.train.epochs, epoch + 1):.4f} at delta "
                     f"{cfg.defense.act_delta:g} (sigma "
                     f"{accountant.sigma_of(cfg.defense, cfg.train.epochs):.4f} x act_clip "
                     f"{cfg.defense.act_clip:g})")
        log.info(f"{title} done in {seconds:.1f} s")
        stop = bool(ctx.stop.signal) or any(r["stop_requested"] for r in from_ranks)
        every = cfg.train.checkpoint_every
        save = stop or (every > 0 and (epoch + 1) % every == 0)
        if checkpoint.boundary(ctx.world, cfg, epoch + 1, lambda: state(server), (save, stop)):
            writer.close()
            log.info(f"stopped by a signal after epoch {epoch + 1}; rerun with "
                     "train.resume=auto to go on")
            return True
    writer.finish()
    return False


LOGGED_CLIENTS = 16  # more clients than this: one summary line per epoch, not one each


def _samples_left(ctx: Context, server: Server, shards: dict[int, int], members,
                  served: dict[str, int]) -> dict[str, int]:
    """The samples of this epoch's train phase, per part of the progress line: per client
    while there are few, else per client rank (``served``: what a stopped run had done)."""
    if server.clients <= LOGGED_CLIENTS:
        left = {f"client {k}": shards[k] for k in members}
    else:
        left = defaultdict(int)
        for r in range(1, ctx.client_count + 1):
            hosted = population.hosted(r, ctx.client_count, server.clients)
            left[f"rank {r}"] = sum(shards[k] for k in members if k in hosted)
    return {part: n - served.get(part, 0) for part, n in left.items()}


def _part(server: Server, r: Request) -> str:
    """The part of the progress line a request counts in (``_samples_left``)."""
    return f"client {r.client}" if server.clients <= LOGGED_CLIENTS else f"rank {r.rank}"


def _log_clients(title: str, reports: dict[int, dict]) -> None:
    """One line per client (and its label inference, if measured), or with many clients
    the distribution of the clients that took part (or were evaluated)."""
    if len(reports) > LOGGED_CLIENTS:
        took = [r for r in reports.values() if r["participated"]]
        tested = [r["test_accuracy"] for r in reports.values() if r["test_samples"]]
        line = (f"{title}: {len(took)} of {len(reports)} clients trained, train loss mean "
                f"{np.mean([r['train_loss'] for r in took]):.4f}")
        if tested:
            q = np.percentile(tested, [0, 10, 50, 90, 100])
            line += (f" | test acc of {len(tested)} clients: mean {np.mean(tested):.4f}, "
                     f"min/p10/p50/p90/max " + "/".join(f"{v:.3f}" for v in q))
        log.info(line)
        return
    for k, report in reports.items():
        if not report["participated"]:
            log.info(f"{title} client {k}: did not take part"
                     + (f" | test acc {report['test_accuracy']:.4f}"
                        if report["test_samples"] else ""))
            continue
        log.info(f"{title} client {k}: "
                 f"train loss {report['train_loss']:.4f} acc {report['train_accuracy']:.4f} "
                 f"| test acc {report['test_accuracy']:.4f} (n={report['test_samples']}) "
                 f"| {report['samples_per_s']:.0f} samples/s")
        log.debug(f"{title} client {k}: {report['batches_served']} batches served, "
                  f"queued {report['queue_wait_seconds']:.1f} s, server idle for it "
                  f"{report['server_idle_seconds']:.1f} s, computing "
                  f"{report['server_compute_seconds']:.1f} s, waiting on its classifier "
                  f"{report['classifier_wait_seconds']:.1f} s, train phase ended at "
                  f"{report['phase_end_seconds']:.1f} s")
        if "labels" in report:
            found = report["labels"]
            log.info(f"{title} client {k}: label inference from "
                     f"{found['rows']:.0f} feature-gradient rows: cosine "
                     f"{found['cosine_accuracy']:.3f}, clusters "
                     f"{found['cluster_accuracy']:.3f} (named by known rows "
                     f"{found['cluster_known_accuracy']:.3f}), norm AUC "
                     f"{found['norm_auc']:.3f}, chance {found['chance']:.3f}")


def _warn_divergence(server: Server, title: str, reports: dict[int, dict]) -> None:
    """Once per run, a warning when a client's train loss stops being finite: NaN weights
    stay NaN, so every later epoch of the run is spent learning nothing, and the numbers
    alone (a NaN in a long log) are easy to miss."""
    bad = [k for k, r in reports.items()
           if r["participated"] and not np.isfinite(r["train_loss"])]
    if not bad or server.diverged:
        return
    server.diverged = True
    who = (f"client {bad[0]}" if len(bad) == 1 else
           f"{len(bad)} clients ({', '.join(map(str, bad[:8]))}{', ...' if len(bad) > 8 else ''})")
    log.warning(f"{title}: the train loss of {who} is not finite: the run has diverged, "
                "and its later epochs learn nothing. Lower train.lr, or the noise of a "
                "defense (defense.act_epsilon with its act_clip, defense.grad_noise: "
                "docs/privacy.md), and run it again")


def average_copies(server: Server, shards: list[int]) -> None:
    """SplitFed v1's server step: every client's cloud (and head) becomes the mean of all
    copies weighted by the clients' training samples (FedAvg); each keeps its momentum. The
    model the clients are evaluated through is that mean too."""
    copies = [server.copies[k] for k in sorted(server.copies)]
    for part in ("cloud", "head"):
        modules = [getattr(m, part) for m in copies]
        if modules[0] is not None:
            sharing.weighted_mean(modules, shards)
            getattr(server, part).load_state_dict(modules[0].state_dict())


def keep_label_rows(server: Server, k: int, grad: torch.Tensor, cap: int) -> None:
    """attack.labels: keep client k's feature-gradient rows as received (after the wire's
    decode), the first ``cap`` of the train phase."""
    kept = server.label_rows[k]
    room = cap - sum(len(rows) for rows in kept)
    if room > 0:
        rows = grad[:room].detach()
        kept.append(rows.reshape(len(rows), -1).to("cpu", torch.float32, copy=True))


def send_label_rows(ctx: Context, server: Server) -> None:
    """attack.labels: each client gets the rows kept of its train phase (pickled, on their
    own tag) and scores label inference on them itself, so no label reaches the server.
    A train phase stopped by a signal sends none: the resumed one records afresh."""
    for k in range(1, ctx.client_count + 1):
        kept = server.label_rows.pop(k, [])
        rows = torch.cat(kept).numpy() if kept else np.zeros((0, 0), np.float32)
        ctx.world.send(rows, dest=k, tag=Kind.LABEL_ROWS)


def audit_epoch(ctx: Context, audit: ServerAudit, reports: dict[int, dict]) -> None:
    """Each client checks the digests of its messages; only match counts come back."""
    for k in reports:
        ctx.world.send(audit.take(k), dest=k, tag=Kind.AUDIT)
    for k, report in reports.items():
        found = ctx.world.recv(source=k, tag=Kind.AUDIT)
        report.update(found)
        log.info(f"audit: client {k}: {found['messages_checked']} messages checked, "
                 f"{found['input_matches']} carried raw inputs, "
                 f"{found['label_matches']} carried labels")


def serve_phase(ctx: Context, server: Server, kind: Kind, step,
                progress: Progress | None = None,
                carried: dict | None = None) -> tuple[dict[int, dict], dict[int, str]]:
    """Serve requests on ``kind`` in schedule order until every client has ended the phase;
    each request served counts its samples into ``progress``. ``carried``: the stats of
    the part of the phase before a mid-epoch checkpoint. In the train phase (``progress``
    given) a signal stops serving (module doc), and a step takes the requests of up to
    ``server.gather`` clients; returns the stats per client and the clients that stopped
    before the end of their shard, with how. Requests come from client ranks and name the
    logical client they speak for: the schedule picks among ranks, the stats are per
    logical client, and a rank's empty activation ends the phase of all its clients."""
    t = ctx.transport
    active, stopped = list(range(1, ctx.client_count + 1)), {}
    stats = defaultdict(lambda: {**dict.fromkeys(SERVE_SERIES, 0.0), "batches_served": 0})
    stats.update({int(k): dict(v) for k, v in (carried or {}).items()})
    size = server.gather if progress is not None else 1
    start = time.perf_counter()
    while active:
        if progress is not None and ctx.stop.signal:
            t.stopping = True
        group = []
        while len(group) < size:
            others = [k for k in active if all(r.rank != k for r in group)]
            if not others:
                break
            free = time.monotonic_ns()  # the server turns to the next request
            k = server.schedule.more(others, kind) if group else server.schedule.next(others, kind)
            if k is None:
                break
            a = t.recv(k, kind, ctx.device)
            request = Request(k, t.client, a, free, time.monotonic_ns(),
                              t.sent_ns + server.clock_offsets.get(k, 0))
            if a.shape[0] > 0:
                group.append(request)
                continue
            active.remove(k)
            if t.flags & Flag.STOP:  # the client had a signal: stop everyone
                t.stopping = True
                stopped[k] = "had a signal"
            else:
                for j in population.hosted(k, ctx.client_count, server.clients):
                    if j in stats:
                        stats[j]["phase_end_seconds"] = time.perf_counter() - start
        if progress is not None and t.stopping:
            for r in group:
                turn_down(ctx, server, r.rank)
                active.remove(r.rank)
                stopped[r.rank] = "turned down"
            continue
        if not group:
            continue
        began = time.perf_counter()
        waited = step(ctx, server, group)
        ctx.stop.steps += progress is not None
        compute = (time.perf_counter() - began - sum(waited.values())) / len(group)
        for r in group:
            s = stats[r.client]
            s["batches_served"] += 1
            s["queue_wait_seconds"] += max(0, r.free - r.sent) / 1e9
            s["server_idle_seconds"] += (r.got - r.free) / 1e9
            s["server_compute_seconds"] += compute
            s["classifier_wait_seconds"] += waited.get(r.client, 0.0)
            if progress is not None:
                progress.update(r.activation.shape[0], _part(server, r))
    return {k: stats[k] for k in range(1, server.clients + 1)}, stopped


def turn_down(ctx: Context, server: Server, k: int) -> None:
    """Answer a training request with an empty reply flagged STOP instead of serving it
    (the server is stopping); in label_sharing its labels are taken and dropped."""
    if server.head is not None:
        ctx.transport.recv(k, Kind.LABELS)
    reply = Kind.FEATURES if server.head is None else Kind.LOSS
    ctx.transport.send(torch.empty(0), k, reply)


def train_step(ctx: Context, server: Server, group: list[Request]) -> dict[int, float]:
    """One server update on the batches of ``group`` (one request, or in parallel mode up
    to ``server.gather``): one forward on them together, each client its slice of the
    replies. Each client's activation gradient is that of its own loss; the cloud steps on
    the mean of the clients' gradients. Returns the seconds spent waiting for each client's
    classifier (u_shape: features out, feature gradient back)."""
    t = ctx.transport
    m = server.trainable(group[0].client)  # sfl_v1 (a copy per client) serves one at a time
    inputs = [r.activation.requires_grad_(server.send_grad) for r in group]
    sizes = [len(a) for a in inputs]
    m.cloud.train()
    m.optimizer.zero_grad(set_to_none=True)
    with ctx.autocast():
        h = m.cloud(torch.cat(inputs))
    sends, waited = [], {}
    if m.head is None:  # u_shape: the clients' classifiers compute the loss
        for r, features in zip(group, h.split(sizes)):
            sends += t.isend(features, r.rank, Kind.FEATURES)
        grads = []
        for r in group:
            asked = time.perf_counter()
            grads.append(t.recv(r.rank, Kind.FEATURE_GRAD, ctx.device, h.dtype))
            waited[r.client] = time.perf_counter() - asked
            if server.label_rows is not None:
                keep_label_rows(server, r.client, grads[-1], ctx.cfg.attack.label_rows)
        h.backward(torch.cat(grads))
    else:  # label_sharing: labels came with the activations
        m.head.train()
        labels = [t.recv(r.rank, Kind.LABELS, ctx.device) for r in group]
        with ctx.autocast():
            logits = m.head(h)
        losses = []
        for r, z, y in zip(group, logits.split(sizes), labels):
            losses.append(nn.functional.cross_entropy(z.float(), y))
            stats = torch.tensor([losses[-1].item() * len(y), float((z.argmax(1) == y).sum())],
                                 dtype=torch.float64)
            sends += t.isend(stats, r.rank, Kind.LOSS)
        torch.stack(losses).sum().backward()
    if server.send_grad:
        for r, a in zip(group, inputs):
            sends += t.isend(a.grad, r.rank, Kind.ACTIVATION_GRAD)
    if len(group) > 1:
        for p in (p for g in m.optimizer.param_groups for p in g["params"] if p.grad is not None):
            p.grad /= len(group)
    m.optimizer.step()
    t.wait(sends)
    return waited


@torch.no_grad()
def eval_step(ctx: Context, server: Server, group: list[Request]) -> dict[int, float]:
    """Forward only, one request at a time. The reply is not waited for here: the client
    takes it after sending its next batch, and meanwhile the server serves others. The
    previous reply to this client is waited for before this one (the client posts that
    receive right after this send)."""
    (r,) = group
    server.cloud.eval()
    with ctx.autocast():
        out = server.cloud(r.activation)
        if server.head is not None:
            server.head.eval()
            out = server.head(out)
    ctx.transport.wait(server.replies.pop(r.rank, []))
    server.replies[r.rank] = ctx.transport.isend(out, r.rank, Kind.FEATURES)
    return {}
