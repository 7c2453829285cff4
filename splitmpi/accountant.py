"""Privacy accounting of the differentially private activations (``defense.act_clip``,
``defense.act_epsilon``, ``defense.act_delta``; docs/privacy.md, "Differentially private
activations"). Pure math: no torch, no MPI.

The mechanism. Before a client sends a training or test activation, each sample's row
(flattened) is clipped to L2 norm C = ``act_clip`` and Gaussian noise N(0, (sigma C)^2) is
added to every entry (``defense.Defense.forward``). sigma is the *noise multiplier*,
relative to C.

Adjacency and sensitivity. Two data sets are adjacent when one training sample is replaced
by another (replace-one). A row of norm at most C can move to any other such row, so the L2
sensitivity of one sample's release is 2C.

Renyi DP of one release (Mironov 2017, Prop. 7: the Gaussian mechanism with sensitivity
D and noise std s is (alpha, alpha D^2 / (2 s^2))-RDP): with D = 2C and s = sigma C,

    RDP(alpha) = alpha (2C)^2 / (2 sigma^2 C^2) = 2 alpha / sigma^2.

Composition. Every training epoch releases each training sample's activation exactly once
(no subsampling: sampling rate 1; other samples' releases do not touch it), so after T
epochs RDP adds up:

    RDP_T(alpha) = 2 alpha T / sigma^2 = a alpha,   a = 2T / sigma^2.

Conversion to (epsilon, delta) (Mironov 2017, Prop. 3):

    epsilon = min over alpha > 1 of [RDP_T(alpha) + log(1/delta) / (alpha - 1)].

With b = log(1/delta), the minimum over real alpha > 1 is at alpha = 1 + sqrt(b/a):

    epsilon = a + 2 sqrt(a b).

Its inverse, for the noise that spends a target epsilon in T epochs: sqrt(a) solves
s^2 + 2 s sqrt(b) - epsilon = 0, so

    a = (sqrt(b + epsilon) - sqrt(b))^2,   sigma = sqrt(2T / a).

The test-phase releases (evaluation, on the test split) are not counted: the accounting is
of the training samples. What the noise protects is the activation as sent; the gradients
that come back, and the labels under ``label_sharing``, are not covered.
"""
from __future__ import annotations

import math

from .config import DefenseConfig


def rdp(alpha: float, sigma: float, epochs: int) -> float:
    """Renyi DP of order ``alpha`` after ``epochs`` releases of noise multiplier
    ``sigma``: 2 alpha T / sigma^2 (inf without noise)."""
    if sigma <= 0:
        return math.inf
    return 2.0 * alpha * epochs / sigma ** 2


def epsilon(sigma: float, epochs: int, delta: float) -> float:
    """(epsilon, delta)-DP after ``epochs`` epochs: a + 2 sqrt(a log(1/delta)), with
    a = 2T / sigma^2 (the minimum over real alpha > 1 of the RDP conversion). 0 after no
    epoch; inf without noise."""
    if epochs <= 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    a = 2.0 * epochs / sigma ** 2
    return a + 2.0 * math.sqrt(a * math.log(1.0 / delta))


def epsilon_on_grid(sigma: float, epochs: int, delta: float,
                    alphas=None) -> float:
    """The same conversion minimised over a grid of orders alpha > 1 (the way RDP
    accountants such as Opacus' do it): an upper bound of ``epsilon``, close to it on a
    fine grid."""
    if alphas is None:
        alphas = [1 + x / 100.0 for x in range(1, 100)] + [2 + x / 10.0 for x in range(0, 990)]
    b = math.log(1.0 / delta)
    return min(rdp(alpha, sigma, epochs) + b / (alpha - 1) for alpha in alphas)


def noise_multiplier(target: float, epochs: int, delta: float) -> float:
    """The sigma for which ``epsilon(sigma, epochs, delta) == target``:
    sqrt(2T / a), a = (sqrt(log(1/delta) + target) - sqrt(log(1/delta)))^2."""
    if target <= 0 or epochs <= 0 or not 0 < delta < 1:
        raise ValueError(f"need target > 0, epochs > 0 and 0 < delta < 1, got {target}, "
                         f"{epochs}, {delta}")
    b = math.log(1.0 / delta)
    a = (math.sqrt(b + target) - math.sqrt(b)) ** 2
    return math.sqrt(2.0 * epochs / a)


def sigma_of(cfg: DefenseConfig, epochs: int) -> float:
    """The noise multiplier a run uses: solved from ``act_epsilon`` over the run's
    ``train.epochs``; 0 when the target is off (clipping only) or the clip is off."""
    if cfg.act_clip <= 0 or cfg.act_epsilon <= 0:
        return 0.0
    return noise_multiplier(cfg.act_epsilon, epochs, cfg.act_delta)


def spent(cfg: DefenseConfig, epochs: int, done: int) -> float:
    """Epsilon at ``act_delta`` after ``done`` of a run's ``epochs`` training epochs (inf
    when clipping without noise)."""
    return epsilon(sigma_of(cfg, epochs), done, cfg.act_delta)
