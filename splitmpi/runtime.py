"""What a rank knows about where it runs: communicators, device, threads, waiting."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import signal
import sys
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from mpi4py import MPI

from .config import Config
from .errors import ConfigError
from .transport import Kind, Transport

log = logging.getLogger(__name__)

SERVER = 0
STOPPED = 75  # exit code: stopped by SIGUSR1/SIGTERM after a checkpoint; resume to go on
DEFER_DYNAMO = "SPLITMPI_DEFER_DYNAMO"  # =0: let torch import torch._dynamo as it would


class _DeferredDynamo(types.ModuleType):
    """Stands in for ``torch._dynamo`` until something needs more than eager optimizers do.

    ``torch.optim`` imports ``torch._dynamo`` at an optimizer's first ``add_param_group``
    and in every ``step`` only to call ``disable(fn)`` and ``graph_break()``, which do
    nothing in an eager process; the import brings sympy, triton and torch._inductor along:
    45-70 MB of a rank's memory in a run (110 MB in a process alone) and 1.5 s of CPU at
    start (BENCHMARKS.md and docs/profiling.md, Memory per rank).
    Any other use (an attribute, ``from torch._dynamo import x``, ``import torch._dynamo.x``,
    ``torch.compile``) imports the real module in its place first and goes on with it; a
    function ``disable`` wrapped before then defers to the real ``disable`` from then on."""

    def __init__(self):
        super().__init__("torch._dynamo")
        object.__setattr__(self, "_real", None)

    def disable(self, fn=None, recursive=True, **kw):
        if fn is None:
            return lambda f: self.disable(f, recursive, **kw)
        disabled = []

        def run(*args, **kwargs):
            if self._real is None:
                return fn(*args, **kwargs)
            if not disabled:
                disabled.append(self._real.disable(fn, recursive, **kw))
            return disabled[0](*args, **kwargs)
        return run

    def graph_break(self, *args, **kwargs):
        if self._real is not None:
            return self._real.graph_break(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__") and name not in ("__path__", "__all__"):
            raise AttributeError(name)  # probes such as inspect.getmodule's __file__
        return getattr(self._load(name), name)

    def __setattr__(self, name, value):  # a submodule imported through the stand-in
        if self._real is not None:
            setattr(self._real, name, value)
        object.__setattr__(self, name, value)

    def _load(self, why: str):
        if self._real is None:
            log.debug(f"torch._dynamo imported after all (for {why!r})")
            if sys.modules.get("torch._dynamo") is self:
                del sys.modules["torch._dynamo"]
            if torch.__dict__.get("_dynamo") is self:
                del torch._dynamo
            object.__setattr__(self, "_real", importlib.import_module("torch._dynamo"))
        return self._real


class _ImportedAlready(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import torch._dynamo.x`` through the stand-in: its ``__path__`` imports the real
    package, which may import ``x`` itself; then hand back that module, not a second copy.
    (An import finds a module already in ``sys.modules`` only there; a reload, which passes
    its ``target``, is left alone.)"""

    def find_spec(self, name, path, target=None):
        if target is None and name.startswith("torch._dynamo.") and name in sys.modules:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        module = sys.modules[spec.name]
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        if getattr(module, "__spec__", None) is not self._spec:  # the machinery set ours
            try:
                module.__spec__ = self._spec
            except AttributeError:  # a module that refuses (it kept its own then)
                pass


def defer_dynamo() -> bool:
    """Put ``_DeferredDynamo`` in place of ``torch._dynamo`` unless it is imported already
    or ``SPLITMPI_DEFER_DYNAMO=0``. True where the stand-in is (now) in place."""
    current = sys.modules.get("torch._dynamo")
    if isinstance(current, _DeferredDynamo):
        return True
    if current is not None or os.environ.get(DEFER_DYNAMO, "1") == "0":
        return False
    if importlib.util.find_spec("torch._dynamo") is None:
        return False
    stand_in = _DeferredDynamo()
    sys.modules["torch._dynamo"] = stand_in
    torch._dynamo = stand_in
    if not any(isinstance(f, _ImportedAlready) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportedAlready())
    return True


class StopFlag:
    """Set by SIGUSR1 (Slurm's --signal) or SIGTERM (preemption). A rank that gets it
    stops at its next training step boundary (or at the epoch's end outside the training
    phase), tells the others through the messages of the step (``transport.Flag.STOP``),
    and every rank writes a checkpoint holding its place in the epoch (``client.py``,
    ``server.py``). ``steps`` counts this rank's training steps; ``signal_step`` is the
    count when the signal came, so the log can say how many steps the stop took."""

    def __init__(self):
        self.signal = 0
        self.steps = 0
        self.signal_step: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        if not self.signal:
            self.signal_step = self.steps
        self.signal = signum

    def after(self) -> str:
        """How many steps this rank took between its signal and the stop, for the log."""
        if self.signal_step is None:
            return "no signal here"
        return (f"signal {self.signal} at training step {self.signal_step}, "
                f"{self.steps - self.signal_step} step(s) before stopping")


