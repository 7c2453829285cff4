"""One client step and one server step in one process, without mpiexec.

The server (rank 0) and one client (rank 1) are threads of this process talking through the
real ``Transport`` over ``splitmpi.loopback``. A split step must do exactly what the same
network does in one piece: the gradients, the weights after the SGD step, BatchNorm's
running statistics and the loss are compared bit for bit with ``splitmpi.monolithic``'s
one-process step on the same batch (the step the attack's target and the train
benchmark's baseline are trained with). What needs real ranks (sharing, whole runs, the
schedules' timing) stays in the mpiexec tests.
"""
import copy
import signal
import threading

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from splitmpi import client, config, loopback, models, monolithic, population, schedule, server
from splitmpi.defense import Defense
from splitmpi.runtime import SERVER, Context, StopFlag
from splitmpi.transport import DTYPES, HEADER, HEADER_LEN, WIRE_DTYPES, Kind, Transport

CLIENT = 1
CHANNELS, IMAGE_SIZE, CLASSES, BATCH = 3, 8, 10, 4


@pytest.fixture(autouse=True)
def one_thread():
    """The ranks and the one-process reference share this process's cores: with a torch
    thread each they do not fight over them (teams of OpenMP threads spinning at their
    barriers made a step of seconds on a loaded machine)."""
    kept = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(kept)


@pytest.fixture
def stop():
    """A StopFlag; the signal handlers it installs are put back afterwards, so SIGTERM still
    ends the test process."""
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield StopFlag()
    for sig, handler in kept.items():
        signal.signal(sig, handler)


@pytest.fixture
def world():
    with loopback.World(2) as w:
        yield w


def batch(seed: int, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g),
            torch.randint(0, CLASSES, (n,), generator=g))


# -- the transport ----------------------------------------------------------------------

def sample(dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(shape))
    return (torch.randn(shape, generator=g) * 100).to(dtype)


@pytest.mark.parametrize("wait", ["spin", "sleep"])
def test_tensors_cross_in_process_byte_for_byte(world, wait):
    """Every dtype, empty and 0-d and 8-d shapes, a non-contiguous tensor, and the wire
    casts: an activation crosses as exactly its bf16/fp16 rounding, in half the bytes, and
    comes back float32; a kind outside the wire kinds keeps its dtype."""
    tensors = [(sample(dt), Kind.LABELS) for dt in DTYPES]
    tensors += [(torch.ones(shape), Kind.FEATURES) for shape in [(0,), (0, 4, 2, 2), (),
                                                                 (1,) * 8]]
    tensors.append((sample(torch.float32, (6, 4)).t(), Kind.FEATURES))
    activation = sample(torch.float32, (8, 16, 4, 4))

    def sender():
        by_wire = {w: Transport(world.comm(CLIENT), wire_dtype=w, wait=wait)
                   for w in WIRE_DTYPES}
        for x, kind in tensors:
            by_wire["float32"].send(x, SERVER, kind)
        for t in by_wire.values():
            t.send(activation, SERVER, Kind.ACTIVATION)
            t.send(sample(torch.float16), SERVER, Kind.LABELS)
        return by_wire

    def receiver():
        t = Transport(world.comm(SERVER), wait=wait)
        got = [t.recv(CLIENT, kind) for _, kind in tensors]
        wired = {w: (t.recv(CLIENT, Kind.ACTIVATION), t.recv(CLIENT, Kind.LABELS))
                 for w in WIRE_DTYPES}
        return got, wired, t.counters()

    (got, wired, received), senders = loopback.run(receiver, sender)
    for (x, _), y in zip(tensors, got):
        assert y.dtype == x.dtype and y.shape == x.shape and torch.equal(y, x)
    for wire, (a, labels) in wired.items():
        assert a.dtype == torch.float32
        assert torch.equal(a, activation.to(WIRE_DTYPES[wire]).float()), wire
        assert labels.dtype == torch.float16 and torch.equal(labels, sample(torch.float16))
    for count in ("bytes", "messages"):
        sent = sum(t.counters()[f"{count}_sent"] for t in senders.values())
        assert sent == received[f"{count}_received"], count
    header = HEADER_LEN * HEADER.itemsize
    payload = {w: t.bytes_sent[Kind.ACTIVATION] - header for w, t in senders.items()}
    half = activation.nbytes // 2
    assert payload == {"float32": activation.nbytes, "bfloat16": half, "float16": half}


