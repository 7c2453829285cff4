"""Label leakage in the U-shape: the attacks on feature-gradient rows, the gradient defense,
randomized response on the labels (label DP), their settings, and real runs that measure
them (docs/privacy.md, "Labels in the U-shape")."""
import numpy as np
import pytest
import torch

import mpirun
from splitmpi import config, data, leakage, reader
from splitmpi.defense import Defense
from splitmpi.errors import ConfigError
from splitmpi.report.attacks import attack_tables, best_epoch


def gradient_rows(classes: int, n: int = 300, width: int = 64, seed: int = 0):
    """What a linear classifier sends back: W^T (softmax - onehot(y)) / B per sample."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(classes, width))
    y = rng.integers(0, classes, n) + 5  # labels need not start at 0
    p = rng.dirichlet(np.ones(classes), n)
    return (p - np.eye(classes)[y - 5]) @ w / 32, y


def test_cosine_and_clusters_read_well_separated_rows():
    rows, y = gradient_rows(4)
    found = leakage.score(rows, y, known=4, rng=np.random.default_rng(0))
    assert found["cosine_accuracy"] > 0.98
    assert found["cluster_accuracy"] > 0.98 and found["cluster_known_accuracy"] > 0.98
    assert found["chance"] == 0.25 and found["rows"] == 300
    assert np.isnan(found["norm_auc"])  # four classes
    noise = np.random.default_rng(1).normal(size=rows.shape)
    blind = leakage.score(noise, y, known=4, rng=np.random.default_rng(0))
    assert blind["cosine_accuracy"] < 0.4 and blind["cluster_known_accuracy"] < 0.4


def test_matching_picks_the_best_permutation():
    clusters = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    y = np.array([7, 7, 5, 5, 5, 5, 6, 6, 6, 7])
    assert leakage.match_clusters(clusters, y) == {0: 7, 1: 5, 2: 6}
    # the known rows name the clusters by majority; a cluster without one has no name
    known = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
    assert leakage.name_clusters(clusters, y, known) == {0: 7, 2: 6}


def test_norm_auc_on_two_classes():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    norms = np.where(y == 1, 2.0, 1.0) + rng.uniform(0, 0.5, 100)  # class 1 larger: separable
    rows = norms[:, None] * leakage.directions(rng.normal(size=(100, 8)))
    known = leakage.known_rows(y, 4)
    assert leakage.norm_auc(rows, y, known) == pytest.approx(1.0)
    # the attacker picks the side from its known rows, so the smaller class does as well
    assert leakage.norm_auc(rows, 1 - y, leakage.known_rows(1 - y, 4)) == pytest.approx(1.0)
    even = rng.uniform(1, 2, 100)[:, None] * leakage.directions(rng.normal(size=(100, 8)))
    assert abs(leakage.norm_auc(even, y, known) - 0.5) < 0.2
    assert np.isnan(leakage.norm_auc(rows, y % 3 + np.arange(100) % 3, known))


def test_gradient_defense_clips_each_sample_and_adds_noise():
    g = torch.randn(8, 16) * torch.arange(1, 9)[:, None] / 8
    off = Defense(config.load(None, []).defense)
    assert off.gradient(g) is g
    clip = Defense(config.load(None, ["defense.grad_clip=0.5"]).defense)
    per_sample = clip.gradient(g).reshape(8, -1).norm(dim=1) * 8
    assert torch.allclose(per_sample, (g.norm(dim=1) * 8).clamp(max=0.5))
    torch.manual_seed(0)
    noisy = Defense(config.load(None, ["defense.grad_clip=0.5", "defense.grad_noise=2"]).defense)
    noisy = noisy.gradient(torch.zeros(8, 4096))
    assert (noisy * 8).std().item() == pytest.approx(1.0, rel=0.05)  # 2 x the clip norm


def test_max_norm_hides_the_norm_but_not_the_direction():
    """Two classes whose per-sample rows differ in norm only: the norm attack reads them
    perfectly; after grad_maxnorm every row's expected squared norm is the batch's
    largest, and the norm AUC falls to about one half."""
    torch.manual_seed(0)
    y = np.repeat([0, 1], 64)
    rows = leakage.directions(np.random.default_rng(1).normal(size=(128, 256)))
    rows = torch.tensor(rows * np.where(y == 1, 3.0, 1.0)[:, None], dtype=torch.float32)
    known = leakage.known_rows(y, 4)
    assert leakage.norm_auc(rows.numpy(), y, known) == pytest.approx(1.0)
    defense = Defense(config.load(None, ["defense.grad_maxnorm=true"]).defense)
    sent = (defense.gradient(rows / 128) * 128).numpy()  # per-sample rows, as sent
    assert abs(leakage.norm_auc(sent, y, known) - 0.5) < 0.1
    squares = (sent ** 2).sum(axis=1)
    assert squares[y == 0].mean() == pytest.approx(9.0, rel=0.05)  # 3 ** 2, the largest


def test_randomised_response_keeps_p_and_replaces_uniformly():
    """K-ary randomized response: each label kept with probability e^eps / (e^eps + K - 1),
    else one of the other K - 1 classes, uniformly, never the label itself."""
    k, n, eps = 5, 20_000, 1.0
    labels = np.arange(n) % k
    out = data.randomised_response(labels, k, eps, np.random.default_rng(0))
    p = np.e / (np.e + k - 1)  # 0.405
    kept = out == labels
    assert abs(kept.mean() - p) < 0.015  # 4.5 standard deviations
    for y in range(k):  # the replacements of each label: the other classes, evenly
        counts = np.bincount(out[(labels == y) & ~kept], minlength=k)
        assert counts[y] == 0
        others = np.delete(counts, y)
        expected = others.sum() / (k - 1)
        assert ((others - expected) ** 2 / expected).sum() < 20  # chi-square, 3 dof: p ~ 2e-4
    assert data.randomised_response(labels, k, 50.0, np.random.default_rng(0)).tolist() == \
        labels.tolist()  # a large epsilon keeps (almost) every label
    assert abs((data.randomised_response(labels, k, 0.0, np.random.default_rng(0)) == labels)
               .mean() - 1 / k) < 0.015  # epsilon 0 would be uniform noise


def test_label_epsilon_draws_once_per_sample_and_off_changes_nothing():
    """The draw is a function of (seed, client): two runs of one seed train on the same
    noisy labels, every epoch; another client or seed draws afresh. The train loader then
    yields (image, trained label, true label); the images and the true labels are those of
    the undefended loader, batch for batch. Off, the loader yields pairs as before."""
    on = config.load(None, ["defense.label_epsilon=1", "data.train_size=600"])
    shards = data.Shards(on, [1, 2, 3], 3)
    trained, true = shards.trained_labels(1)
    again, _ = data.Shards(on, [1], 3).trained_labels(1)
    assert np.array_equal(trained, again)
    p = np.e / (np.e + 9)  # the whole label domain: 10 classes
    assert abs((trained == true).mean() - p) < 0.1 and set(trained) - set(true)
    iid = data.Shards(config.load(None, ["defense.label_epsilon=1", "data.train_size=600",
                                         "data.partition=iid"]), [1, 2], 2)
    (t1, y1), (t2, y2) = iid.trained_labels(1), iid.trained_labels(2)
    assert not np.array_equal(t1 == y1, t2 == y2)  # each client its own draws
    reseeded = data.Shards(config.load(None, ["defense.label_epsilon=1",
                                              "data.train_size=600", "train.seed=1"]), [1], 3)
    t, y = reseeded.trained_labels(1)
    assert np.array_equal(y, true) and not np.array_equal(t, trained)
    off = config.load(None, ["data.train_size=600"])
    assert data.Shards(off, [1], 3).trained_labels(1) is None
    plain = data.Shards(off, [1], 3).loaders(1)[0]
    noisy = shards.loaders(1)[0]
    assert not isinstance(plain.dataset.dataset, data.Randomised)
    for epoch in (0, 1):
        plain.sampler.set_epoch(epoch)
        noisy.sampler.set_epoch(epoch)
        order = [i for i, _ in noisy.sampler]
        noisy.sampler.set_epoch(epoch)
        seen = 0
        for (x0, y0), (x, y, truth) in zip(plain, noisy):
            assert torch.equal(x0, x) and torch.equal(y0, truth)
            # the same noisy label for a sample in every epoch
            assert y.tolist() == trained[order[seen:seen + len(y)]].tolist()
            seen += len(y)


@pytest.mark.parametrize("override, words", [
    (["split.topology=label_sharing", "defense.grad_maxnorm=true"], "defense.grad_maxnorm"),
    (["split.topology=label_sharing", "attack.labels=true"], "attack.labels"),
    (["split.topology=label_sharing", "defense.grad_clip=1"], "defense.grad_clip"),
    (["defense.grad_noise=1"], "defense.grad_clip"),
    (["defense.grad_clip=-1"], "at least 0"),
    (["defense.grad_clip=1", "defense.grad_noise=-0.5"], "at least 0"),
    (["attack.label_rows=0"], "attack.label_rows"),
    (["attack.known_labels=0"], "attack.known_labels"),
    (["defense.label_epsilon=-1"], "defense.label_epsilon=-1.0 must be at least 0"),
    (["defense.label_epsilon=nan"], "defense.label_epsilon=nan is not a number"),
])
def test_bad_label_settings_exit_2(override, words):
    with pytest.raises(ConfigError, match=words):
        config.load(None, override)


def last_epoch(path):
    run = reader.read(path)
    return run, {k: {name: float(v[-1]) for name, v in series.items()}
                 for k, series in run.label_inference.items()}


RUN = ("data.image_size=16", "train.epochs=2", "data.partition=[[0,1],[2,3,4]]",
       "attack.labels=true", "attack.label_rows=256")


def test_feature_gradients_leak_the_labels_and_the_audit_stays_clean(tmp_path):
    mpirun.ok(3, *RUN, "audit=true", "output=a.h5", cwd=tmp_path)
    run, found = last_epoch(tmp_path / "a.h5")
    print({k: {n: round(v, 3) for n, v in f.items()} for k, f in found.items()})
    assert run.label_inference[1]["rows"].tolist() == [256, 256]
    for k, f in found.items():
        assert f["cosine_accuracy"] > 0.9 and f["cluster_known_accuracy"] > 0.9, f
        assert f["chance"] == (0.5 if k == 1 else 1 / 3)
    assert np.isfinite(found[1]["norm_auc"]) and np.isnan(found[2]["norm_auc"])
    audit = run.groups["audit"]
    assert all(audit[k]["label_matches"].sum() == 0 for k in ("1", "2"))
    (table,) = [rows for title, rows in attack_tables([run]) if "Label inference" in title]
    assert [r["client"] for r in table] == [1, 2]
    for row, k in zip(table, (1, 2)):  # the attacker's best epoch: never below the last
        series = run.label_inference[k]
        assert row["best_epoch"] == pytest.approx(max(
            np.fmax(series["cosine_accuracy"], series["cluster_accuracy"])), abs=1e-3)
        assert row["best_epoch"] >= max(row["cosine"], row["cluster"])


def test_best_epoch_is_the_attackers_best_epoch_per_client():
    cosine = np.array([[1.0, 0.5], [0.4, np.nan], [0.3, np.nan]])  # (epochs, clients)
    cluster = np.array([[0.9, 0.6], [0.5, np.nan], [np.nan, np.nan]])
    assert best_epoch(cosine, cluster).tolist() == [1.0, 0.6]
    assert np.isnan(best_epoch(np.full((2, 1), np.nan), np.full((2, 1), np.nan))).all()


def test_clipped_noisy_gradients_hide_the_labels(tmp_path):
    mpirun.ok(3, *RUN, "defense.grad_clip=0.1", "defense.grad_noise=1", "output=d.h5",
              cwd=tmp_path)
    run, found = last_epoch(tmp_path / "d.h5")
    print({k: {n: round(v, 3) for n, v in f.items()} for k, f in found.items()},
          {k: (s["train_loss"].round(3).tolist(), s["test_accuracy"].round(3).tolist())
           for k, s in run.clients.items()})
    for f in found.values():
        assert f["cosine_accuracy"] < f["chance"] + 0.25, f
        assert f["cluster_known_accuracy"] < f["chance"] + 0.25, f
    for series in run.clients.values():  # the classifier still learns on its true gradient
        assert np.isfinite(series["train_loss"]).all()
        assert series["train_loss"][-1] < series["train_loss"][0]


def test_randomised_labels_hide_the_labels_and_still_learn(tmp_path):
    """defense.label_epsilon=1 over the 5 classes of the data set: each client trains on
    labels kept with probability p = e / (e + 4) = 0.40, drawn once per sample. The server's
    attacks can at best read the labels trained on, so every score falls from the
    undefended run's 1.0 (above) to near p (near chance for the 2-class client, whose
    other-class rows the attacker must still split), while the model learns: the train
    loss (against the labels trained on) falls and the test accuracy (true labels) is
    above chance."""
    proc = mpirun.ok(3, *RUN, "data.num_classes=5", "defense.label_epsilon=1",
                     "output=r.h5", "-v", cwd=tmp_path)
    for k in (1, 2):  # each client says once how many labels it trains on changed
        assert proc.stdout.count(f"client {k}: randomized response (defense.label_epsilon=1) "
                                 "changed ") == 1, proc.stdout
    run, found = last_epoch(tmp_path / "r.h5")
    print({k: {n: round(v, 3) for n, v in f.items()} for k, f in found.items()},
          {k: (s["train_loss"].round(3).tolist(), s["test_accuracy"].round(3).tolist())
           for k, s in run.clients.items()})
    p = np.e / (np.e + 4)
    for f in found.values():
        for name in ("cosine_accuracy", "cluster_known_accuracy"):
            assert f[name] < max(p, f["chance"]) + 0.25, f
    for k, series in run.clients.items():
        assert series["train_loss"][-1] < series["train_loss"][0]
        assert series["test_accuracy"][-1] > found[k]["chance"] + 0.1  # 0.73 both


def test_label_sharing_sends_the_randomised_labels(tmp_path):
    """Under label_sharing the labels cross, so with defense.label_epsilon=2 (p = 0.65 over
    5 classes) the server receives the randomized-response labels: the audit finds every
    label batch it received among the batches the client trained on (the loaders' noisy
    labels, test_label_epsilon_draws_once_per_sample_and_off_changes_nothing), the train
    accuracy the server measures against them stays below p, and the server's head still
    learns the true classes of the test data."""
    mpirun.ok(3, "data.image_size=16", "train.epochs=3", "data.partition=[[0,1],[2,3,4]]",
              "data.num_classes=5", "split.topology=label_sharing", "defense.label_epsilon=2",
              "audit=true", "output=r.h5", cwd=tmp_path)
    run = reader.read(tmp_path / "r.h5")
    p = np.e ** 2 / (np.e ** 2 + 4)
    for k, series in run.clients.items():
        print(k, series["train_accuracy"].round(3).tolist(),
              series["test_accuracy"].round(3).tolist(), run.audit[k]["label_matches"],
              series["batches_served"])
        assert (run.audit[k]["label_matches"] >= series["batches_served"]).all()
        assert series["train_accuracy"][-1] < p  # agreement with the noisy labels
        assert series["test_accuracy"].max() > 1 / len(run.classes[k]) + 0.1
