"""Benchmarks, run under mpiexec; rank 0 prints a table and a final ``ratio`` line and
saves JSON (``bench-<name>.json`` in the working folder, or ``--json PATH``).

  mpiexec -n 2 python -m splitmpi.bench transport   # Transport vs raw Send/Recv (and pickle)
  mpiexec -n 2 python -m splitmpi.bench train       # split vs monolithic samples/s, 1 client
  mpiexec -n 4 python -m splitmpi.bench train       # ... 3 clients (N = world size - 1)
  mpiexec -n 4 python -m splitmpi.bench allreduce   # sharing.average vs raw Allreduce

One module a benchmark (``transport``, ``train``, ``allreduce``), ``harness`` for what they
share (interleaved repeats, paired ratios, quiet barriers, the table and the environment)
and ``cli`` for the command. ``--smoke`` runs tiny sizes once (for the tests; its figures
mean nothing). BENCHMARKS.md has the measured numbers.
"""