@pytest.mark.parametrize("wait", ["spin", "sleep"])
def test_a_probe_from_any_source_names_the_virtual_sender(wait):
    """The fifo schedule probes for whoever sent first; in a loopback world the probe must
    name the sending thread's rank, not the one process's."""
    with loopback.World(3) as w:
        def sender(rank):
            def send():
                Transport(w.comm(rank)).send(torch.full((2,), float(rank)), SERVER,
                                             Kind.ACTIVATION)
            return send

        def fifo():
            t = Transport(w.comm(SERVER), wait=wait)
            order = schedule.make("fifo", t)
            served = {}
            for _ in range(2):
                k = order.next([1, 2], Kind.ACTIVATION)
                served[k] = t.recv(k, Kind.ACTIVATION)
            return served

        served = loopback.run(fifo, sender(1), sender(2))[0]
    assert {k: a.tolist() for k, a in served.items()} == {1: [1.0, 1.0], 2: [2.0, 2.0]}


def test_the_first_error_of_any_rank_is_raised_at_once():
    """A failed rank's error must not wait for the other ranks: they may be waiting for a
    message from it that will never come."""
    released, finished = threading.Event(), threading.Event()

    def waiting():
        released.wait(60)
        finished.set()

    with pytest.raises(ZeroDivisionError):
        loopback.run(waiting, lambda: 1 / 0, timeout=60)
    assert not finished.is_set()
    released.set()


# -- one step ---------------------------------------------------------------------------

def make_cfg(arch: str, cut, topology: str, *overrides: str) -> config.Config:
    """A run on synthetic images of the shape of ``batch``'s."""
    return config.load(overrides=[f"model.arch={arch}", f"model.cut={cut}",
                                  f"split.topology={topology}", "train.weight_decay=0.001",
                                  f"data.channels={CHANNELS}", f"data.image_size={IMAGE_SIZE}",
                                  f"data.num_classes={CLASSES}", *overrides])


def contexts(cfg: config.Config, world: loopback.World, stop: StopFlag):
    """Server and client contexts as ``make_context`` would give them on the CPU. Ranks wait
    by sleeping, as where ranks outnumber cores (here two ranks and torch's threads share
    the cores); the one client's sub-communicator is COMM_SELF, a client communicator of
    one rank."""
    cpu = torch.device("cpu")

    def context(rank: int, clients_comm):
        comm = world.comm(rank)
        transport = Transport(comm, cfg.comm.wire_dtype, wait="sleep")
        return Context(cfg, comm, clients_comm, 1, cpu, transport, stop)

    return context(SERVER, None), context(CLIENT, MPI.COMM_SELF)


def roles(cfg: config.Config, ctxs, test_loader=None):
    """The server's and the client's state over the run's network, and the same network
    built again for the one-process reference."""
    parts = models.for_run(cfg)
    whole = monolithic.build(cfg, torch.device("cpu"))
    u_shape = cfg.split.topology == "u_shape"
    classifier = parts.classifier if u_shape else None
    head = None if u_shape else parts.classifier
    cloud_side = server.Server(parts.cloud, head, models.sgd([parts.cloud, head], cfg.train),
                               schedule.make(cfg.server.schedule, ctxs[SERVER].transport),
                               models.has_parameters(parts.extractor), audit=None, clients=1)
    optimizer = models.sgd([parts.extractor, classifier], cfg.train)
    bank = population.Bank({"extractor": parts.extractor, "classifier": classifier}, optimizer,
                           range(CLIENT, CLIENT + 1), cfg.train.seed)
    bank.activate(CLIENT)  # as client.prepare: the parts are now views into the bank's row
    client_side = client.Client(parts.extractor, classifier, Defense(cfg.defense), optimizer,
                                bank, Given(test_loader), 1, np.zeros(1), audit=None)
    return cloud_side, client_side, whole


class Given:
    """The one client's data as ``client.Client`` asks for it (``data.Shards``): here only
    the test loader a test gives."""

    def __init__(self, test_loader):
        self.test_loader = test_loader

    def loaders(self, k: int):
        return None, self.test_loader, []


