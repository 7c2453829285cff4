"""Privacy audit (``audit=true``): per epoch, a check of whether any message a client sent
to the server was a byte-identical copy of one of its raw input batches, single raw input
samples or label batches.

The server digests the payload of every message it receives. At each epoch's end it sends
each client the digests of that client's messages; the client compares them with the
digests of its own raw input batches (and single input samples) and label batches, taken
exactly as they would have been sent (after the wire cast), and returns only the counts of
matches. The server never sees digests of raw data; a match means a raw batch, sample or
label batch crossed the cut unchanged.

It detects byte-identical copies only: it says nothing about a transformed copy (noise
added, a crop, another dtype), nor about what activations and gradients carry of the
inputs and labels (docs/privacy.md).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import torch

from .transport import Kind, Transport

SERIES = ("messages_checked", "input_matches", "label_matches")


def digest(payload: np.ndarray) -> bytes:
    return hashlib.sha256(memoryview(np.ascontiguousarray(payload))).digest()[:16]


class ServerAudit:
    """Digests of every payload received, per client, since the last epoch's end."""

    def __init__(self):
        self.seen: dict[int, list[bytes]] = defaultdict(list)

    def record(self, source: int, kind: Kind, payload: np.ndarray) -> None:
        if payload.size:
            self.seen[source].append(digest(payload))

    def take(self, client: int) -> list[bytes]:
        return self.seen.pop(client, [])

    def state_dict(self) -> dict:
        """The epoch's digests so far, for a checkpoint taken within the epoch."""
        return {k: list(v) for k, v in self.seen.items()}

    def load_state_dict(self, state: dict) -> None:
        self.seen.update({int(k): list(v) for k, v in state.items()})


class ClientAudit:
    """Digests of this client's raw inputs and labels, as each would look on the wire."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.inputs: set[bytes] = set()
        self.labels: set[bytes] = set()

    def see(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach().cpu()
        for as_sent in {self.transport.payload(x, Kind.ACTIVATION).tobytes(),
                        self.transport.payload(x, Kind.LABELS).tobytes()}:
            self.inputs.add(digest(np.frombuffer(as_sent, np.uint8)))
        for row in x.split(1):  # a single sample sent alone is caught too
            self.inputs.add(digest(self.transport.payload(row, Kind.ACTIVATION)))
        self.labels.add(digest(self.transport.payload(y.detach().cpu(), Kind.LABELS)))

    def state_dict(self) -> dict:
        """The epoch's digests so far, for a checkpoint taken within the epoch."""
        return {"inputs": sorted(self.inputs), "labels": sorted(self.labels)}

    def load_state_dict(self, state: dict) -> None:
        self.inputs.update(state["inputs"])
        self.labels.update(state["labels"])

    def check(self, received: list[bytes]) -> dict:
        result = {"messages_checked": len(received),
                  "input_matches": sum(d in self.inputs for d in received),
                  "label_matches": sum(d in self.labels for d in received)}
        self.inputs.clear()
        self.labels.clear()
        return result
