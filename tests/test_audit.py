"""The privacy audit sees every message: it finds nothing in u_shape and does flag what
label_sharing sends (labels; raw inputs too at cnn5 cut 0), proving it can see them."""
import subprocess
import sys

import pytest

import mpirun
from splitmpi import reader


@pytest.mark.parametrize("topology, cut, inputs_leak, labels_leak", [
    ("u_shape", 1, False, False),
    ("label_sharing", 1, False, True),
    ("label_sharing", 0, True, True),
])
def test_audit(tmp_path, topology, cut, inputs_leak, labels_leak):
    mpirun.ok(3, *mpirun.TINY, "audit=true", f"split.topology={topology}", f"model.cut={cut}",
              "output=a.h5", cwd=tmp_path)
    audit = reader.read(tmp_path / "a.h5").groups["audit"]
    for k in ("1", "2"):
        series = audit[k]
        assert (series["messages_checked"] > 0).all()
        assert (series["input_matches"].sum() > 0) == inputs_leak
        assert (series["label_matches"].sum() > 0) == labels_leak
    table = subprocess.run([sys.executable, "-m", "splitmpi.report", "a.h5"], cwd=tmp_path,
                           env=mpirun.env(), capture_output=True, text=True, timeout=120)
    assert "Privacy audit" in table.stdout
    assert ("RAW DATA SENT" in table.stdout) == (inputs_leak or labels_leak)