def assert_same_state(split: nn.Module, whole: nn.Module) -> None:
    """Weights and buffers (BatchNorm's running statistics) bit for bit equal."""
    state, reference = split.state_dict(), whole.state_dict()
    for name in state:
        assert torch.equal(state[name], reference[name]), name


def assert_same_step(split: nn.Module, whole: nn.Module, before: dict) -> None:
    """Gradients, weights and buffers bit for bit equal, and a part with any state moved."""
    for (name, p), q in zip(split.named_parameters(), whole.parameters()):
        assert torch.equal(p.grad, q.grad), f"gradient of {name}"
    assert_same_state(split, whole)
    if before:
        state = split.state_dict()
        assert any(not torch.equal(before[n], state[n]) for n in before), "nothing learnt"


DEFENDED = ("defense.nopeek_alpha=0.5", "defense.noise_sigma=0.1", "defense.dropout=0.2")


@pytest.mark.parametrize("arch, cut, topology, defense", [
    ("cnn5", 2, "u_shape", ()), ("resnet50", "layer2", "u_shape", ()),
    ("cnn5", 3, "label_sharing", ()), ("cnn5", 0, "label_sharing", ()),
    ("cnn5", 2, "u_shape", DEFENDED)])
def test_one_split_step_is_the_one_process_step(world, stop, arch, cut, topology, defense):
    """u_shape: activation, features, feature gradient, activation gradient; label_sharing:
    activation and labels, loss, activation gradient (none with cnn5 cut 0, where the client
    holds no layer). Either way the step is the one-process step, bit for bit, and so with
    every defense on: the same dropout mask and noise from the same RNG state, the NoPeek
    term's gradient added to the extractor's. The modules are freshly built, so in training
    mode, as ``train_epoch`` sets them."""
    cfg = make_cfg(arch, cut, topology, *defense)
    ctxs = contexts(cfg, world, stop)
    cloud_side, client_side, whole = roles(cfg, ctxs)
    x, y = batch(0)
    parts = {"extractor": client_side.extractor, "cloud": cloud_side.cloud,
             "classifier": client_side.classifier or cloud_side.head}
    before = {part: copy.deepcopy(m.state_dict()) for part, m in parts.items()}

    def serve():
        ctx = ctxs[SERVER]
        a = ctx.transport.recv(CLIENT, Kind.ACTIVATION)
        server.train_step(ctx, cloud_side, [server.Request(CLIENT, CLIENT, a, 0, 0, 0)])

    def step():
        ctx = ctxs[CLIENT]
        return client._finish_step(ctx, client_side,
                                   *client._send_activation(ctx, client_side, x, y, 0.0))

    torch.manual_seed(1)  # the client's thread draws the defense's randomness from it
    loss, correct = loopback.run(serve, step)[CLIENT]
    torch.manual_seed(1)
    assert (loss, correct) == monolithic.step(whole, x, y)
    for part, module in parts.items():
        assert_same_step(module, getattr(whole.parts, part), before[part])
    at_client, at_server = (ctxs[r].transport.counters() for r in (CLIENT, SERVER))
    assert at_client["bytes_sent"] == at_server["bytes_received"]
    assert at_server["bytes_sent"] == at_client["bytes_received"]


@pytest.mark.parametrize("arch, cut, topology", [
    ("cnn5", 2, "u_shape"), ("resnet50", "layer1", "label_sharing")])
def test_evaluation_is_the_one_process_forward(world, stop, arch, cut, topology):
    """The client's pipelined evaluation (the next batch's forward while the server works)
    against the server's eval phase: the one-process loss and accuracy, batch by batch, and
    no weight or running statistic changes."""
    cfg = make_cfg(arch, cut, topology)
    ctxs = contexts(cfg, world, stop)
    samples = 7
    x, y = batch(1, samples)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)  # batches of 4 and 3
    cloud_side, client_side, whole = roles(cfg, ctxs, loader)
    # running statistics unlike any batch's, so an evaluation in training mode would show
    for m in [client_side.extractor, cloud_side.cloud, whole.parts.extractor, whole.parts.cloud]:
        for norm in (n for n in m.modules() if isinstance(n, nn.BatchNorm2d)):
            norm.running_mean.fill_(0.1)
            norm.running_var.fill_(2.0)

    def serve():
        ctx = ctxs[SERVER]
        served, _ = server.serve_phase(ctx, cloud_side, Kind.EVAL_ACTIVATION, server.eval_step)
        for sends in cloud_side.replies.values():
            ctx.transport.wait(sends)
        return served

    served, tested = loopback.run(serve, lambda: client.evaluate(ctxs[CLIENT], client_side))
    assert served[CLIENT]["batches_served"] == 2
    metrics = tested[CLIENT]

    assert metrics == monolithic.evaluate(whole, loader)
    assert metrics["test_samples"] == samples
    for split, one in [(client_side.extractor, whole.parts.extractor),
                       (cloud_side.cloud, whole.parts.cloud),
                       (client_side.classifier or cloud_side.head, whole.parts.classifier)]:
        assert_same_state(split, one)


