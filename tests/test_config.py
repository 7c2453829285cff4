"""Config: defaults, YAML, dotted overrides, and the errors users see (no MPI needed)."""
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


@pytest.mark.parametrize("override, words", [
    ("train.epoch=3", ["unknown config key 'train.epoch'", "train.epochs"]),
    ("nosuch=1", ["unknown config key 'nosuch'"]),
    ("train.epochs=abc", ["train.epochs must be int", "'abc'"]),
    ("train.epochs=2.5", ["train.epochs must be int"]),
    ("split.share=maybe", ["split.share must be bool"]),
    ("model.cut=layer9", ["model.cut='layer9' is not a cut of cnn5", "0, 1, 2, 3, 4"]),
    ("model.arch=vgg", ["model.arch='vgg' is not supported", "cnn5, resnet50"]),
    ("model.cut=0", ["u_shape would send raw inputs", "label_sharing"]),
    ("train.epochs=0", ["train.epochs=0 must be at least 1"]),
    ("data.partition=odd", ["data.partition='odd'", "dirichlet"]),
    ("train", ["is not key=value"]),
    ("data=3", ["data is a section"]),
])
def test_bad_values_name_the_key_and_the_fix(override, words):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    for w in words:
        assert w in str(err.value)
    assert err.value.fix


def test_resnet_cut_must_match_arch():
    with pytest.raises(ConfigError, match="not a cut of resnet50"):
        config.load(None, ["model.arch=resnet50", "model.cut=2"])


def test_world_size_must_match_clients():
    cfg = config.load(None, ["clients.count=3"])
    assert config.check_world(cfg, 4) == 3
    with pytest.raises(ConfigError, match="mpirun -n 4"):
        config.check_world(cfg, 3)
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
