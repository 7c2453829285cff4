"""Tensors over MPI as raw buffers: a fixed-size header, then the payload, one tag per kind.

No tensor is ever pickled (pickle moves large arrays ~25x slower here, DESIGN.md 2).
Header and payload of one tensor travel with the same tag, so MPI's non-overtaking rule
keeps them paired. Receives are posted before sends, and every buffer stays referenced
until its request completes.
"""
from __future__ import annotations

import enum
from collections import Counter

import numpy as np
import torch
from mpi4py import MPI


class Kind(enum.IntEnum):
    """Message kinds; each value is also the MPI tag its messages use."""

    ACTIVATION = 11  # client -> server: extractor output of a training batch
    EVAL_ACTIVATION = 12  # client -> server: extractor output of a test batch (no backward)
    LABELS = 13  # client -> server, label_sharing only
    FEATURES = 21  # server -> client: cloud output (u_shape) or logits (label_sharing eval)
    FEATURE_GRAD = 22  # client -> server: gradient w.r.t. the cloud output (u_shape)
    ACTIVATION_GRAD = 23  # server -> client: gradient w.r.t. the activation
    LOSS = 24  # server -> client: (loss, correct) of a label_sharing training batch
    REPORT = 31  # client -> server: end of epoch, the client's metrics (small, pickled)
    AUDIT = 32  # server <-> client, audit=true: message digests, then match counts (pickled)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.uint8, torch.bool]
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_DIMS = 8
HEADER = np.dtype(np.int64)
HEADER_LEN = 3 + MAX_DIMS  # kind, dtype code, ndim, shape


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor's memory (works for bf16 too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class Transport:
    """Send and receive tensors on one communicator, counting bytes and messages.

    ``wire_dtype`` applies to floating-point tensors of the activation and gradient kinds:
    they are cast before sending and cast back to float32 on receipt, halving the bytes
    for bf16/fp16. CUDA tensors are staged through reusable pinned host buffers unless
    ``gpu_aware`` hands device memory to MPI directly.
    """

    WIRE_KINDS = (Kind.ACTIVATION, Kind.EVAL_ACTIVATION, Kind.FEATURES, Kind.FEATURE_GRAD,
                  Kind.ACTIVATION_GRAD)

    def __init__(self, comm: MPI.Comm, wire_dtype: str = "float32", gpu_aware: bool = False):
        self.comm = comm
        self.wire = WIRE_DTYPES[wire_dtype]
        self.gpu_aware = gpu_aware
        self.bytes_sent = Counter()
        self.bytes_received = Counter()
        self.messages_sent = Counter()
        self.messages_received = Counter()
        self._pinned: dict[tuple, torch.Tensor] = {}
        self.on_receive = None  # audit hook: f(source, kind, payload bytes)

    # -- buffers -----------------------------------------------------------------------
    def _wire(self, t: torch.Tensor, kind: Kind) -> torch.Tensor:
        if kind in self.WIRE_KINDS and t.is_floating_point() and t.dtype != self.wire:
            t = t.to(self.wire)
        return t.detach().contiguous()

    def _staging(self, slot: tuple, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A reusable pinned host buffer for CUDA tensors when MPI is not GPU-aware."""
        key = (slot, shape, dtype)
        buf = self._pinned.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
            self._pinned[key] = buf
        return buf

    def _buffer(self, t: torch.Tensor):
        if t.device.type == "cuda":
            torch.cuda.current_stream(t.device).synchronize()  # MPI must see finished data
            return [t.reshape(-1).view(torch.uint8), MPI.BYTE]
        return _bytes_view(t)

    @staticmethod
    def _header(kind: Kind, t: torch.Tensor) -> np.ndarray:
        if t.dim() > MAX_DIMS:
            raise ValueError(f"tensors of more than {MAX_DIMS} dimensions cannot be sent")
        h = np.zeros(HEADER_LEN, dtype=HEADER)
        h[0], h[1], h[2] = int(kind), DTYPE_CODE[t.dtype], t.dim()
        h[3:3 + t.dim()] = t.shape
        return h

    def payload(self, t: torch.Tensor, kind: Kind) -> np.ndarray:
        """The bytes a CPU tensor would cross the wire as (after the wire-dtype cast)."""
        return _bytes_view(self._wire(t, kind))

    # -- sending -----------------------------------------------------------------------
    def isend(self, t: torch.Tensor, dest: int, kind: Kind) -> list:
        """Start sending; returns requests that own their buffers (keep them until Waitall)."""
        t = self._wire(t, kind)
        if t.device.type == "cuda" and not self.gpu_aware:
            host = self._staging(("send", dest, int(kind)), tuple(t.shape), t.dtype)
            host.copy_(t)  # synchronous: the staging buffer is ready when this returns
            t = host
        header = self._header(kind, t)
        payload = self._buffer(t)
        reqs = [self.comm.Isend(header, dest, int(kind)),
                self.comm.Isend(payload, dest, int(kind))]
        self.bytes_sent[kind] += header.nbytes + t.numel() * t.element_size()
        self.messages_sent[kind] += 2
        return [_Owned(r, (header, t, payload)) for r in reqs]

    def send(self, t: torch.Tensor, dest: int, kind: Kind) -> None:
        wait(self.isend(t, dest, kind))

    # -- receiving ---------------------------------------------------------------------
    def recv(self, source: int, kind: Kind, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Receive one tensor of ``kind``; wire-cast kinds come back as ``dtype`` (float32)."""
        header = np.empty(HEADER_LEN, dtype=HEADER)
        self.comm.Recv(header, source, int(kind))
        got, code, ndim = int(header[0]), int(header[1]), int(header[2])
        if got != int(kind):
            raise RuntimeError(f"protocol error: expected {kind.name} from rank {source}, "
                               f"got kind {got}")
        shape = tuple(int(s) for s in header[3:3 + ndim])
        wire_dtype = DTYPES[code]
        device = torch.device(device)
        if device.type == "cuda" and self.gpu_aware:
            out = torch.empty(shape, dtype=wire_dtype, device=device)
            self.comm.Recv(self._buffer(out), source, int(kind))
            if self.on_receive is not None:
                self.on_receive(source, kind, _bytes_view(out.cpu()))
        else:
            host = (torch.empty(shape, dtype=wire_dtype) if device.type == "cpu"
                    else self._staging(("recv", source, int(kind)), shape, wire_dtype))
            self.comm.Recv(_bytes_view(host), source, int(kind))
            if self.on_receive is not None:
                self.on_receive(source, kind, _bytes_view(host))
            out = host if device.type == "cpu" else host.to(device)
        self.bytes_received[kind] += header.nbytes + out.numel() * out.element_size()
        self.messages_received[kind] += 2
        if kind in self.WIRE_KINDS and out.is_floating_point():
            out = out.to(dtype or torch.float32)
        return out

    # -- accounting --------------------------------------------------------------------
    def counters(self) -> dict:
        """Totals since the start: bytes and messages, sent and received."""
        return {"bytes_sent": sum(self.bytes_sent.values()),
                "bytes_received": sum(self.bytes_received.values()),
                "messages_sent": sum(self.messages_sent.values()),
                "messages_received": sum(self.messages_received.values())}


class _Owned:
    """An MPI request that keeps its buffers alive until it completes."""

    __slots__ = ("request", "buffers")

    def __init__(self, request: MPI.Request, buffers: tuple):
        self.request = request
        self.buffers = buffers


def wait(owned: list) -> None:
    MPI.Request.Waitall([o.request for o in owned])
    owned.clear()