def test_float16_on_the_wire_keeps_small_gradients(world):
    """ResNet-50 cut at layer2, fresh, a batch of 32 at 32 px: about 40 % of the activation
    gradient lies below float16's smallest normal number (6.1e-5), where a plain cast keeps
    only a few bits or none. Sent with comm.wire_dtype=float16 it arrives with float16's
    relative precision (2**-11) in every element, none flushed to zero."""
    cfg = config.load(overrides=["model.arch=resnet50", "model.cut=layer2",
                                 "data.image_size=32"])
    parts = models.for_run(cfg)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    with torch.no_grad():
        a = parts.extractor(x)
    a.requires_grad_()
    nn.functional.cross_entropy(parts.classifier(parts.cloud(a)), y).backward()
    grad = a.grad
    assert (grad != 0).all()

    def off(received: torch.Tensor) -> float:
        """The share of elements further from the gradient than float16's precision."""
        return ((received - grad).abs() > 2**-11 * grad.abs()).float().mean().item()

    assert (grad.abs() < torch.finfo(torch.float16).tiny).float().mean() > 0.3
    assert off(grad.half().float()) > 0.15  # a plain cast: about one element in five

    def send():
        Transport(world.comm(CLIENT), "float16").send(grad, SERVER, Kind.ACTIVATION_GRAD)

    def receive():
        return Transport(world.comm(SERVER), "float16").recv(CLIENT, Kind.ACTIVATION_GRAD)

    got = loopback.run(receive, send)[SERVER]
    assert got.dtype == torch.float32 and (got != 0).all()
    assert off(got) == 0


@pytest.mark.parametrize("topology", ["u_shape", "label_sharing"])
def test_a_request_turned_down_leaves_the_client_as_it_was(world, stop, topology):
    """A stopping server answers a training request with an empty reply flagged STOP
    instead of serving it; the client takes that as no step: its BatchNorm statistics and
    random state (dropout drew from it) go back to where they were before the forward,
    and no weight moved on either side."""
    cfg = make_cfg("resnet50", "layer1", topology, "defense.dropout=0.2")
    ctxs = contexts(cfg, world, stop)
    cloud_side, client_side, _ = roles(cfg, ctxs)
    x, y = batch(0)
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    before = {part: copy.deepcopy(m.state_dict())
              for part, m in (("extractor", client_side.extractor), ("cloud", cloud_side.cloud))}

    def changed(part: str, m: nn.Module) -> list[str]:
        return [n for n, v in m.state_dict().items() if not torch.equal(v, before[part][n])]

    def serve():
        ctx = ctxs[SERVER]
        ctx.transport.stopping = True
        ctx.transport.recv(CLIENT, Kind.ACTIVATION)
        server.turn_down(ctx, cloud_side, CLIENT)

    def step():
        ctx = ctxs[CLIENT]
        undo = client._undo_point(ctx, client_side)
        result = client._finish_step(ctx, client_side,
                                     *client._send_activation(ctx, client_side, x, y, 0.0))
        moved = (changed("extractor", client_side.extractor),
                 not torch.equal(torch.get_rng_state(), rng))
        undo()
        return result, moved

    result, (stats_moved, rng_moved) = loopback.run(serve, step)[CLIENT]
    assert result is None  # turned down
    assert stats_moved and all("running" in n or "num_batches" in n for n in stats_moved)
    assert rng_moved
    assert torch.equal(torch.get_rng_state(), rng)
    assert changed("extractor", client_side.extractor) == []
    assert changed("cloud", cloud_side.cloud) == []
