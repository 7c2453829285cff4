"""What every figure of the report shares: a headless matplotlib, file names, the finish."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 120


def pyplot():
    """matplotlib.pyplot on the Agg backend: reports are drawn on login nodes and in batch
    jobs, without a display; imported here alone, so tables need no matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def slug(text: str) -> str:
    """``text`` as a piece of a file name: letters, digits, ``-_.``, the rest ``_``."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def show(ax, image: np.ndarray) -> None:
    """A uint8 (H, W, C) image without ticks; one channel in grey."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, path: Path) -> Path:
    """The common finish of every figure: tight layout, PNG, close (a sweep draws many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return path
