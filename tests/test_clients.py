"""Many logical clients on few ranks (clients.count > world size - 1): hosting, sampling,
delays, the shards partition, bad input, and real MPI runs at -n 2, 3 and 4 with many
clients per rank under every schedule, which must equal one client per rank bit for bit
where the order of service is the same, and learn."""
import numpy as np
import pytest
import torch

import mpirun
from splitmpi import config, data, population, reader
from splitmpi.errors import ConfigError

SMALL = ("data.train_size=480", "data.test_size=120", "data.image_size=16",
         "train.batch_size=16", "data.partition=iid")
TIMING = {"train_seconds", "samples_per_s", "queue_wait_seconds", "server_idle_seconds",
          "server_compute_seconds", "classifier_wait_seconds", "phase_end_seconds"}


# --- hosting, sampling, delays -------------------------------------------------------------

@pytest.mark.parametrize("ranks, clients", [(1, 1), (3, 3), (3, 10), (4, 1000), (7, 9)])
def test_ranks_host_contiguous_blocks_of_every_client(ranks, clients):
    blocks = [population.hosted(r, ranks, clients) for r in range(1, ranks + 1)]
    assert [k for b in blocks for k in b] == list(range(1, clients + 1))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1 and min(map(len, blocks)) >= 1


def test_participants_are_a_seeded_draw_per_epoch():
    cfg = config.load(None, ["clients.count=100", "clients.per_epoch=0.1"])
    drawn = [population.participants(cfg, 100, e) for e in range(3)]
    assert all(len(d) == 10 and d == sorted(set(d)) and min(d) >= 1 and max(d) <= 100
               and all(type(k) is int for k in d) for d in drawn)
    assert not np.array_equal(drawn[0], drawn[1])
    assert np.array_equal(drawn[2], population.participants(cfg, 100, 2))
    assert len(population.participants(config.load(None, ["clients.per_epoch=7"]), 100, 0)) == 7
    assert list(population.participants(config.load(), 5, 0)) == [1, 2, 3, 4, 5]


def test_evaluation_schedule_always_ends_with_an_evaluation():
    cfg = config.load(None, ["train.epochs=5", "clients.eval_every=2"])
    assert [population.evaluates(cfg, e) for e in range(5)] == [False, True, False, True, True]
    cfg = config.load(None, ["train.epochs=3", "clients.eval_every=0"])
    assert [population.evaluates(cfg, e) for e in range(3)] == [False, False, True]


def test_delays_come_from_a_list_or_a_seeded_distribution():
    listed = config.load(None, ["clients.delay_ms=[0,10,20]"])
    assert list(population.delays(listed, 3)) == [0.0, 0.01, 0.02]
    uniform = config.load(None, ["clients.delay_ms=uniform:5,15"])
    d = population.delays(uniform, 1000)
    assert d.shape == (1000,) and 0.005 <= d.min() and d.max() <= 0.015 and d.std() > 0.002
    assert np.array_equal(d, population.delays(uniform, 1000))
    lognormal = population.delays(config.load(None, ["clients.delay_ms=lognormal:2,0.5"]), 2000)
    assert np.median(lognormal) == pytest.approx(np.exp(2) / 1000, rel=0.1)


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, world, words", [
    (["clients.count=2"], 4, ["clients.count=2 is smaller than the 3 client ranks",
                              "mpirun -n 3"]),
    (["clients.count=10", "clients.per_epoch=11"], 4, ["clients.per_epoch=11",
                                                       "at most 10"]),
    (["clients.per_epoch=5"], 4, ["clients.per_epoch=5 is more than the 3 clients"]),
    (["clients.per_epoch=0"], 4, ["clients.per_epoch=0 is not positive"]),
    (["clients.per_epoch=1.5"], 4, ["fraction outside (0, 1]"]),
    (["clients.delay_ms=gauss:1,2"], 4, ["clients.delay_ms='gauss:1,2' does not parse",
                                         "uniform:LO,HI"]),
    (["clients.delay_ms=uniform:5"], 4, ["does not parse"]),
    (["clients.delay_ms=uniform:9,1"], 4, ["uniform needs 0 <= LO <= HI"]),
    (["clients.count=6", "clients.delay_ms=[1,2,3]"], 4, ["one delay >= 0 per client (6)"]),
    (["clients.count=6", "split.mode=sfl_v1", "split.share_weights=samples"], 4,
     ["split.mode=sfl_v1 is not supported with more clients", "sfl_v2"]),
    (["clients.count=6", "audit=true"], 4, ["audit=true is not supported"]),
    (["clients.count=6", "data.workers=2"], 4, ["data.workers>0", "data.workers=0"]),
    (["data.partition=[[0],[1]]"], 4, ["lists 2 clients but the run has 3",
                                       "clients.count=2"]),
])
def test_bad_client_settings_are_refused_before_any_work(overrides, world, words):
    with pytest.raises(ConfigError) as err:
        config.check_world(config.load(None, overrides), world)
    text = f"{err.value} {err.value.fix}"
    assert all(w in text for w in words), text


