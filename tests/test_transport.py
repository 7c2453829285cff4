"""Transport over real MPI ranks: every dtype, odd shapes, wire dtypes, byte counts,
recycled receive memory, with either way of waiting."""
import pytest

import mpirun


@pytest.mark.parametrize("n, wait", [(2, "spin"), (3, "spin"), (3, "sleep")])
def test_tensors_cross_byte_for_byte(n, wait):
    proc = mpirun.ok(n, wait, module="check_transport", timeout=120)
    assert proc.stdout.count(f"transport ok ({wait})") == n
