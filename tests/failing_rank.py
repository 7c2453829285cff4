"""Run under mpiexec: ``python -m failing_rank RANK [key=value ...]`` runs splitmpi with
the given rank raising in the middle of its first epoch, as a real bug would."""
import sys

from mpi4py import MPI

from splitmpi import cli, client, server

bad = int(sys.argv[1])
if MPI.COMM_WORLD.Get_rank() == bad:
    role = server if bad == 0 else client
    step = "train_step" if bad == 0 else "evaluate"

    def broken(*args, **kwargs):
        raise RuntimeError(f"deliberate failure on rank {bad}")

    setattr(role, step, broken)
sys.exit(cli.main(sys.argv[2:]))
