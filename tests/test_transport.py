"""Transport over real MPI ranks: every dtype, odd shapes, wire dtypes, byte counts."""
import pytest

import mpirun


@pytest.mark.parametrize("n", [2, 3])
def test_tensors_cross_byte_for_byte(n):
    proc = mpirun.ok(n, module="check_transport", timeout=120)
    assert proc.stdout.count("transport ok") == n
