"""Run under mpiexec: each rank prints its own affinity and what ``node_cores`` makes of
the node (the union over the node's ranks)."""
import os

from mpi4py import MPI

from splitmpi.runtime import local_comm, node_cores

local = local_comm(MPI.COMM_WORLD)
print(f"rank {MPI.COMM_WORLD.Get_rank()}: own {len(os.sched_getaffinity(0))} "
      f"node {node_cores(local)}", flush=True)
