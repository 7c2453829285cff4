"""Run under mpiexec on the two simulated hosts of tests/two_hosts.py (2 ranks on each):
``python -m check_hosts NIC CROSS_BYTES LOCAL_BYTES [hold]``.

Rank 0 prints one line ``hosts {json}``: each rank's host name, pid, node-local rank
(``splitmpi.runtime.local_comm``), the device ``pick_device`` gives it (here, and as on
a node with 2 GPUs), its CPU affinity and ``node_cores``; and, per host, what its network
interface NIC counted while every rank swapped CROSS_BYTES with its peer on the other host
(same local rank) and LOCAL_BYTES with the other rank of its own host, each byte checked.
With ``hold`` the ranks then keep exchanging small messages across the hosts, until
killed (for the test of what one killed rank does to the job)."""
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from splitmpi.runtime import local_comm, node_cores, pick_device

nic, cross_bytes, local_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hold = sys.argv[4:] == ["hold"]

world = MPI.COMM_WORLD
rank = world.Get_rank()
local = local_comm(world)
local_rank = local.Get_rank()
host = socket.gethostname()
device = pick_device("auto", local_rank)
available, count = torch.cuda.is_available, torch.cuda.device_count
torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 2)
device_2gpus = pick_device("auto", local_rank)  # no CUDA call made: only the choice
torch.cuda.is_available, torch.cuda.device_count = available, count
me = {"rank": rank, "host": host, "pid": os.getpid(), "local_rank": local_rank,
      "local_size": local.Get_size(), "device": str(device),
      "device_2gpus": str(device_2gpus), "affinity": sorted(os.sched_getaffinity(0)),
      "node_cores": node_cores(local)}
ranks = world.allgather(me)

# each rank's peer: the rank with its local rank on the other host
hosts = sorted({r["host"] for r in ranks})
assert len(hosts) == 2, hosts
peer = next(r["rank"] for r in ranks if r["host"] != host and r["local_rank"] == local_rank)


def data(source: int, size: int, salt: int) -> np.ndarray:
    return np.random.default_rng([source, salt]).integers(0, 256, size, dtype=np.uint8)


def counters() -> dict[str, int]:
    stats = Path("/sys/class/net", nic, "statistics")  # this network namespace's NIC
    return {f: int((stats / f).read_text()) for f in ("rx_bytes", "tx_bytes")}


def swap(comm, other: int, size: int, salt: int, mine: int) -> None:
    got = np.empty(size, np.uint8)
    comm.Sendrecv(data(mine, size, salt), dest=other, recvbuf=got, source=other)
    assert np.array_equal(got, data(other, size, salt)), (rank, other)


world.Barrier()
before = counters() if local_rank == 0 else None
world.Barrier()  # every count is read before the first byte goes
swap(world, peer, cross_bytes, 1, rank)
swap(local, 1 - local_rank, local_bytes, 2, local_rank)
world.Barrier()  # every byte arrived
after = counters() if local_rank == 0 else None
seen = world.gather((host, before, after))
if rank == 0:
    nics = {h: {k: a[k] - b[k] for k in a} for h, b, a in seen if b is not None}
    print("hosts " + json.dumps({"ranks": ranks, "nic": nics,
                                 "cross_bytes_per_rank": cross_bytes,
                                 "local_bytes_per_rank": local_bytes}), flush=True)
if hold:
    beat = np.zeros(1024, np.uint8)
    while True:  # blocked on the peer across the hosts, as training ranks are on each other
        world.Sendrecv(beat, dest=peer, recvbuf=np.empty_like(beat), source=peer)
        time.sleep(0.01)
