"""How close a reconstruction comes to the image it rebuilds: the attack's scores.

Pure torch: every function takes image batches ``(N, C, H, W)`` with pixels in **[0, 1]**
(``to_unit`` maps the data sets' [-1, 1] tensors there) and returns one value per image:

- ``mse``: mean squared pixel error.
- ``psnr``: ``10 log10(1 / MSE)`` dB (data range 1); ``inf`` for identical images.
- ``ssim``: Wang et al. (2004) structural similarity with the standard Gaussian window
  (11x11, sigma 1.5; K1 = 0.01, K2 = 0.03; data range 1), computed over "valid" window
  positions only (as the reference MATLAB code and scikit-image's cropping do), averaged
  over positions and then over channels. Images smaller than 11 px use the largest odd
  window that fits.
- ``score``: the split-learning paper's reconstruction score ``1 - 1000 * MSE`` on [0, 1]
  pixels (so 0 at MSE 1e-3, i.e. PSNR 30 dB, and negative below that PSNR).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PIXEL_RANGE = "[0,1]"
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (the data sets' range) -> [0, 1] pixels, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def _batch(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    return x


def mse(x, y) -> torch.Tensor:
    """Mean squared error per image (N,)."""
    x, y = _batch(x), _batch(y)
    return ((x - y) ** 2).flatten(1).mean(1)


def psnr(x, y, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image (N,); ``inf`` where the images are identical."""
    return 10 * torch.log10(data_range ** 2 / mse(x, y))


def score(x, y) -> torch.Tensor:
    """The paper's reconstruction score ``1 - 1000 * MSE`` on [0, 1] pixels, per image."""
    return 1 - 1000 * mse(x, y)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x, y, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean SSIM per image (N,), Gaussian window, valid positions, mean over channels."""
    x, y = _batch(x), _batch(y)
    n, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    kernel = _gaussian_window(size, sigma).expand(c, 1, size, size).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.mean(dim=(2, 3)).mean(1)


def metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image ``mse``, ``psnr``, ``ssim``, ``score`` of [0, 1] image batches."""
    o, r = original.detach().cpu(), reconstruction.detach().cpu()
    return {"mse": mse(o, r).numpy(), "psnr": psnr(o, r).numpy(),
            "ssim": ssim(o, r).numpy(), "score": score(o, r).numpy()}


def summarise(values: dict[str, np.ndarray]) -> dict[str, float]:
    """``<name>_mean`` and ``<name>_std`` (population std) of each per-image metric."""
    out = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        with np.errstate(invalid="ignore"):  # PSNR inf (a perfect image): mean inf, std nan
            out[f"{name}_mean"] = float(np.mean(v)) if len(v) else float("nan")
            out[f"{name}_std"] = float(np.std(v)) if len(v) else float("nan")
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[0, 1] images (N, C, H, W) -> uint8 (N, H, W, C) for storage and figures."""
    arr = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).numpy()
