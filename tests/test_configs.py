"""Every shipped experiment config loads through splitmpi.config.load (fast: no MPI, no data)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splitmpi import config, models

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(CONFIGS.glob("*.yaml"))

# table 1 of "multiple classification with split learning" (docs/architecture.md#the-source-papers)
TABLE1 = {"mnist": (20, 200, 0.001), "cifar10": (200, 200, 0.1), "imagenet": (200, 64, 0.01)}


def test_there_are_configs():
    names = {p.name for p in ALL}
    expected = {f"table1_{d}_{s}.yaml" for d in TABLE1 for s in ("sharing", "nonsharing")}
    assert expected <= names, expected - names
    assert "tableI_cifar10_cnn5.yaml" in names


def leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) of every value a YAML mapping sets."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_config_loads(path):
    cfg = config.load(str(path))
    written = yaml.safe_load(path.read_text())
    # every key in the file is a real key (load would have raised), and every value the
    # file sets is the value that loads: the file is not silently the defaults
    for key, value in leaves(written):
        loaded = cfg
        for part in key.split("."):
            loaded = getattr(loaded, part)
        assert loaded == value, key
    # and it names its data set and its results file
    assert cfg.data.name == written["data"]["name"]
    assert cfg.output == written["output"] and cfg.output.endswith(".h5")


@pytest.mark.parametrize("data", sorted(TABLE1))
@pytest.mark.parametrize("share", ["sharing", "nonsharing"])
def test_table1_hyperparameters(data, share):
    cfg = config.load(str(CONFIGS / f"table1_{data}_{share}.yaml"))
    epochs, batch, lr = TABLE1[data]
    assert (cfg.data.name, cfg.model.arch) == (data, "resnet50")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (epochs, batch, lr)
    assert cfg.split.share is (share == "sharing")
    assert cfg.split.topology == "u_shape"
    assert cfg.train.device == "auto"
    if data == "imagenet":
        assert cfg.data.partition == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    else:
        assert cfg.data.partition == "blocks"
    assert config.check_world(cfg, 4) == 3  # mpirun -n 4: 3 clients
    for cut in models.PAPER_CUTS["resnet50"]:  # what the table1 sweep varies
        assert config.load(str(CONFIGS / f"table1_{data}_{share}.yaml"),
                           [f"model.cut={cut}"]).model.cut == cut


def test_tableI_cuts():
    path = str(CONFIGS / "tableI_cifar10_cnn5.yaml")
    cfg = config.load(path)
    assert (cfg.data.name, cfg.model.arch, cfg.split.topology) == ("cifar10", "cnn5",
                                                                    "label_sharing")
    for cut in range(5):  # what the tableI sweep varies, cut 0 = all at the server
        assert config.load(path, [f"model.cut={cut}"]).model.cut == cut
