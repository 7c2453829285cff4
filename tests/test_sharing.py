"""Sharing really averages the extractors over the client-only communicator (with every
split.share_weights and split.share_optimizer), and with BatchNorm (ResNet-50) sharing
learns as well as not sharing."""
import numpy as np
import pytest
import torch

import datasets
import mpirun
from splitmpi import config, data, models, population, reader, sharing


@pytest.mark.parametrize("n", [2, 4])
def test_extractors_become_the_mean(n):
    proc = mpirun.ok(n, module="check_sharing", timeout=180)
    assert proc.stdout.count("sharing ok") == n - 1


@pytest.mark.parametrize("share", [True, False])
def test_after_an_epoch_extractors_are_shared_or_kept(tmp_path, share):
    """End to end: the checkpoint after epoch 1 holds each client's extractor."""
    mpirun.ok(4, *mpirun.TINY, "train.epochs=1", "train.checkpoint_every=1",
              f"split.share={share}", "output=s.h5", cwd=tmp_path)
    extractors = saved_extractors(tmp_path / "s.h5.ckpt" / "epoch-00001")
    same = [all(torch.equal(e[name], extractors[0][name]) for name in e)
            for e in extractors[1:]]
    assert all(same) if share else not any(same)


def test_cnn5_results_do_not_depend_on_share_bn(tmp_path):
    """cnn5 has no BatchNorm: every share_bn mode averages exactly what sharing always did."""
    for mode in ("average", "recalibrate"):
        mpirun.ok(4, *mpirun.TINY, f"split.share_bn={mode}", f"output={mode}.h5",
                  cwd=tmp_path)
    a, b = reader.read(tmp_path / "average.h5"), reader.read(tmp_path / "recalibrate.h5")
    for k in a.clients:
        for name in ("train_loss", "test_loss", "test_accuracy", "share_buffer_bytes"):
            assert np.array_equal(a.clients[k][name], b.clients[k][name]), (k, name)


# --- split.share_optimizer and split.share_weights end to end ----------------------------

LEARN = (*mpirun.TINY, "train.epochs=8", "data.partition=[[0,1,2,3,4,5,6],[7,8,9]]")


@pytest.fixture(scope="module")
def two_clients(tmp_path_factory):
    """cnn5 on two clients of 7 and 3 classes (training shards of 210 and 90 samples, so
    the weighting matters), 8 epochs: ``two_clients(*overrides)`` -> the run's results,
    made on first use and kept for the module."""
    folder = tmp_path_factory.mktemp("learn")
    runs = {}

    def run(*overrides):
        if overrides not in runs:
            output = f"run{len(runs)}.h5"
            mpirun.ok(3, *LEARN, *overrides, f"output={output}", cwd=folder)
            runs[overrides] = reader.read(folder / output)
        return runs[overrides]
    return run


def pooled_accuracy(results):
    """Final test accuracy over every client's test samples."""
    clients = results.clients.values()
    return (sum(s["test_accuracy"][-1] * s["test_samples"][-1] for s in clients)
            / sum(s["test_samples"][-1] for s in clients))


@pytest.mark.parametrize("setting, times, plus", [("split.share_optimizer=average", 2, 0),
                                                  ("split.share_optimizer=reset", 1, 0),
                                                  ("split.share_weights=samples", 1, 4)])
def test_share_optimizer_and_share_weights_learn(two_clients, setting, times, plus):
    """Each non-default setting reaches the Allreduce (its buffer: the momentum doubles it,
    the sample total adds one float32), every client's training loss falls, and test
    accuracy is not below the defaults' by more than a few points."""
    default, run = two_clients(), two_clients(setting)
    for k, s in run.clients.items():
        default_bytes = default.clients[k]["share_buffer_bytes"][-1]
        assert s["share_buffer_bytes"][-1] == times * default_bytes + plus
        assert s["train_loss"][-1] < 0.5 * s["train_loss"][0], (k, s["train_loss"])
    assert pooled_accuracy(default) > 0.5  # chance: 0.2
    assert pooled_accuracy(run) >= pooled_accuracy(default) - 0.05


def test_recalibrate_re_estimates_the_statistics_of_the_weights_it_has():
    """Running mean and variance become the equal-weight average of the batches' own
    statistics (as BatchNorm's momentum=None does), whatever they were before; weights,
    the step counter, momentum and the train/eval mode are left alone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    norm = net[1]
    norm.running_mean.fill_(7.0)
    norm.num_batches_tracked.fill_(11)
    weights = [p.clone() for p in net.parameters()]
    batches = [torch.randn(5, 2, 6, 6) * (i + 1) + i for i in range(4)]
    net.eval()
    assert sharing.recalibrate(net, iter(batches), batches=3) == 15
    with torch.no_grad():
        outs = [net[0](x) for x in batches[:3]]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(norm.running_mean, mean, atol=1e-5)
    assert torch.allclose(norm.running_var, var, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))
    assert int(norm.num_batches_tracked) == 11 and norm.momentum == 0.1
    assert not net.training


def test_shared_tensors_by_mode():
    """average: parameters + running stats; local: no BatchNorm tensor at all;
    recalibrate: every parameter (the statistics are re-estimated, not averaged)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    conv, norm = net
    where = {mode: [t.data_ptr() for t in sharing.shared_tensors(net, mode)]
             for mode in ("average", "local", "recalibrate")}
    params = [p.data_ptr() for p in net.parameters()]
    stats = [norm.running_mean.data_ptr(), norm.running_var.data_ptr()]
    assert where["average"] == params + stats
    assert where["recalibrate"] == params
    assert where["local"] == [conv.weight.data_ptr(), conv.bias.data_ptr()]


