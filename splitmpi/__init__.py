"""splitmpi: split learning over MPI (U-shaped and label-sharing topologies)."""

__version__ = "0.1.0"
