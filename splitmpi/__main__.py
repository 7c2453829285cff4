import os
import sys

# A rank's numpy does no heavy linear algebra (torch does, with runtime.pick_threads's
# share of the cores): without this OpenBLAS starts a thread per core in every rank, idle.
# Read when numpy is first imported, which is below. An explicit value in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .cli import main  # noqa: E402

sys.exit(main())
