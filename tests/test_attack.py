"""Inversion attacks and defenses on tiny data: the attacks learn, the defenses change what
is sent, and results round-trip through the HDF5 file and splitmpi.reader."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import mpirun
from splitmpi import config, data, models, population, reader, results
from splitmpi.attack.cli import main
from splitmpi.attack.decoder import build_decoder, decoder_attack, stage_shapes
from splitmpi.attack.images import attack_images
from splitmpi.attack.rmle import rmle
from splitmpi.attack.target import Target, freeze, observe, train_split_model
from splitmpi.config import DefenseConfig
from splitmpi.defense import Defense, distance_correlation
from splitmpi.report import attacks as report_attacks
from splitmpi.results import ResultsWriter

TINY = ["data.image_size=16", "data.train_size=240", "data.test_size=60", "train.epochs=1",
        "train.batch_size=30", "attack.aux_samples=96", "attack.eval_samples=8",
        "attack.epochs=2", "attack.batch_size=32", "attack.rmle_steps=15", "attack.grid=4"]


@pytest.fixture(autouse=True)
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def target(cfg, defense=None):
    sp = data.spec(cfg.data)
    parts = models.build(cfg.model, sp.channels, sp.image_size, sp.num_classes, 0)
    d = Defense(defense or cfg.defense)
    freeze([parts.extractor, d])
    return Target(parts.extractor, d, float("nan"), "initial weights")


def test_decoder_mirrors_the_extractor():
    for arch, cut, size in (("cnn5", 1, 28), ("cnn5", 4, 28), ("cnn5", 3, 16),
                            ("resnet50", "layer2", 16)):
        cfg = config.load(None, [f"model.arch={arch}", f"model.cut={cut}",
                                 f"data.image_size={size}", "data.channels=1"])
        t = target(cfg)
        shapes = stage_shapes(t.extractor, (1, size, size))
        dec = build_decoder(shapes)
        feats = t.extractor(torch.zeros(2, 1, size, size))
        out = dec(feats)
        assert out.shape == (2, 1, size, size), (arch, cut)
        ups = sum(isinstance(m, nn.ConvTranspose2d) for m in dec.modules())
        assert ups == {("cnn5", 1): 1, ("cnn5", 4): 4, ("cnn5", 3): 3,
                       ("resnet50", "layer2"): 1}[(arch, cut)]


def test_decoder_attack_learns():
    cfg = config.load(None, [*TINY, "model.cut=1", "attack.epochs=4"])
    t = target(cfg)
    aux, evaluated, _, _ = attack_images(cfg)
    assert aux.shape == (96, 3, 16, 16) and evaluated.shape == (8, 3, 16, 16)
    result = decoder_attack(cfg, t, aux, evaluated, torch.device("cpu"))
    loss, err = result["series"]["train_loss"], result["series"]["eval_mse"]
    assert loss[-1] < 0.7 * loss[0] and err[-1] < err[0]
    assert result["reconstruction"].shape == evaluated.shape
    assert result["reconstruction"].abs().max() <= 1  # tanh output


def test_aux_images_exclude_client_1_with_others():
    cfg = config.load(None, [*TINY, "attack.aux=others"])
    train, _, classes = data.client_datasets(cfg, 1, 3)
    mine = {tuple(train[i][0].flatten()[:8].tolist()) for i in range(len(train))}
    aux, _, where, _ = attack_images(cfg)
    assert "none of client 1's images" in where
    assert not any(tuple(x.flatten()[:8].tolist()) in mine for x in aux)


def test_rmle_reduces_feature_mismatch():
    cfg = config.load(None, [*TINY, "model.cut=2"])
    t = target(cfg)
    _, evaluated, _, _ = attack_images(cfg)
    observed = observe(t, evaluated)
    x, history = rmle(t.extractor, observed, tuple(evaluated.shape), steps=40, tv=0.01,
                      lr=0.05)
    assert history[-1] < 0.5 * history[0]
    assert x.min() >= -1 and x.max() <= 1
    assert float(nn.functional.mse_loss(t.extractor(x), observed)) == pytest.approx(
        history[-1], rel=1e-5)


def test_noise_defense_changes_what_is_sent():
    d = Defense(DefenseConfig(noise_sigma=0.5))
    d.eval()  # the noise stays on at inference: the attacker sees what is sent
    a = torch.randn(64, 16, 8, 8)
    sent = d(a)
    assert (sent - a).std().item() == pytest.approx(0.5, rel=0.03)
    assert not torch.equal(d(a), sent)
    cfg = config.load(None, [*TINY, "model.cut=1"])
    t = target(cfg, DefenseConfig(noise_sigma=0.5))
    x = attack_images(cfg)[1]
    assert not torch.equal(observe(t, x), observe(t, x))
    plain = target(cfg)
    assert (observe(t, x) - observe(plain, x)).std().item() == pytest.approx(
        0.5, rel=0.05)


def test_dropout_defense_is_training_only():
    d = Defense(DefenseConfig(dropout=0.5))
    a = torch.rand(200, 100) + 0.1
    d.train()
    assert (d(a) == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    d.eval()
    assert torch.equal(d(a), a)


def test_nopeek_penalty_is_differentiable_and_reaches_the_extractor():
    cfg = config.load(None, ["model.cut=2", "data.image_size=16"])
    parts = models.build(cfg.model, 3, 16, 10, 0)
    d = Defense(DefenseConfig(nopeek_alpha=0.7))
    x = torch.randn(24, 3, 16, 16)
    a = parts.extractor(x)
    penalty = d.penalty(x, a)
    assert penalty.requires_grad and 0 < penalty.item() <= 0.7 + 1e-6
    penalty.backward()
    grads = [p.grad for p in parts.extractor.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert Defense(DefenseConfig()).penalty(x, a) is None


def test_distance_correlation_identical_vs_independent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g)
    y = torch.randn(256, 3, generator=g)
    assert distance_correlation(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert distance_correlation(x, 3 * x + 1).item() == pytest.approx(1.0, abs=1e-5)
    independent = distance_correlation(x, y).item()  # sample dCor is biased upwards
    assert independent < 0.3
    half = distance_correlation(x, torch.cat([x[:, :2], y[:, 2:]], 1)).item()
    assert 0.5 < half < 1


def test_the_target_trained_here_is_what_a_split_run_trains(tmp_path):
    """With attack.checkpoint empty the target is trained in one process; a split run with
    client 1's shard as its only client (every defense on: dropout and noise draw from the
    client's RNG, NoPeek adds its gradient; both train on the same randomized-response
    labels, defense.label_epsilon) must end with the same extractor, cloud and classifier
    bit for bit, and its test accuracy must be the target's utility."""
    settings = ["data.image_size=16", "data.train_size=120", "data.test_size=60",
                "train.epochs=2", "train.batch_size=30", "train.checkpoint_every=2",
                "train.device=cpu", "train.threads=1", "clients.count=1", "split.share=false",
                "defense.nopeek_alpha=0.5", "defense.noise_sigma=0.1", "defense.dropout=0.2",
                "defense.label_epsilon=2"]
    mpirun.ok(2, *settings, "output=run.h5", cwd=tmp_path)
    net, accuracy = train_split_model(config.load(None, settings), torch.device("cpu"))
    folder = tmp_path / "run.h5.ckpt" / "epoch-00002"
    server_state = torch.load(folder / "rank-0.pt", weights_only=True)["state"]
    client_state = population.saved_client(folder, 1)
    for part, state in [(net.parts.extractor, client_state["extractor"]),
                        (net.parts.classifier, client_state["classifier"]),
                        (net.parts.cloud, server_state["cloud"])]:
        for name, tensor in part.state_dict().items():
            assert torch.equal(tensor, state[name]), name
    assert accuracy == reader.read(tmp_path / "run.h5").clients[1]["test_accuracy"][-1]