# --- the shards partition ------------------------------------------------------------------

def test_shards_give_each_client_its_shards_of_sorted_labels():
    cfg = config.load(None, ["data.partition=shards", "data.shards_per_client=2"]).data
    targets = np.repeat(np.arange(10), 100)  # 1000 samples, 10 classes
    parts = data.partition(targets, 10, 50, cfg, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert all(len(p) == 20 for p in parts)
    # two shards of 10 sorted samples each: at most two labels per client
    assert max(len(np.unique(targets[p])) for p in parts) <= 2
    assert np.mean([len(np.unique(targets[p])) for p in parts]) > 1.5


def test_a_client_left_without_samples_is_refused_naming_the_fix():
    cfg = config.load(None, ["data.partition=shards", "data.shards_per_client=3"]).data
    with pytest.raises(ConfigError) as err:
        data.partition(np.zeros(5, np.int64), 1, 10, cfg, seed=0)  # 30 shards, 5 not empty
    assert "leaves" in str(err.value) and "fewer data.shards_per_client" in err.value.fix
    with pytest.raises(ConfigError, match="without training samples"):
        data.partition(np.arange(5), 5, 8, config.load(None, ["data.partition=iid"]).data, 0)


# --- real runs -----------------------------------------------------------------------------

def metrics(path) -> dict:
    run = reader.read(path)
    return {k: {n: v for n, v in s.items() if n not in TIMING} for k, s in run.clients.items()}


@pytest.mark.parametrize("model, epochs", [
    ((), 2), (("model.arch=resnet18", "model.cut=layer1", "split.share_bn=local"), 1)],
    ids=["cnn5", "resnet18"])
def test_logical_clients_equal_one_client_per_rank_bit_for_bit(tmp_path, model, epochs):
    """4 clients on 2 client ranks (2 each) against 4 client ranks, sequential schedule
    (the same order of service), sharing on: every metric of every client and each
    client's final extractor and classifier (BatchNorm statistics included) are equal."""
    settings = [*SMALL, f"train.epochs={epochs}", "server.schedule=sequential", *model,
                f"train.checkpoint_every={epochs}"]
    mpirun.ok(5, *settings, "output=ranks.h5", cwd=tmp_path, timeout=300)
    mpirun.ok(3, *settings, "clients.count=4", "output=logical.h5", cwd=tmp_path, timeout=300)
    a, b = metrics(tmp_path / "ranks.h5"), metrics(tmp_path / "logical.h5")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for k in a:
        for name, values in a[k].items():
            assert np.array_equal(values, b[k][name], equal_nan=True), (k, name)
    for k in a:
        parts = [population.saved_client(tmp_path / f"{name}.h5.ckpt" / f"epoch-{epochs:05d}", k)
                 for name in ("ranks", "logical")]
        for part in ("extractor", "classifier"):
            for name, tensor in parts[0][part].items():
                assert torch.equal(tensor, parts[1][part][name]), (k, part, name)


@pytest.mark.parametrize("n, clients, schedule, share", [
    (4, 30, "fifo", "true"), (4, 30, "round_robin", "false"), (2, 12, "sequential", "true")])
def test_many_clients_per_rank_train_sample_share_and_learn(tmp_path, n, clients, schedule,
                                                             share):
    """Half the clients take part in each epoch (the draw recorded per epoch), each with
    its own seeded delay; every client is evaluated after epoch 2 and 3 only; the sharing
    participants end with one extractor, a client that sat the last epoch out keeps its own;
    with sharing, the clients learn (without it each trains its own extractor and
    classifier on about 6 steps of 16 samples, and only the loss need fall)."""
    epochs = 3
    mpirun.ok(n, *SMALL, "data.train_size=1920", f"train.epochs={epochs}",
              f"clients.count={clients}", "clients.per_epoch=0.5", "clients.eval_every=2",
              "clients.delay_ms=uniform:0,2", f"server.schedule={schedule}", f"split.share={share}",
              "train.checkpoint_every=3", "output=r.h5", cwd=tmp_path, timeout=300)
    run = reader.read(tmp_path / "r.h5")
    cfg = config.load(None, [f"clients.count={clients}", "clients.per_epoch=0.5"])
    assert run.finished and len(run.clients) == clients
    took = np.array([[run.clients[k]["participated"][e] for k in run.clients]
                     for e in range(epochs)])
    for e in range(epochs):
        assert list(np.flatnonzero(took[e]) + 1) == list(population.participants(cfg, clients, e))
    for s in run.clients.values():
        sat_out = s["participated"] == 0
        assert np.isnan(s["train_loss"][sat_out]).all()
        assert (s["train_samples"][sat_out] == 0).all()
        assert (s["batches_served"][sat_out] == 0).all()
        assert (s["batches_served"][~sat_out] == np.ceil(s["train_samples"][~sat_out] / 16)).all()
        assert np.isnan(s["test_accuracy"][0]) and np.isfinite(s["test_accuracy"][1:]).all()
    losses = [np.nanmean([run.clients[k]["train_loss"][e] for k in run.clients])
              for e in range(epochs)]
    accuracy = np.mean([s["test_accuracy"][-1] for s in run.clients.values()])
    if share == "true":
        assert losses[-1] < 0.85 * losses[0], losses
        assert accuracy > 0.2, accuracy  # ten classes: chance is 0.1
    else:
        assert losses[-1] < losses[0], losses
    folder = tmp_path / "r.h5.ckpt" / "epoch-00003"
    last = population.participants(cfg, clients, epochs - 1)
    absent = next(k for k in range(1, clients + 1) if k not in last)
    saved = {k: population.saved_client(folder, k)["extractor"] for k in (*last[:3], absent)}
    first = saved[last[0]]
    same = [all(torch.equal(saved[k][name], first[name]) for name in first) for k in saved]
    assert same == ([True, True, True, False] if share == "true" else [True, False, False, False])


@pytest.mark.parametrize("mode", [
    ("split.mode=sfl_v2", "server.schedule=sequential"),
    ("split.mode=parallel", "server.schedule=fifo", "split.topology=label_sharing",
     "split.share=false")], ids=["sfl_v2", "parallel-label_sharing"])
def test_modes_and_label_sharing_with_many_clients_per_rank(tmp_path, mode):
    """8 clients on 2 ranks, 6 taking part each epoch: SplitFed v2 (each rank's clients in
    an order drawn per epoch) and parallel split learning with the labels on the server
    train every participant's batches, and the clients learn."""
    mpirun.ok(3, *SMALL, "data.train_size=1920", "train.epochs=2", "clients.count=8",
              "clients.per_epoch=6", *mode,
              "output=m.h5", cwd=tmp_path)
    run = reader.read(tmp_path / "m.h5")
    took = run.series["participated"] == 1
    assert (took.sum(axis=1) == 6).all()
    assert (run.series["batches_served"][took] ==
            np.ceil(run.series["train_samples"][took] / 16)).all()
    losses = np.nanmean(run.series["train_loss"], axis=1)
    assert losses[-1] < 0.8 * losses[0], losses
