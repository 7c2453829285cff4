"""The white-box attack: regularised maximum likelihood (rMLE).

Knowing the extractor weights, Adam optimises an input, from mid-grey (zeros) plus faint
noise, so that its features match the observed ones (MSE), plus ``attack.rmle_tv`` times
its total variation; pixels are clamped to [-1, 1] after each step.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..logs import Pace, Progress
from .target import Target, observe

log = logging.getLogger(__name__)

RMLE_INIT_STD = 0.05


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per pixel: mean |vertical| + mean |horizontal| neighbour difference."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def rmle(extractor: nn.Module, observed: torch.Tensor, shape: tuple, steps: int, tv: float,
         lr: float, start: torch.Tensor | None = None, seed: int = 0,
         progress: Progress | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Optimise inputs so ``extractor(x)`` matches ``observed``, from ``start`` or mid-grey
    (zeros) plus N(0, 0.05^2) noise (exact zeros can sit where every ReLU gradient is 0).
    Each step counts one into ``progress``.

    Returns the inputs in [-1, 1] and the feature MSE before each step (and after the last).
    """
    device = observed.device
    if start is None:
        g = torch.Generator().manual_seed(seed)
        start = RMLE_INIT_STD * torch.randn(shape, generator=g)
    x = start.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    history = []
    for _ in range(steps):
        mismatch = F.mse_loss(extractor(x), observed)
        loss = mismatch + tv * total_variation(x) if tv > 0 else mismatch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
        history.append(mismatch.item())
        if progress is not None:
            progress.update(1)
    with torch.no_grad():
        history.append(F.mse_loss(extractor(x), observed).item())
    return x.detach(), np.asarray(history, dtype=np.float64)


def rmle_attack(cfg: Config, target: Target, evaluated: torch.Tensor) -> dict:
    a = cfg.attack
    observed = observe(target, evaluated)
    log.info(f"  rMLE: {a.rmle_steps} Adam steps (lr {a.rmle_lr}, TV {a.rmle_tv}) on "
             f"{len(evaluated)} images")
    progress = Progress(log, "  rMLE", a.rmle_steps, "steps", Pace.of(cfg.train))
    recon, history = rmle(target.extractor, observed, tuple(evaluated.shape), a.rmle_steps,
                          a.rmle_tv, a.rmle_lr, seed=cfg.train.seed, progress=progress)
    log.info(f"  rMLE: feature MSE {history[0]:.5f} -> {history[-1]:.5f}")
    return {"reconstruction": recon.cpu(), "series": {"feature_mse": history},
            "attrs": {"steps": a.rmle_steps, "tv": a.rmle_tv, "lr": a.rmle_lr,
                      "init": f"zeros (mid-grey) + N(0, {RMLE_INIT_STD}^2) noise",
                      "feature_mse_start": float(history[0]),
                      "feature_mse_end": float(history[-1])}}
