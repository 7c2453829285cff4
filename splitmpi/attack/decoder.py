"""The decoder attack (He et al. 2019's inverse network, the split-learning paper's attack).

A decoder mirroring the extractor (one transposed convolution per down-sampling stage, a
3x3 convolution per stage that keeps the size, tanh output) is trained on (features, image)
pairs from auxiliary images the attacker holds, then applied to the features of the
client's held-out images. Features are computed as the server receives them: extractor and
defense in eval mode (noise on, dropout off), fresh noise per use.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..config import Config
from ..errors import ConfigError
from ..logs import Pace, Progress
from . import metrics
from .target import Target, observe

log = logging.getLogger(__name__)


class FitTo(nn.Module):
    """Crop (or, rarely, resize) to a stage's spatial size: ceil-mode pooling makes odd
    sizes that a stride-2 transposed convolution overshoots by one."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        if x.shape[-2] >= h and x.shape[-1] >= w:
            return x[..., :h, :w]
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def stage_shapes(extractor: nn.Module, shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(C, H, W) of the input and after each step of the extractor that changes it: the
    stages the decoder mirrors. Image-shaped activations only: the decoder is
    convolutional."""
    steps = list(models.shapes(extractor, shape).values()) or [tuple(shape)]
    if len(steps[-1]) != 3:
        raise ConfigError(f"the decoder attack needs an image-shaped activation (C, H, W); "
                          f"this cut sends {'x'.join(map(str, steps[-1]))} per sample",
                          "attack a cut before the network flattens its activation (python "
                          "-m splitmpi --list-cuts shows their shapes), or use "
                          "attack.method=rmle")
    stages = [tuple(shape)]
    for step in steps:
        if len(step) == 3 and step != stages[-1]:
            stages.append(step)
    return stages


def _conv_bn_relu(conv: nn.Module, width: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]


def build_decoder(shapes: list[tuple[int, int, int]], min_width: int = 32) -> nn.Sequential:
    """The extractor's stages mirrored, last first: per stage a stride-2 transposed
    convolution for each halving of the size (a 3x3 convolution when the size is kept)
    back to that stage's input width, then a 3x3 refining convolution; a final 3x3
    convolution to the image channels and tanh (images are in [-1, 1])."""
    layers: list[nn.Module] = []
    c = width = shapes[-1][0]
    for i in range(len(shapes) - 1, 0, -1):
        (c_out, h_out, _), (c_in, h_in, w_in) = shapes[i], shapes[i - 1]
        width = max(c_in if i > 1 else c_out, min_width)
        doublings = max(0, round(math.log2(max(h_in / h_out, 1e-9))))
        if doublings == 0:
            layers += _conv_bn_relu(nn.Conv2d(c, width, 3, padding=1), width)
        for _ in range(doublings):
            layers += _conv_bn_relu(nn.ConvTranspose2d(c, width, 4, stride=2, padding=1), width)
            c = width
        layers += [FitTo((h_in, w_in))]
        layers += _conv_bn_relu(nn.Conv2d(width, width, 3, padding=1), width)
        c = width
    if not layers:  # nothing on the client (cnn5 cut 0): the features are the image
        width = min_width
        layers += _conv_bn_relu(nn.Conv2d(c, width, 3, padding=1), width)
    layers += [nn.Conv2d(width, shapes[0][0], 3, padding=1), nn.Tanh()]
    return nn.Sequential(*layers)


def decoder_attack(cfg: Config, target: Target, aux: torch.Tensor, evaluated: torch.Tensor,
                   device: torch.device) -> dict:
    """Train the inverse network on the auxiliary images, reconstruct the evaluated ones."""
    a = cfg.attack
    torch.manual_seed(cfg.train.seed * 1000 + 2)
    decoder = build_decoder(stage_shapes(target.extractor, tuple(aux.shape[1:])),
                            min_width=a.decoder_width).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=a.lr)
    order = torch.Generator().manual_seed(cfg.train.seed * 1000 + 3)
    history, eval_history = [], []
    observed = observe(target, evaluated)
    for epoch in range(a.epochs):
        decoder.train()
        loss_sum = 0.0
        progress = Progress(log, f"  decoder epoch {epoch + 1}/{a.epochs}", len(aux), "images",
                            Pace.of(cfg.train), repeats=a.epochs - epoch - 1)
        for idx in torch.randperm(len(aux), generator=order).split(a.batch_size):
            if len(idx) < 2 and len(aux) >= 2:
                continue  # BatchNorm needs two samples
            x = aux[idx].to(device)
            loss = F.mse_loss(decoder(observe(target, x)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            progress.update(len(idx))
        history.append(loss_sum / len(aux))
        recon = _decode(decoder, observed)
        eval_history.append(float(metrics.mse(metrics.to_unit(evaluated),
                                              metrics.to_unit(recon.cpu())).mean()))
        log.info(f"  decoder epoch {epoch + 1}/{a.epochs}: aux loss {history[-1]:.5f}, "
                 f"evaluated MSE [0,1] {eval_history[-1]:.5f}")
    recon = _decode(decoder, observed)
    return {"reconstruction": recon.cpu(),
            "series": {"train_loss": np.asarray(history, dtype=np.float64),
                       "eval_mse": np.asarray(eval_history, dtype=np.float64)},
            "attrs": {"epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size,
                      "decoder_width": a.decoder_width,
                      "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
                      "decoder": "mirrored extractor: ConvTranspose2d(4, stride 2) per "
                                 "halving, Conv2d(3) per kept size, BN+ReLU, tanh output",
                      "train_loss": "MSE on [-1,1] pixels, aux images"}}


@torch.no_grad()
def _decode(decoder: nn.Module, features: torch.Tensor, batch: int = 256) -> torch.Tensor:
    decoder.eval()
    return torch.cat([decoder(features[i:i + batch]) for i in range(0, len(features), batch)])
