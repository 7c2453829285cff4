"""splitmpi: split learning over MPI (U-shaped and label-sharing topologies)."""
import os

# Tensors of >= 2 MB in transparent huge pages (read by torch at its first allocation, so
# before torch is imported). MPI moved torch's 4 KiB-paged buffers at half the speed of
# numpy's, which asks for huge pages itself (BENCHMARKS.md, transport). An explicit
# THP_MEM_ALLOC_ENABLE=0 in the environment wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.2.0.dev0"
