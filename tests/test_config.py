"""Config: defaults, YAML, dotted overrides, and the errors users see (no mpiexec needed)."""
import dataclasses

import pytest

from splitmpi import config
from splitmpi.errors import ConfigError


def test_defaults_validate():
    cfg = config.load()
    assert cfg.model.arch == "cnn5" and cfg.split.topology == "u_shape"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 7\nmodel:\n  arch: resnet50\n  cut: layer1\n")
    cfg = config.load(str(path), ["model.cut=layer3", "train.lr=1", "split.share=false",
                                  "data.partition=[[0,1],[2]]"])
    assert cfg.train.epochs == 7 and cfg.model.cut == "layer3"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.split.share is False and cfg.data.partition == [[0, 1], [2]]


def test_numeric_cut_for_cnn5():
    assert config.load(None, ["model.cut=3"]).model.cut == 3


def test_round_trip_through_json():
    cfg = config.load(None, ["train.epochs=4", "model.cut=1"])
    assert config.from_json(cfg.to_json()) == cfg


def test_yaml_is_one_key_a_line_and_reads_back(tmp_path):
    cfg = config.load(None, ["train.epochs=4", "data.partition=[[0,1],[2]]"])
    text = cfg.to_yaml()
    assert "\n  epochs: 4\n" in text and "\ntrain:\n" in text
    (tmp_path / "c.yaml").write_text(text)
    assert config.load(str(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("override, words", [
    ("train.epoch=3", ["unknown config key 'train.epoch'", "train.epochs"]),
    ("nosuch=1", ["unknown config key 'nosuch'"]),
    ("train.epochs=abc", ["train.epochs must be int", "'abc'"]),
    ("train.epochs=2.5", ["train.epochs must be int"]),
    ("split.share=maybe", ["split.share must be bool"]),
    ("model.arch=", ["model.arch is empty"]),
    ("model.cut=", ["model.cut='' leaves no layer on the clients", "label_sharing"]),
    ("model.cut=0", ["u_shape would send raw inputs", "label_sharing"]),
    ("train.epochs=0", ["train.epochs=0 must be at least 1"]),
    ("data.partition=odd", ["data.partition='odd'", "dirichlet", "[[0,1,2,3],[4,5,6],[7,8,9]]"]),
    ("data.partition=[[0,1],[]]", ["one non-empty list of class indices per client"]),
    ("data.name=true", ["data.name=True is not supported", "synthetic, mnist"]),
    ("data.name=cifar", ["data.name='cifar' is not supported (did you mean cifar10 or cifar100",
                         "package.module:function"]),
    ("split.share_bn=mean", ["split.share_bn='mean'", "average, local, recalibrate"]),
    ("split.bn_recalibrate_batches=0", ["split.bn_recalibrate_batches=0 must be at least 1"]),
    ("comm.wait=busy", ["comm.wait='busy' is not supported", "auto, spin, sleep"]),
    ("train.momentum=-1", ["train.momentum=-1.0 must be at least 0"]),
    ("train.log_seconds=-5", ["train.log_seconds=-5.0 must be at least 0"]),
    ("defense.dropout=1", ["defense.dropout=1.0", "below 1"]),
    ("attack.method=gan", ["attack.method='gan' is not supported", "decoder, rmle, both"]),
    ("attack.aux=mine", ["attack.aux='mine' is not supported", "train, others"]),
    ("attack.eval_samples=0", ["attack.eval_samples=0 must be at least 1"]),
    ("attack.rmle_tv=-1", ["attack.rmle_tv=-1.0 must be at least 0"]),
    ("attack.rmle_lr=0", ["attack.rmle_lr=0.0 must be positive", "attack.rmle_lr > 0"]),
    ("train", ["is not key=value"]),
    ("data=3", ["data is a section"]),
])
def test_bad_values_name_the_key_and_the_fix(override, words):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    for w in words:
        assert w in str(err.value)
    assert err.value.fix


def test_world_size_fits_the_clients():
    """check_world gives the client ranks; clients.count may exceed them, not fall short."""
    cfg = config.load(None, ["clients.count=3"])
    assert config.check_world(cfg, 4) == 3
    assert config.check_world(cfg, 3) == 2  # 3 logical clients on 2 client ranks
    with pytest.raises(ConfigError, match="mpirun -n 4"):
        config.check_world(cfg, 5)
    with pytest.raises(ConfigError, match="at least one client"):
        config.check_world(config.load(), 1)
    listed = config.load(None, ["data.partition=[[0],[1]]"])
    with pytest.raises(ConfigError, match="lists 2 clients"):
        config.check_world(listed, 4)
    delayed = config.load(None, ["clients.delay_ms=[0, 50]"])
    assert config.check_world(delayed, 3) == 2
    with pytest.raises(ConfigError, match="one delay >= 0 per client"):
        config.check_world(delayed, 4)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        config.load("/nonexistent.yaml")


def sections(cfg):
    """(dotted prefix, section) for the top level and every section."""
    yield "", cfg
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            yield f"{f.name}.", getattr(cfg, f.name)


def test_choices_are_literals_and_the_defaults_are_among_them():
    found = {}
    for prefix, section in sections(config.Config()):
        types = config.field_types(section)
        for f in dataclasses.fields(section):
            allowed = config.choices(types[f.name])
            if allowed:
                found[prefix + f.name] = allowed
                # the defaults pass the same check as a user's value
                config._coerce(f.name, getattr(section, f.name), types[f.name])
    assert found["split.share_bn"] == "average, local, recalibrate"
    assert found["attack.aux"] == "train, others"
    assert found["data.partition"].startswith(
        "blocks, iid, dirichlet, shards or a list of class lists")
    assert {"data.name", "data.emnist_split", "split.topology", "train.device", "train.amp",
            "comm.wire_dtype", "comm.wait", "server.schedule", "attack.method"} < set(found)


def test_help_lists_every_key_with_its_default_and_choices():
    from splitmpi import cli
    text = cli.parser().format_help()
    for prefix, section in sections(config.Config()):
        for f in dataclasses.fields(section):
            if not dataclasses.is_dataclass(getattr(section, f.name)):
                assert f"  {prefix}{f.name}={getattr(section, f.name)!r}" in text
    assert "comm.wait='auto'  (auto, spin, sleep)" in text


def test_a_resume_may_change_the_attack_settings_but_not_the_training(tmp_path):
    torch = pytest.importorskip("torch")
    from mpi4py import MPI

    from splitmpi import checkpoint
    saved = config.load(None, ["train.epochs=2"])
    folder = tmp_path / "epoch-00001"
    folder.mkdir()
    torch.save({"format": checkpoint.FORMAT, "epoch": 1, "rank": 0, "state": {},
                "identity": checkpoint.identity(saved, 1)}, folder / "rank-0.pt")
    attack = ["attack.method=rmle", "attack.aux=others", "attack.epochs=3",
              "attack.checkpoint=x.pt", "attack.output=a.h5"]
    # more epochs and different attack settings: the same training run, resumed
    assert checkpoint.load(folder, config.load(None, ["train.epochs=4", *attack]),
                           MPI.COMM_SELF)["epoch"] == 1
    with pytest.raises(ConfigError, match="train.lr: saved 0.01, now 0.5"):
        checkpoint.load(folder, config.load(None, ["train.lr=0.5", *attack]), MPI.COMM_SELF)
