"""Client-side defenses against feature inversion, applied to what crosses the cut.

- Gaussian noise (``defense.noise_sigma``) on every activation sent, training and eval:
  the attacker sees what is sent, so the noise must be there at inference too.
- Differentially private activations (``defense.act_clip``, ``defense.act_epsilon``):
  each sample's row clipped to L2 norm act_clip, then noise of std sigma * act_clip, training
  and eval; sigma is solved by ``accountant.sigma_of`` so that the run's ``train.epochs``
  spend ``act_epsilon`` at ``act_delta``.
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

from . import accountant
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
    def __init__(self, cfg: DefenseConfig, epochs: int | None = None):
        """``epochs``: the run's ``train.epochs``, which the DP noise is solved over; needed
        only with ``defense.act_epsilon``."""
        super().__init__()
        self.sigma = cfg.noise_sigma
        self.act_clip = cfg.act_clip
        if cfg.act_clip > 0 and cfg.act_epsilon > 0 and epochs is None:
            raise ValueError("defense.act_epsilon solves the noise over the run's epochs: "
                             "pass Defense(cfg.defense, cfg.train.epochs)")
        self.act_sigma = accountant.sigma_of(cfg, epochs or 0)  # relative to act_clip
        self.alpha = cfg.nopeek_alpha
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.clip = cfg.grad_clip
        self.maxnorm = cfg.grad_maxnorm
        self.grad_sigma = cfg.grad_noise * cfg.grad_clip

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """The tensor actually sent for activation ``a`` (gradients flow through)."""
        a = self.dropout(a)
        if self.act_clip > 0:
            a = self.privatise(a)
        if self.sigma > 0:
            a = a + self.sigma * torch.randn_like(a)
        return a

    def privatise(self, a: torch.Tensor) -> torch.Tensor:
        """Each sample's row of ``a`` (flattened) clipped to L2 norm ``act_clip``, then
        Gaussian noise of std ``act_sigma * act_clip`` on each entry (after dropout, so its
        scaling cannot undo the clip)."""
        rows = a.flatten(1)  # (samples, values); also for a batch of 0 rows
        norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        rows = rows * (self.act_clip / norms).clamp(max=1)
        if self.act_sigma > 0:
            rows = rows + (self.act_sigma * self.act_clip) * torch.randn_like(rows)
        return rows.reshape(a.shape)

    def penalty(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """The NoPeek loss term, or None when it is off."""
        return self.alpha * distance_correlation(x, a) if self.alpha > 0 else None

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        """The feature gradient sent for ``g`` = dL/dh of a batch's mean loss. Each row
        times the batch size is the gradient of that sample's own loss, whatever the batch
        size: that is clipped to L2 norm ``grad_clip``; under ``grad_maxnorm`` it gets
        noise that brings its expected squared norm to the batch's largest (so the norm
        tells no label apart); it gets noise of std ``grad_noise * grad_clip``; then it is
        scaled back. Unchanged when every one of them is off."""
        if self.clip == 0 and not self.maxnorm:
            return g
        n = len(g)
        rows = g.reshape(n, -1) * n
        norms = rows.norm(dim=1, keepdim=True)
        if self.clip > 0:
            rows = rows * (self.clip / norms.clamp_min(1e-12)).clamp(max=1)
            norms = norms.clamp(max=self.clip)
        if self.maxnorm and n:
            std = ((norms.max() ** 2 - norms ** 2).clamp_min(0) / rows.shape[1]).sqrt()
            rows = rows + std * torch.randn_like(rows)
        if self.grad_sigma > 0:
            rows = rows + self.grad_sigma * torch.randn_like(rows)
        return (rows / n).reshape(g.shape)
