"""Sharing really averages the extractors over the client-only communicator."""
import pytest

import mpirun


@pytest.mark.parametrize("n", [2, 4])
def test_extractors_become_the_mean(n):
    proc = mpirun.ok(n, module="check_sharing", timeout=180)
    assert proc.stdout.count("sharing ok") == n - 1


@pytest.mark.parametrize("share", [True, False])
def test_after_an_epoch_extractors_are_shared_or_kept(tmp_path, share):
    """End to end: the checkpoint after epoch 1 holds each client's extractor."""
    import torch
    mpirun.ok(4, *mpirun.TINY, "train.epochs=1", "train.checkpoint_every=1",
              f"split.share={share}", "output=s.h5", cwd=tmp_path)
    folder = tmp_path / "s.h5.ckpt" / "epoch-00001"
    extractors = [torch.load(folder / f"rank-{k}.pt", weights_only=True)["state"]["extractor"]
                  for k in (1, 2, 3)]
    same = [all(torch.equal(e[name], extractors[0][name]) for name in e)
            for e in extractors[1:]]
    assert all(same) if share else not any(same)