def groups(path):
    return reader.read(path).groups["attack"]


def test_cli_writes_a_results_file_that_reader_reads(tmp_path):
    out = tmp_path / "attack.h5"
    proc = subprocess.run([sys.executable, "-m", "splitmpi.attack", *TINY, "model.cut=1",
                           "attack.method=both", f"attack.output={out}",
                           f"attack.save={tmp_path / 'model.pt'}"],
                          env=mpirun.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "decoder: PSNR" in proc.stdout and "rmle: PSNR" in proc.stdout
    run = reader.read(out)
    assert run.finished and run.attrs["world_size"] == 1 and run.attrs["clients"] == 3
    assert run.config["attack"]["method"] == "both"
    g = run.groups["attack"]
    assert set(g) == {"decoder", "rmle"}
    for group in g.values():
        for name in ("psnr", "ssim", "mse", "score"):
            assert group[name].shape == (8,) and np.isfinite(group[name]).all()
            assert group[f"@{name}_mean"] == pytest.approx(group[name].mean())
            assert group[f"@{name}_std"] == pytest.approx(group[name].std())
        assert group["originals"].dtype == np.uint8 and group["originals"].shape == (4, 16, 16, 3)
        assert group["reconstructions"].shape == (4, 16, 16, 3)
        assert group["@pixel_range"] == "[0,1]" and group["@cut"] == 1
        assert group["@arch"] == "cnn5" and group["@defense_noise_sigma"] == 0
        assert 0 <= group["@utility_accuracy"] <= 1
        assert np.allclose(group["score"], 1 - 1000 * group["mse"])
    assert g["rmle"]["@feature_mse_end"] < g["rmle"]["@feature_mse_start"]

    # the saved model is a valid attack.checkpoint; a new method replaces only its own group
    before = g["decoder"]["psnr"]
    assert main([*TINY, "model.cut=1", "attack.method=rmle", f"attack.output={out}",
                 f"attack.checkpoint={tmp_path / 'model.pt'}", "attack.rmle_steps=3"]) == 0
    g2 = groups(out)
    assert np.array_equal(g2["decoder"]["psnr"], before)
    assert g2["rmle"]["@steps"] == 3
    assert g2["rmle"]["@utility_accuracy"] == pytest.approx(g["rmle"]["@utility_accuracy"])


def test_attack_is_added_to_an_existing_run_file(tmp_path):
    out = tmp_path / "run.h5"
    cfg = config.load(None, [f"output={out}"])
    w = ResultsWriter(cfg, 4, 3)
    counters = {c: 1 for c in results.COMM_COUNTERS}
    w.append_epoch(1.0, {k: {"classes": [k], **{n: 0.5 for n in results.CLIENT_SERIES}}
                         for k in (1, 2, 3)}, [counters] * 4)
    w.finish()
    extractor = target(config.load(None, ["model.cut=1", "data.image_size=16"])).extractor
    # the layout of a splitmpi client checkpoint (OUTPUT.ckpt/epoch-N/rank-1.pt)
    torch.save({"format": 1, "epoch": 1, "state": {"extractor": extractor.state_dict()}},
               tmp_path / "ext.pt")
    assert main([*TINY, "model.cut=1", f"output={out}", "attack.method=rmle",
                 f"attack.checkpoint={tmp_path / 'ext.pt'}"]) == 0
    run = reader.read(out)
    assert run.attrs["world_size"] == 4 and run.epochs == 1 and len(run.clients) == 3
    assert np.isnan(run.groups["attack"]["rmle"]["@utility_accuracy"])  # extractor only


@pytest.mark.parametrize("overrides, words", [
    (["attack.aux=mine"], "attack.aux"),
    (["attack.checkpoint=nowhere.pt"], "attack.checkpoint"),
    (["attack.method=gan"], "attack.method"),
    (["attack.eval_samples=0"], "attack.eval_samples"),
])
def test_bad_settings_exit_2(tmp_path, capsys, overrides, words):
    assert main([*TINY, f"attack.output={tmp_path / 'x.h5'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitmpi.attack: error:") and words in err
    assert not (tmp_path / "x.h5").exists()


def test_bad_checkpoint_and_foreign_output_exit_2(tmp_path, capsys):
    torch.save({"extractor": target(config.load(None, ["model.cut=2", "data.image_size=16"]))
                .extractor.state_dict()}, tmp_path / "cut2.pt")
    torch.save({"weights": {}}, tmp_path / "empty.pt")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    for args, words in (
            ([f"attack.checkpoint={tmp_path / 'cut2.pt'}", "model.cut=1"], "model.cut=1"),
            ([f"attack.checkpoint={tmp_path / 'empty.pt'}"], "no extractor"),
            ([f"attack.output={foreign}"], "not a splitmpi results file")):
        out = [] if any("output" in a for a in args) else [f"attack.output={tmp_path / 'o.h5'}"]
        assert main([*TINY, *args, *out]) == 2, args
        assert words in capsys.readouterr().err
    with h5py.File(foreign, "r") as f:
        assert list(f) == ["x"]


# --- attacks on a real MPI run's checkpoints -----------------------------------------------

# 2 clients that learn within 2 epochs (classes [0, 1] and [2, 3, 4]), a checkpoint each epoch
RUN = ("data.image_size=16", "data.partition=[[0,1],[2,3,4]]", "data.train_size=1000",
       "data.test_size=200", "train.epochs=2", "train.batch_size=16",
       "train.checkpoint_every=1")


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """The results file of one small u_shape run, its checkpoints in ``run.h5.ckpt``."""
    where = tmp_path_factory.mktemp("split_run")
    mpirun.ok(3, *RUN, "output=run.h5", cwd=where)
    return where / "run.h5"


def test_completion_labels_a_runs_test_data_from_a_few_known_labels(split_run, tmp_path,
                                                                      capsys):
    """The server's cloud plus a head fitted on 4 known labels per class labels client k's
    test images far above chance, reported beside the client's own accuracy, which is the
    one the run measured for that epoch (the extractor, cloud and classifier it trained)."""
    run = reader.read(split_run)
    out = tmp_path / "completion.h5"
    for k, source in ((1, split_run), (2, f"{split_run}.ckpt")):
        assert main([f"attack.checkpoint={source}", "attack.method=completion",
                     f"attack.client={k}", f"attack.output={out}"]) == 0
        said = capsys.readouterr().out
        assert "completion: accuracy" in said and "the client's own" in said
        g = groups(out)["completion"]
        print(k, {n: g[f"@{n}"] for n in ("accuracy", "client_accuracy", "chance")})
        assert g["@client"] == k and g["@known_samples"] == 4 * len(run.classes[k])
        assert g["@chance"] == pytest.approx(1 / len(run.classes[k]))
        assert g["@client_accuracy"] == g["@utility_accuracy"] == pytest.approx(
            run.clients[k]["test_accuracy"][-1])
        assert g["@accuracy"] > g["@chance"] + 0.2  # measured 0.82 (chance 0.5), 0.87 (0.33)
        assert g["classes"].tolist() == run.classes[k] and g["class_accuracy"].shape == (
            len(run.classes[k]),)
        assert g["@test_samples"] == g["class_test_samples"].sum()


def test_completion_of_a_diverged_run_is_nan_not_a_crash(split_run, tmp_path, capsys):
    """A run whose cloud gives non-finite features (it diverged, as a strong gradient
    noise can make it) has nothing to complete: accuracy NaN with a warning, exit 0, so a
    matrix cell is finished rather than failed on every rerun."""
    folder = tmp_path / "run.h5.ckpt"
    shutil.copytree(f"{split_run}.ckpt", folder)
    last = sorted(folder.glob("epoch-*"))[-1] / "rank-0.pt"
    saved = torch.load(last, weights_only=True)
    for tensor in saved["state"]["cloud"].values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    torch.save(saved, last)
    out = tmp_path / "completion.h5"
    assert main([f"attack.checkpoint={folder}", "attack.method=completion",
                 f"attack.output={out}"]) == 0
    said = capsys.readouterr()
    assert "not finite (the run diverged" in said.err + said.out
    g = groups(out)["completion"]
    assert np.isnan(g["@accuracy"]) and np.isnan(g["class_accuracy"]).all()
    assert g["class_test_samples"].sum() == g["@test_samples"] > 0


def test_inversion_attacks_a_runs_saved_epoch(split_run, tmp_path):
    """A given epoch of a checkpoint folder: that epoch's client-2 extractor, the run's own
    config (no model or data keys on the command line), its utility the run's."""
    out = tmp_path / "rmle.h5"
    assert main([f"attack.checkpoint={split_run}.ckpt", "attack.epoch=1", "attack.client=2",
                 "attack.method=rmle", "attack.rmle_steps=3", "attack.eval_samples=4",
                 f"attack.output={out}"]) == 0
    attacked = reader.read(out)
    g = attacked.groups["attack"]["rmle"]
    assert g["@client"] == 2 and g["psnr"].shape == (4,)
    assert g["@utility_accuracy"] == pytest.approx(
        reader.read(split_run).clients[2]["test_accuracy"][0])
    assert attacked.config["attack"]["checkpoint"] == f"{split_run}.ckpt/epoch-00001"
    assert attacked.config["data"]["train_size"] == 1000 and attacked.attrs["clients"] == 2


def test_bad_run_targets_exit_2(split_run, tmp_path, capsys):
    within = tmp_path / "within.ckpt" / "epoch-00001-step-0000003"
    within.mkdir(parents=True)
    (within / "COMPLETE").write_text("3 ranks\n")
    unsaved = tmp_path / "unsaved.h5"
    writer = ResultsWriter(config.load(None, [f"output={unsaved}"]), 3, 2)
    writer.finish()
    for args, words in (
            ([f"attack.checkpoint={within.parent}"], "no checkpoint of a finished epoch"),
            ([f"attack.checkpoint={within}"], "within an epoch"),
            ([f"attack.checkpoint={split_run}", "attack.epoch=5"], "saved epochs: 1, 2"),
            ([f"attack.checkpoint={split_run}", "attack.client=3"], "clients 1..2"),
            ([f"attack.checkpoint={unsaved}"], "train.checkpoint_every=1"),
            (["attack.method=completion"], "needs the server's cloud"),
            (["attack.client=2"], "attack.client=2"),
            ([f"attack.checkpoint={split_run}", "attack.method=completion",
              "attack.known_labels=0"], "attack.known_labels")):
        assert main([*args, f"attack.output={tmp_path / 'x.h5'}"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("splitmpi.attack: error:") and words in err, (args, err)
    assert not (tmp_path / "x.h5").exists()


def privacy_sweep(*args) -> subprocess.CompletedProcess:
    """``python jobs/privacy_sweep.py ARGS`` from the repository, as a user runs it."""
    return subprocess.run([sys.executable, "jobs/privacy_sweep.py", *map(str, args)],
                          cwd=mpirun.ROOT, env=mpirun.env(), capture_output=True, text=True,
                          timeout=300)


def swept(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """Cell name -> what the sweep said of it (its command in a dry run, else its outcome)."""
    return dict(re.findall(r"\[\d+/\d+\] (\S+): (.*)", proc.stdout))


@pytest.fixture
def sweep_main(monkeypatch, capsys):
    """jobs/privacy_sweep.py's ``main`` in this process (a dry run needs no subprocess):
    argv -> (exit status, stdout, stderr)."""
    monkeypatch.syspath_prepend(str(mpirun.ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("privacy_sweep",
                                                  mpirun.ROOT / "jobs" / "privacy_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(*args):
        rc = module.main([str(a) for a in args])
        said = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, said.out, said.err)
    return run


def test_privacy_sweep_matrix_cells_commands_and_bad_input(tmp_path, sweep_main):
    """A dry run lists every cell (cut x defense x strength) with its MPI training run and
    the attacks on it, all into the cell's one file, and writes nothing; bad input exits 2
    before anything runs."""
    proc = sweep_main("--dry-run", "--out", tmp_path, "--cuts", "1", "2", "--noise", "0.5",
                      "--nopeek", "--dropout", "--grad", "0.5", "--grad-clip", "0.1",
                      "--dp", "--label-dp", "--defense-cuts", "1", "--clients", "2")
    assert proc.returncode == 0, proc.stderr
    said = swept(proc)
    assert list(said) == ["cnn5-cut1-none", "cnn5-cut1-noise0.5", "cnn5-cut1-grad0.5",
                          "cnn5-cut1-maxnorm", "cnn5-cut2-none"]
    train, decoder, completion = said["cnn5-cut1-grad0.5"].split(" && ")
    out = tmp_path / "cnn5-cut1-grad0.5.h5"
    assert train.split()[1:3] == ["-n", "3"] and "-m splitmpi " in train
    for key in ("model.cut=1", "defense.grad_clip=0.1", "defense.grad_noise=0.5",
                "attack.labels=true", "train.checkpoint_every=5", f"output={out}"):
        assert key in train.split(), key
    for cmd, method in ((decoder, "decoder"), (completion, "completion")):
        assert "-m splitmpi.attack" in cmd and f"attack.method={method}" in cmd.split()
        assert f"attack.checkpoint={out}" in cmd.split() and f"output={out}" in cmd.split()
    proc = sweep_main("--dry-run", "--out", tmp_path, "--defenses", "none", "--method",
                      "rmle", "--", "model.arch=resnet50", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert list(swept(proc)) == ["resnet50-cutlayer1-none", "resnet50-cutlayer2-none",
                                 "resnet50-cutlayer3-none"]
    assert proc.stdout.count("attack.method=rmle") == 3 and "checkpoint_every=2" in proc.stdout
    dp = sweep_main("--dry-run", "--out", tmp_path, "--cuts", "1", "--defenses", "dp",
                    "--dp", "4", "--dp-clip", "2")
    if "act_clip" in dp.stderr:  # this splitmpi has no DP activations: refused, not run
        assert dp.returncode == 2
    else:
        assert dp.returncode == 0, dp.stderr
        assert list(swept(dp)) == ["cnn5-cut1-dp4"] and "defense.act_clip=2" in dp.stdout
    labeldp = sweep_main("--dry-run", "--out", tmp_path, "--cuts", "1", "--defenses", "labeldp")
    assert labeldp.returncode == 0, labeldp.stderr
    said = swept(labeldp)
    assert list(said) == ["cnn5-cut1-labeldp2", "cnn5-cut1-labeldp1"]
    assert "defense.label_epsilon=1" in said["cnn5-cut1-labeldp1"].split(" && ")[0].split()
    maxnorm = sweep_main("--dry-run", "--out", tmp_path, "--cuts", "2", "--defenses", "maxnorm")
    assert maxnorm.returncode == 0, maxnorm.stderr
    said = swept(maxnorm)
    assert list(said) == ["cnn5-cut2-maxnorm"]
    assert "defense.grad_maxnorm=true" in said["cnn5-cut2-maxnorm"].split(" && ")[0].split()
    full = sweep_main("--dry-run", "--out", tmp_path)  # the default matrix: 4 cuts x 15
    assert full.returncode == 0 and len(swept(full)) == 60, full.stderr
    for bad in (["--dropout", "1.5"], ["--noise", "0"], ["--grad", "-1"], ["--label-dp", "0"],
                ["--only", "nothing*"], ["--", "output=x.h5"], ["--", "model.arch=vgg"]):
        proc = sweep_main("--dry-run", "--out", tmp_path, *bad)
        assert proc.returncode == 2 and "privacy_sweep: error:" in proc.stderr, bad
    with pytest.raises(SystemExit) as exc:  # argparse: an unknown defense
        sweep_main("--dry-run", "--defenses", "shield")
    assert exc.value.code == 2
    proc = privacy_sweep("--dry-run", "--out", tmp_path, "--only", "cnn5-cut1-none")
    assert proc.returncode == 0 and list(swept(proc)) == ["cnn5-cut1-none"], proc.stderr
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def matrix_cell(run: Path, path: Path, defense: dict, psnr: float, labels: float,
                completion: float) -> None:
    """A copy of a finished MPI run as a cell of the matrix: its defense, and the groups
    of label inference (every client, every epoch: ``labels`` in the first, 0.2 less in
    the last, as under max-norm), the decoder and model completion."""
    shutil.copy(run, path)
    with h5py.File(path, "a") as f:
        cfg = json.loads(f.attrs["config"])
        cfg["defense"].update(defense)
        f.attrs["config"] = json.dumps(cfg)
        epochs = len(f["epochs"]["seconds"]) if "seconds" in f["epochs"] else 2
        for k in (1, 2):
            g = f.require_group(f"attack/labels/{k}")
            for name, v in (("cosine_accuracy", labels - 0.1 * k), ("cluster_accuracy", labels),
                            ("cluster_known_accuracy", labels), ("norm_auc", 0.5),
                            ("chance", 0.5), ("rows", 64)):
                g[name] = np.full(epochs, v, dtype=np.float64)
                if name.endswith("accuracy"):
                    g[name][1:] -= 0.2
        f.require_group("attack/decoder").attrs.update({"psnr_mean": psnr, "ssim_mean": 0.5})
        f.require_group("attack/completion").attrs.update({"accuracy": completion,
                                                           "chance": 0.5})


def test_privacy_sweep_skips_finished_cells_and_reports_the_matrix(split_run, tmp_path,
                                                                  sweep_main):
    none, noise = tmp_path / "cnn5-cut2-none.h5", tmp_path / "cnn5-cut2-noise0.5.h5"
    matrix_cell(split_run, none, {}, 20.0, 0.9, 0.8)
    matrix_cell(split_run, noise, {"noise_sigma": 0.5}, 12.0, 0.6, 0.7)
    cells = ("--out", tmp_path, "--cuts", "2", "--defenses", "none", "noise", "--noise", "0.5")
    proc = sweep_main(*cells)
    assert proc.returncode == 0, proc.stderr
    assert swept(proc) == {"cnn5-cut2-none": "done, skipped",
                           "cnn5-cut2-noise0.5": "done, skipped"}
    assert "Attack x defense matrix" in proc.stdout
    # a finished run that lacks a requested attack gets only that attack: here it fails at
    # once (the copy has no checkpoints), and the sweep says so
    proc = sweep_main(*cells, "--only", "*-none", "--method", "completion", "rmle")
    assert proc.returncode == 1 and "cnn5-cut2-none" in proc.stderr
    assert swept(proc)["cnn5-cut2-none"].startswith("FAILED (exit 2 in attack.method=rmle")
    assert "splitmpi.attack" in (tmp_path / "cnn5-cut2-none.log").read_text()

    labeldp = tmp_path / "cnn5-cut2-labeldp1.h5"  # named from its config's label_epsilon
    matrix_cell(split_run, labeldp, {"label_epsilon": 1.0}, 19.0, 0.4, 0.75)
    runs = [reader.read(p) for p in (none, noise, labeldp)]
    rows = report_attacks.matrix_table(runs)[0].rows
    accuracy = 100 * np.mean([c["test_accuracy"][-1] for c in runs[0].clients.values()])
    assert [(r["cut"], r["defense"], r["strength"]) for r in rows] == [
        (2, "none", 0.0), (2, "noise", 0.5), (2, "labeldp", 1.0)]
    assert rows[0]["accuracy_pct"] == pytest.approx(accuracy, abs=0.01)
    assert [r["psnr_db"] for r in rows] == [20.0, 12.0, 19.0]
    # the best of cosine and cluster in the attacker's best epoch (the first), not the last
    assert [r["label_inference"] for r in rows] == [0.9, 0.6, 0.4]
    assert [r["completion"] for r in rows] == [0.8, 0.7, 0.75] and rows[0]["ssim"] == 0.5
    paths = report_attacks.plot_matrix(runs, tmp_path / "figs")
    assert [p.name for p in paths] == ["privacy_frontier_cnn5.png",
                                       "privacy_heatmap_cnn5_cut2.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