@dataclass
class Context:
    cfg: Config
    world: MPI.Comm
    clients_comm: MPI.Comm | None  # client-only sub-communicator; None on the server
    client_count: int  # client ranks (world size - 1)
    device: torch.device
    transport: Transport
    stop: StopFlag

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER

    def autocast(self):
        """bf16 mixed precision where ``train.amp=bf16``; a no-op context otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.train.amp == "bf16")


def local_comm(world: MPI.Comm) -> MPI.Comm:
    return world.Split_type(MPI.COMM_TYPE_SHARED)


def client_comm(world: MPI.Comm) -> MPI.Comm | None:
    """The clients' own communicator, over which they share extractors; None on the server.
    Collective over ``world``."""
    rank = world.Get_rank()
    comm = world.Split(MPI.UNDEFINED if rank == SERVER else 1, rank)
    return None if comm == MPI.COMM_NULL else comm


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``cuda:local_rank % n`` when CUDA is there (auto) or demanded (cuda), else the CPU."""
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise ConfigError("train.device=cuda but no CUDA device is visible to this rank",
                          "use train.device=auto or cpu, or run on a GPU node")
    if choice == "cpu" or not available:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def node_cores(local: MPI.Comm | None = None) -> int:
    """Distinct cores this node's ranks may run on: the union of their affinity masks
    (under Slurm's binding each rank sees only its own cores). Collective over ``local``."""
    if hasattr(os, "sched_getaffinity"):
        mine = set(os.sched_getaffinity(0))
    else:
        mine = set(range(os.cpu_count() or 1))
    if local is not None:
        mine = set().union(*local.allgather(mine))
    return len(mine)


def pick_threads(requested: int, ranks_on_node: int, cores: int) -> int:
    """Share the node's cores between its ranks: oversubscribed BLAS threads crawl."""
    if requested > 0:
        return requested
    return max(1, cores // ranks_on_node)


def pick_wait(choice: str, ranks_on_node: int, cores: int) -> str:
    """``comm.wait=auto``: a rank that spins while waiting takes a core from one that
    computes whenever the node has more ranks than cores, so sleep there; else spin."""
    if choice != "auto":
        return choice
    return "sleep" if ranks_on_node > cores else "spin"


CLOCK_PINGS = 5


def clock_offsets(world: MPI.Comm) -> dict[int, int]:
    """Collective. On rank 0, per other rank: the nanoseconds to add to its
    ``time.monotonic_ns()`` to read rank 0's clock (ranks on one host share that clock;
    across hosts it differs arbitrarily), so the server can tell when a request was sent.
    Of a few ping-pongs the one with the shortest round trip is kept: its midpoint is off
    by at most half of it. Empty on other ranks."""
    if world.Get_rank() != SERVER:
        for _ in range(CLOCK_PINGS):
            world.recv(source=SERVER, tag=Kind.CLOCK)
            world.send(time.monotonic_ns(), dest=SERVER, tag=Kind.CLOCK)
        return {}
    offsets = {}
    for k in range(1, world.Get_size()):
        trips = []
        for _ in range(CLOCK_PINGS):
            asked = time.monotonic_ns()
            world.send(None, dest=k, tag=Kind.CLOCK)
            theirs = world.recv(source=k, tag=Kind.CLOCK)
            answered = time.monotonic_ns()
            trips.append((answered - asked, (asked + answered) // 2 - theirs))
        offsets[k] = min(trips)[1]
    return offsets


def make_context(cfg: Config, world: MPI.Comm, clients: int) -> Context:
    """Collective: every rank calls it; the collectives come before anything can raise
    (a ConfigError from ``pick_device``), so ``cli.agree`` can take the error to every rank."""
    local = local_comm(world)
    local_rank, ranks_on_node = local.Get_rank(), local.Get_size()
    cores = node_cores(local)
    local.Free()
    rank = world.Get_rank()
    clients_comm = client_comm(world)
    threads = pick_threads(cfg.train.threads, ranks_on_node, cores)
    torch.set_num_threads(threads)
    wait = pick_wait(cfg.comm.wait, ranks_on_node, cores)
    transport = Transport(world, cfg.comm.wire_dtype, cfg.comm.gpu_aware, wait,
                          cfg.comm.compress, cfg.comm.compress_grad)
    device = pick_device(cfg.train.device, local_rank)
    role = "server" if rank == SERVER else f"client {rank}"
    log.info(f"{role} on {device}, {threads} torch threads, waits by {wait} "
             f"({ranks_on_node} ranks, {cores} cores on this node)")
    return Context(cfg, world, clients_comm, clients, device, transport, StopFlag())


# Variables a launcher sets in every task it starts, with the count of tasks it started, and
# who sets them; first match wins. Step-level only: sbatch gives the batch script itself
# SLURM_NTASKS (the allocation's), but only srun gives its tasks SLURM_STEP_NUM_TASKS.
LAUNCH_SIZES = (
    ("SLURM_STEP_NUM_TASKS", "srun"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "a PMI launcher (MPICH's mpiexec, srun --mpi=pmi2)"),
)


def check_launch(world_size: int, environ: Mapping[str, str]) -> None:
    """Refuse a world of one rank that the launcher started as one of several tasks.

    A launcher whose process-management interface the MPI library does not speak (Open MPI 5
    under ``srun --mpi=pmi2``, plain ``srun`` or MPICH's ``mpiexec``) does not fail: every
    task initialises MPI alone, as rank 0 of a world of 1. Without this check each copy would
    report a bad world size and hide the real cause (docs/cluster.md, Launchers)."""
    if world_size != 1:
        return
    for name, launcher in LAUNCH_SIZES:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            raise ConfigError(
                f"the environment says {value} tasks ({name}={value}, set by {launcher}) but "
                "MPI started a world of 1 rank: the launcher and the MPI library that mpi4py "
                "loads do not match, so each task runs alone",
                "use srun --mpi=pmix for Open MPI 5 and srun --mpi=pmi2 for MPICH (srun "
                "--mpi=list shows what Slurm offers), or the mpirun of the MPI that mpi4py "
                "uses (python -c 'from mpi4py import MPI; print(MPI.Get_library_version())'); "
                "see docs/cluster.md")
