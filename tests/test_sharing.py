"""Sharing really averages the extractors over the client-only communicator."""
import pytest

import mpirun


@pytest.mark.parametrize("n", [2, 4])
def test_extractors_become_the_mean(n):
    proc = mpirun.ok(n, module="check_sharing", timeout=180)
    assert proc.stdout.count("sharing ok") == n - 1
