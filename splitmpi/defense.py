"""Client-side defenses against feature inversion, applied to what crosses the cut.

- Gaussian noise (``defense.noise_sigma``) on every activation sent, training and eval:
  the attacker sees what is sent, so the noise must be there at inference too.
- Dropout on the cut (``defense.dropout``), training only.
- NoPeek (``defense.nopeek_alpha``): alpha * distance correlation between the inputs and
  the activations, added to the client's loss so the extractor learns to decorrelate them.

And one against label inference (u_shape), applied to the feature gradient a client sends
back (``Defense.gradient``): each sample's row clipped to ``defense.grad_clip`` and, with
``defense.grad_noise``, Gaussian noise added (DP-SGD's clip-and-noise on dL/dh). The
server's cloud and, through the activation gradient, the client's extractor learn from
that defended gradient; the client's classifier keeps its own true gradient
(docs/privacy.md, "Labels in the U-shape").
"""
from __future__ import annotations

import torch
from torch import nn

from .config import DefenseConfig


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al.) between two batches, in [0, 1]."""
    a = _centred_distances(x.reshape(len(x), -1).float())
    b = _centred_distances(z.reshape(len(z), -1).float())
    dcov_xy = (a * b).mean()
    dcov_xx, dcov_yy = (a * a).mean(), (b * b).mean()
    return (dcov_xy.clamp_min(0) / (dcov_xx * dcov_yy).sqrt().clamp_min(1e-12)).sqrt()


def _centred_distances(v: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(v, v)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


class Defense(nn.Module):
    def __init__(self, cfg: DefenseConfig):
        super().__init__()
        self.sigma = cfg.noise_sigma
        self.alpha = cfg.nopeek_alpha
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.clip = cfg.grad_clip
        self.grad_sigma = cfg.grad_noise * cfg.grad_clip

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """The tensor actually sent for activation ``a`` (gradients flow through)."""
        a = self.dropout(a)
        if self.sigma > 0:
            a = a + self.sigma * torch.randn_like(a)
        return a

    def penalty(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """The NoPeek loss term, or None when it is off."""
        return self.alpha * distance_correlation(x, a) if self.alpha > 0 else None

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        """The feature gradient sent for ``g`` = dL/dh of a batch's mean loss. Each row
        times the batch size is the gradient of that sample's own loss, whatever the batch
        size: that is clipped to L2 norm ``grad_clip`` and gets noise of std
        ``grad_noise * grad_clip``, then it is scaled back. Unchanged when the clip is off."""
        if self.clip == 0:
            return g
        n = len(g)
        rows = g.reshape(n, -1) * n
        rows = rows * (self.clip / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1)
        if self.grad_sigma > 0:
            rows = rows + self.grad_sigma * torch.randn_like(rows)
        return (rows / n).reshape(g.shape)
