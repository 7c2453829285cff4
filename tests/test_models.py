"""The one rule that cuts every network (``models.split``): the three parts compute what the
whole network computes, for torchvision's families and for users' networks; the papers'
networks keep their meaning and numbers; bad names and cuts are refused with the legal
ones; weights come from local files only."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import mpirun
from splitmpi import models, reader
from splitmpi.config import ModelConfig
from splitmpi.errors import ConfigError

# (arch, image size, two cuts): 14 architectures from 12 families
ZOO = [
    ("resnet18", 32, ("layer1", "layer3")),
    ("vgg11_bn", 32, ("features.7", "features.21")),
    ("mobilenet_v2", 32, ("features.3", "features.10")),
    ("mobilenet_v3_small", 32, ("features.1", "features.6")),
    ("efficientnet_b0", 32, ("features.2", "features.5")),
    ("densenet121", 32, ("features.transition1", "features.denseblock3")),
    ("convnext_tiny", 32, ("features.1", "features.5")),
    ("vit_b_16", 32, ("encoder.layers.encoder_layer_3", "encoder.layers.encoder_layer_9")),
    ("swin_t", 32, ("features.1", "features.4")),
    ("regnet_x_400mf", 32, ("trunk_output.block1", "trunk_output.block3")),
    ("shufflenet_v2_x0_5", 32, ("stage2", "stage4")),
    ("mnasnet0_5", 32, ("layers.8", "layers.12")),
    ("googlenet", 32, ("maxpool2", "inception4c")),
    ("alexnet", 64, ("features.2", "features.9")),
]


def run_whole_and_split(net, parts, x, train: bool):
    """Outputs and parameter gradients of the whole network and of its three parts
    chained, each from the same random state (dropout, stochastic depth)."""
    results = []
    for forward in (net, lambda t: parts.classifier(parts.cloud(parts.extractor(t)))):
        net.train(train)
        for part in vars(parts).values():
            part.train(train)
        torch.manual_seed(5)
        out = forward(x)
        params = [p for p in net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
        results.append((out, grads))
    return results


@pytest.mark.parametrize("arch, size, cuts", ZOO, ids=[z[0] for z in ZOO])
def test_the_parts_compute_the_whole_network(arch, size, cuts):
    """Same outputs and gradients, bit for bit, in training and in evaluation mode."""
    torch.manual_seed(0)
    net, _ = models.network(ModelConfig(arch, cuts[0]), 3, size, 10)
    legal = {c.name: c for c in models.cuts(net, arch, 3, size)}
    total = sum(p.numel() for p in net.parameters())
    x = torch.randn(2, 3, size, size)
    for cut in cuts:
        assert cut in legal, sorted(legal)
        assert sum(legal[cut].params) == total
        parts = models.split(net, cut, arch)
        assert tuple(parts.extractor(x).shape[1:]) == legal[cut].shape
        for train in (True, False):
            (whole, whole_grads), (split, split_grads) = run_whole_and_split(net, parts, x, train)
            assert torch.equal(whole, split), (cut, train)
            for a, b in zip(whole_grads, split_grads):
                assert (a is None and b is None) or torch.equal(a, b), (cut, train)
        # the parts' state dicts together are the network's, under its own names
        names = [k for p in vars(parts).values() for k in p.state_dict()]
        assert sorted(names) == sorted(net.state_dict())


def old_style(arch: str, cut, channels: int, size: int):
    """The papers' two networks as 0.1 built them (nn.Sequential pieces), from seed 7."""
    from torchvision.models import resnet50
    torch.manual_seed(7)
    if arch == "resnet50":
        net = resnet50(weights=None, num_classes=10)
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                  net.layer3, net.layer4, net.avgpool, nn.Flatten()]
        at = 5 + ("layer1", "layer2", "layer3").index(cut)
        return nn.Sequential(*stages[:at]), nn.Sequential(*stages[at:]), net.fc
    blocks, width = [], channels
    for filters in models.CNN5_FILTERS:
        blocks.append(nn.Sequential(nn.Conv2d(width, filters, 3, padding=1), nn.ReLU(),
                                    nn.MaxPool2d(2, ceil_mode=True)))
        width, size = filters, -(-size // 2)
    cloud = nn.Sequential(*blocks[cut:], nn.Flatten(), nn.Linear(width * size * size, 512),
                          nn.ReLU())
    head = nn.Linear(512, 10)
    for layer in [*blocks, cloud, head]:
        layer.apply(models._he_init)
    return nn.Sequential(*blocks[:cut]), cloud, head


@pytest.mark.parametrize("arch, cut, channels, size", [
    ("cnn5", 0, 3, 32), ("cnn5", 2, 1, 28), ("cnn5", 4, 3, 32),
    ("resnet50", "layer1", 3, 16), ("resnet50", "layer3", 1, 28)])
def test_the_papers_networks_keep_their_cuts_and_numbers(arch, cut, channels, size):
    """The same weights from the same seed, the same activation and logits as 0.1's
    pieces; a checkpoint of 0.1's pieces (layers named by position) loads into the parts."""
    old = old_style(arch, cut, channels, size)
    new = models.build(ModelConfig(arch, cut), channels, size, 10, seed=7)
    x = torch.randn(3, channels, size, size)
    for a, b in zip(old, vars(new).values()):
        assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(old[0](x), new.extractor(x))
    assert torch.equal(old[2](old[1](old[0](x))),
                       new.classifier(new.cloud(new.extractor(x))))
    fresh = models.build(ModelConfig(arch, cut), channels, size, 10, seed=8)
    for a, b in zip(old, vars(fresh).values()):
        models.load_part(b, a.state_dict())
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                      b.state_dict().values()))