# --- ResNet-50 (BatchNorm) on class-block clients, the papers' table 1 setting ------------

RESNET = ("data.name=mnist", "model.arch=resnet50", "model.cut=layer2", "data.image_size=16",
          "train.epochs=2", "train.checkpoint_every=2", "train.threads=1")


@pytest.fixture(scope="module")
def class_blocks(tmp_path_factory):
    """MNIST files the network can learn; clients get classes 0-3 / 4-6 / 7-9. Runs are
    made on first use and kept for the module: ``class_blocks(*overrides)`` -> folder."""
    folder = tmp_path_factory.mktemp("blocks")
    datasets.write_mnist(folder / "data", train_per_class=60, test_per_class=20)
    runs = {}

    def run(*overrides):
        if overrides not in runs:
            out = folder / f"run{len(runs)}"
            out.mkdir()
            mpirun.ok(4, *RESNET, f"data.root={folder / 'data'}", *overrides, "output=r.h5",
                      cwd=out, timeout=400)
            runs[overrides] = out
        return runs[overrides]
    return run


def sharing_run(class_blocks, mode):
    """The run with ``split.share_bn=mode``; the default mode's is the plain run."""
    default = config.SplitConfig().share_bn
    return class_blocks() if mode == default else class_blocks(f"split.share_bn={mode}")


def accuracy(folder, best=False):
    """Each client's final test accuracy, or its best over the epochs."""
    pick = max if best else (lambda series: series[-1])
    return {k: pick(s["test_accuracy"]) for k, s in reader.read(folder / "r.h5").clients.items()}


def saved_extractors(folder):
    return [population.saved_client(folder, k)["extractor"] for k in (1, 2, 3)]


def is_norm(name, extractor):
    """BatchNorm tensors of the ResNet extractor (``running_*``, their weight and bias)."""
    return name.rsplit(".", 1)[0] + ".running_mean" in extractor


def test_resnet_sharing_learns_as_well_as_not_sharing(class_blocks):
    """With the default share_bn every client's final test accuracy is at least the best
    of the non-sharing run's epochs, less a few points (plain averaging left it at
    chance). Without sharing a client's test accuracy swings from epoch to epoch: the
    cloud it is tested through was last trained on the other clients' classes."""
    alone = accuracy(class_blocks("split.share=false"), best=True)
    shared = accuracy(class_blocks())
    chance = {1: 1 / 4, 2: 1 / 3, 3: 1 / 3}
    assert all(alone[k] > chance[k] + 0.3 for k in alone), alone  # the data is learnable
    for k in alone:
        assert shared[k] >= alone[k] - 0.05, (k, shared, alone)


@pytest.mark.parametrize("mode", ["average", "local", "recalibrate"])
def test_resnet_share_bn_modes_share_what_they_say(tmp_path, mode):
    """After an epoch's sharing the checkpoints hold equal tensors where the mode shares
    and each client's own where it keeps them (a small ResNet-18 run of its own)."""
    mpirun.ok(4, "model.arch=resnet18", "model.cut=layer1", "data.image_size=8",
              "data.train_size=90", "data.test_size=30", "train.batch_size=30",
              "train.epochs=1", "train.checkpoint_every=1", f"split.share_bn={mode}",
              "output=r.h5", cwd=tmp_path)
    first, *others = saved_extractors(tmp_path / "r.h5.ckpt" / "epoch-00001")
    for name, tensor in first.items():
        if not tensor.is_floating_point():
            continue  # num_batches_tracked counts each client's own steps
        equal = [torch.equal(tensor, other[name]) for other in others]
        norm = is_norm(name, first)
        stats = name.endswith(("running_mean", "running_var"))
        shared = mode == "average" or not norm or (mode == "recalibrate" and not stats)
        assert all(equal) if shared else not any(equal), (mode, name)


def test_recalibrated_statistics_are_the_clients_own(class_blocks):
    """After the last epoch's sharing each client's statistics are those of the shared
    weights on its own training sample: recomputed here from the checkpoint."""
    folder = sharing_run(class_blocks, "recalibrate")
    cfg = config.load(None, [*RESNET, f"data.root={folder.parent / 'data'}"])
    torch.set_num_threads(1)
    for k, saved in enumerate(saved_extractors(folder / "r.h5.ckpt" / "epoch-00002"), 1):
        extractor = models.for_run(cfg).extractor
        extractor.load_state_dict(saved)
        train, _, _ = data.client_loaders(cfg, k, 3)
        sample = data.sample_loader(train, cfg.train.seed, k, epoch=1)
        sharing.recalibrate(extractor, (x for x, _ in sample),
                            cfg.split.bn_recalibrate_batches)
        for name, tensor in extractor.state_dict().items():
            assert torch.allclose(tensor.float(), saved[name].float(), rtol=1e-4,
                                  atol=1e-5), (k, name)
