"""Networks cut into the three parts of split learning: extractor | cloud | classifier.

Every rank builds the whole network from the same seed and keeps its own parts, so all
clients start from one common extractor and the server's cloud matches it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Config, ModelConfig, TrainConfig
from .data import spec

RESNET_CUTS = ("layer1", "layer2", "layer3")
CNN5_FILTERS = (16, 32, 64, 128, 256)


@dataclass
class SplitModel:
    extractor: nn.Module  # client: input .. cut
    cloud: nn.Module  # server: cut .. pooled features
    classifier: nn.Module  # client (u_shape) or server (label_sharing): the output layer


def build(cfg: ModelConfig, channels: int, image_size: int, num_classes: int,
          seed: int) -> SplitModel:
    torch.manual_seed(seed)
    if cfg.arch == "resnet50":
        return _resnet50(cfg.cut, channels, image_size, num_classes)
    return _cnn5(int(cfg.cut), channels, image_size, num_classes)


def for_run(cfg: Config) -> SplitModel:
    """The run's network, sized by its data set, from the run's seed (same on every rank)."""
    shape = spec(cfg.data)
    return build(cfg.model, shape.channels, shape.image_size, shape.num_classes,
                 cfg.train.seed)


def sgd(modules: list[nn.Module | None], cfg: TrainConfig) -> torch.optim.SGD | None:
    """One SGD over the parameters of ``modules`` (None entries skipped); None if none."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    return (torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay) if params else None)


def _resnet50(cut: str, channels: int, image_size: int, num_classes: int) -> SplitModel:
    """torchvision's ResNet-50 (random init). Inputs under 64 px get the usual small-image
    stem (3x3 stride-1 conv, no max-pool) so 28/32 px images keep enough resolution.
    torchvision is imported here, not at the top: it costs every rank 1.5 s of start-up and
    170 MB, which cnn5 runs need not pay."""
    from torchvision.models import resnet50
    net = resnet50(weights=None, num_classes=num_classes)
    if image_size < 64:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
              net.layer4, net.avgpool, nn.Flatten()]
    split = 5 + RESNET_CUTS.index(cut)
    return SplitModel(nn.Sequential(*stages[:split]), nn.Sequential(*stages[split:]), net.fc)


def _cnn5(cut: int, channels: int, image_size: int, num_classes: int) -> SplitModel:
    """The spatio-temporal paper's CNN: five Conv2D(3x3)+ReLU+MaxPool blocks, Dense 512,
    Dense classes. ``ceil_mode`` pooling lets 28 px inputs through all five blocks."""
    blocks, width, size = [], channels, image_size
    for filters in CNN5_FILTERS:
        blocks.append(nn.Sequential(nn.Conv2d(width, filters, 3, padding=1), nn.ReLU(),
                                    nn.MaxPool2d(2, ceil_mode=True)))
        width, size = filters, -(-size // 2)
    cloud = nn.Sequential(*blocks[cut:], nn.Flatten(), nn.Linear(width * size * size, 512),
                          nn.ReLU())
    head = nn.Linear(512, num_classes)
    for layer in [*blocks, cloud, head]:
        layer.apply(_he_init)
    return SplitModel(nn.Sequential(*blocks[:cut]), cloud, head)


def _he_init(layer: nn.Module) -> None:
    """He init: with PyTorch's default, five plain ReLU blocks start on a long plateau."""
    if isinstance(layer, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
