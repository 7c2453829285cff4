"""SplitFed (``split.mode``): v1 trains a cloud copy per client and averages the copies by
samples after every epoch, v2 serves the clients one after another in an order drawn per
epoch; both average the extractors. Each learns as vanilla split learning does."""
import numpy as np
import pytest
import torch
from torch import nn

import mpirun
from splitmpi import config, reader, sharing
from splitmpi.errors import ConfigError


def test_weighted_mean_is_the_sample_weighted_mean_of_the_copies():
    torch.manual_seed(0)
    copies = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    for i, m in enumerate(copies):
        m(torch.randn(8, 3))  # BatchNorm statistics of their own
        m[1].num_batches_tracked += i
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in copies]
    weights = [10, 30, 60]
    sharing.weighted_mean(copies, weights)
    for name, first in before[0].items():
        if first.is_floating_point():
            want = sum(w * s[name] for w, s in zip(weights, before)) / 100
            for m in copies:
                torch.testing.assert_close(m.state_dict()[name], want, rtol=1e-6, atol=1e-7)
        else:
            assert all(m.state_dict()[name] == 3 for m in copies)  # the most steps


@pytest.mark.parametrize("overrides, words", [
    (["split.mode=sfl_v2"], ["server.schedule=round_robin", "server.schedule=sequential"]),
    (["split.mode=sfl_v1", "split.share=false"], ["split.share=false", "split.share=true"]),
    (["split.mode=sfl_v1"], ["FedAvg", "split.share_weights=samples"]),
    (["split.mode=parallel"], ["split.mode='parallel' is not supported", "sl, sfl_v1"]),
])
def test_modes_refuse_what_they_cannot_honour(overrides, words):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    text = f"{err.value} {err.value.fix}"
    assert all(w in text for w in words), text


def test_splitfed_learns_as_sequential_split_learning(tmp_path):
    """iid shards, 3 clients, 3 epochs: sequential SL (SplitFed's baseline), v1 and v2 each
    learn; after an epoch v1's copies are one model, which the server evaluates with."""
    runs = {}
    for mode, extra in (("sl", []), ("sfl_v1", ["split.share_weights=samples"]),
                        ("sfl_v2", [])):
        mpirun.ok(4, "train.epochs=3", "data.image_size=16", "data.partition=iid",
                  "server.schedule=sequential",
                  f"split.mode={mode}", *extra, "train.checkpoint_every=3",
                  f"output={mode}.h5", cwd=tmp_path, timeout=300)
        runs[mode] = reader.read(tmp_path / f"{mode}.h5")
    for mode, run in runs.items():
        for k, series in run.clients.items():
            # v1 averages its clouds once an epoch, so it learns slower per epoch (8 epochs
            # at 32 px: mean training accuracy 0.10, 0.13, 0.23, 0.35, 0.52, 0.61, 0.71, 0.75)
            chance = 1 / len(run.classes[k])
            assert series["test_accuracy"][-1] > 2 * chance, (mode, k)
            assert series["train_accuracy"][-1] > series["train_accuracy"][0] + 0.1, (mode, k)
            assert series["train_loss"][-1] < 0.9 * series["train_loss"][0], (mode, k)
    saved = torch.load(tmp_path / "sfl_v1.h5.ckpt" / "epoch-00003" / "rank-0.pt",
                       weights_only=True)["state"]
    assert sorted(saved["copies"]) == [1, 2, 3]
    for copy in saved["copies"].values():
        for name, tensor in saved["cloud"].items():
            assert torch.equal(copy["cloud"][name], tensor), name
    means = {m: np.mean(list(r.final("train_accuracy").values())) for m, r in runs.items()}
    print(means)