def test_legal_cuts_are_where_one_tensor_crosses():
    net, _ = models.network(ModelConfig("resnet18", "layer2"), 3, 32, 10)
    names = [c.name for c in models.cuts(net, "resnet18", 3, 32)]
    assert names[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0"]
    assert {"layer1", "layer2", "layer3", "layer4.0"} <= set(names)
    # inside a residual block the block's input is alive too; after layer4 the server
    # would hold no layer; fc is the output layer
    assert not {"layer1.0.conv2", "layer4", "avgpool", "fc"} & set(names)
    with pytest.raises(ConfigError, match="2 tensors are alive after it") as err:
        models.split(net, "layer1.0.conv2", "resnet18")
    assert "use one of: conv1, bn1, relu, maxpool, layer1.0, layer1, " in err.value.fix
    with pytest.raises(ConfigError, match="leaves the server no layer to train"):
        models.split(net, "layer4", "resnet18")
    with pytest.raises(ConfigError, match="'layer9' is not a module of resnet18"):
        models.split(net, "layer9", "resnet18")


@pytest.mark.parametrize("arch, size, words", [
    ("resnet5", 32, ["model.arch='resnet5' is not a torchvision classification model",
                     "did you mean resnet50"]),
    ("squeezenet1_0", 32, ["not computed by a final nn.Linear"]),
    ("alexnet", 28, ["alexnet cannot take 28 px images", "data.image_size=64"]),
    ("vit_b_16", 40, ["vit_b_16 cannot be built for 40 px images", "data.image_size=32"]),
])
def test_networks_that_cannot_be_cut_are_named(arch, size, words):
    with pytest.raises(ConfigError) as err:
        models.build(ModelConfig(arch, "x"), 3, size, 10, seed=0)
    text = str(err.value)
    assert all(w in text for w in words), text


class SwitchesOnMode(nn.Module):
    """A network whose own forward differs between training and evaluation."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x)
        if self.training:
            x = x * 2
        return self.out(self.b(x))


def test_a_cut_inside_mode_dependent_code_is_refused():
    with pytest.raises(ConfigError, match="another path in evaluation than in training"):
        models.split(SwitchesOnMode(), "a")


def test_torchvision_weights_load_from_a_local_file(tmp_path):
    """An ImageNet-shaped state dict into a 1-channel, 28 px, 10-class ResNet-18: every
    tensor but the resized stem and output layer comes from the file."""
    from torchvision.models import resnet18
    saved = resnet18(num_classes=1000).state_dict()
    torch.save(saved, tmp_path / "resnet18.pth")
    parts = models.build(ModelConfig("resnet18", "layer2", str(tmp_path / "resnet18.pth")),
                         1, 28, 10, seed=0)
    loaded = {k: v for p in vars(parts).values() for k, v in p.state_dict().items()}
    resized = {"conv1.weight", "fc.weight", "fc.bias"}
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k not in resized)
    assert loaded["conv1.weight"].shape == (64, 1, 3, 3)
    torch.save(resnet18(num_classes=10).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not hold resnet50's tensors"):
        models.build(ModelConfig("resnet50", "layer2", str(tmp_path / "other.pth")),
                     3, 32, 10, seed=0)
    with pytest.raises(ConfigError) as err:  # a torchvision weights name: nothing downloads
        models.build(ModelConfig("resnet18", "layer2", "IMAGENET1K_V1"), 3, 32, 10, seed=0)
    assert "download.pytorch.org/models/resnet18-" in err.value.fix


def test_weights_from_a_splitmpi_checkpoint(tmp_path):
    """The server's cloud and client 1's extractor and classifier, as a run saved them."""
    trained = models.build(ModelConfig("cnn5", 2), 3, 32, 10, seed=1)
    folder = tmp_path / "epoch-00003"
    folder.mkdir()
    torch.save({"state": {"cloud": trained.cloud.state_dict(), "head": {}}},
               folder / "rank-0.pt")
    torch.save({"state": {"extractor": trained.extractor.state_dict(),
                          "classifier": trained.classifier.state_dict()}},
               folder / "rank-1.pt")
    parts = models.build(ModelConfig("cnn5", 2, str(folder)), 3, 32, 10, seed=2)
    for a, b in zip(vars(trained).values(), vars(parts).values()):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ConfigError, match="its extractor does not fit this network"):
        models.build(ModelConfig("cnn5", 3, str(folder)), 3, 32, 10, seed=2)


USER_MODULE = '''
import torch
from torch import nn


def whole(num_classes, channels, image_size):
    """One network and its cut; BatchNorm in the extractor."""
    net = nn.Sequential()
    net.add_module("stem", nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1),
                                         nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)))
    net.add_module("body", nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                         nn.MaxPool2d(2), nn.Flatten()))
    net.add_module("fc", nn.Linear(16 * (image_size // 4) ** 2, num_classes))
    return net, "stem"


def parts(num_classes, channels, image_size):
    return (nn.Conv2d(channels, 4, 3), nn.Sequential(nn.Flatten(), nn.LazyLinear(8)),
            nn.Linear(8, num_classes))


def broken(num_classes, channels, image_size):
    return "a network"


def digits(root):
    """A data set of its own: 4 classes of 12x12 grey squares at class positions."""
    g = torch.Generator().manual_seed(0)
    def make(n):
        labels = torch.arange(n) % 4
        images = -torch.ones(n, 1, 12, 12) + 0.1 * torch.rand(n, 1, 12, 12, generator=g)
        for i, y in enumerate(labels.tolist()):
            r, c = divmod(y, 2)
            images[i, :, 6 * r:6 * r + 6, 6 * c:6 * c + 6] = 1
        return torch.utils.data.TensorDataset(images, labels)
    return make(96), make(32)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``mynets`` in tmp_path/lib, importable here; the path is returned for PYTHONPATH."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mynets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    sys.modules.pop("mynets", None)
    return tmp_path / "lib"


def test_user_networks_in_one_process(user_module):
    parts = models.build(ModelConfig("mynets:whole", 2), 1, 12, 4, seed=0)
    assert list(parts.extractor.state_dict())[0] == "stem.0.weight"
    assert list(parts.classifier.state_dict()) == ["fc.weight", "fc.bias"]
    three = models.build(ModelConfig("mynets:parts", 2), 1, 12, 4, seed=0)
    assert isinstance(three.extractor, nn.Conv2d)
    for arch, words in (("mynets:broken", "returned str, not a network"),
                        ("mynets:missing", "module mynets"),
                        ("nosuchmodule:build", "cannot import module nosuchmodule")):
        with pytest.raises(ConfigError, match=words):
            models.build(ModelConfig(arch, 2), 1, 12, 4, seed=0)


def test_a_user_network_on_a_user_data_set_under_mpiexec(user_module):
    """Both from a module on PYTHONPATH, 3 ranks; the clients learn their classes."""
    path = os.pathsep.join([str(user_module), mpirun.env()["PYTHONPATH"]])
    mpirun.ok(3, "model.arch=mynets:whole", "data.name=mynets:digits", "train.epochs=3",
              "train.batch_size=8", "train.lr=0.05", "output=out.h5", cwd=user_module.parent,
              extra_env={"PYTHONPATH": path})
    result = reader.read(user_module.parent / "out.h5")
    assert result.finished and result.classes == {1: [0, 1], 2: [2, 3]}
    for k in (1, 2):
        assert result.clients[k]["test_accuracy"][-1] > 0.75


def test_list_cuts_prints_the_cuts_with_their_bytes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "splitmpi", "--list-cuts",
                           "model.arch=resnet18", "data.name=cifar10"], cwd=tmp_path,
                          env=mpirun.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:-2]}
    assert rows["layer2"][1:3] == ["128x16x16", f"{4 * 128 * 16 * 16:,}"]
    assert rows["layer1"][-1] == "layer1.1"  # the last block ends where its stage does
    assert "layer1.0.conv2" not in rows
