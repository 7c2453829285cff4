"""Differentially private activations (defense.act_clip / act_epsilon / act_delta): the
accountant's math, the clip and noise of Defense.forward, the settings refused, and one
real run whose results file holds the epsilon spent per epoch (docs/privacy.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mpirun
from splitmpi import accountant, config, reader
from splitmpi.config import DefenseConfig
from splitmpi.defense import Defense
from splitmpi.errors import ConfigError


@pytest.mark.parametrize("sigma,epochs,delta", [(1.0, 1, 1e-5), (3.0, 5, 1e-5),
                                                (20.0, 100, 1e-6), (0.7, 10, 1e-3)])
def test_closed_form_is_the_minimum_over_orders(sigma, epochs, delta):
    closed = accountant.epsilon(sigma, epochs, delta)
    grid = accountant.epsilon_on_grid(sigma, epochs, delta,
                                      alphas=np.linspace(1.0001, 2000, 400_000))
    assert grid >= closed - 1e-9  # the closed form is the exact minimum
    assert grid == pytest.approx(closed, rel=1e-4)
    # and the default, coarser grid stays close above it
    assert accountant.epsilon_on_grid(sigma, epochs, delta) == pytest.approx(closed, rel=2e-2)


def test_rdp_of_one_release_is_that_of_the_gaussian_mechanism():
    # sensitivity 2C, noise std sigma C: alpha (2C)^2 / (2 sigma^2 C^2)
    assert accountant.rdp(3.0, 2.0, 1) == pytest.approx(3.0 * 4 / (2 * 4))
    assert accountant.rdp(3.0, 2.0, 7) == pytest.approx(7 * accountant.rdp(3.0, 2.0, 1))


@pytest.mark.parametrize("target,epochs,delta", [(8, 2, 1e-5), (1, 5, 1e-5),
                                                 (0.1, 50, 1e-6), (30, 1, 0.01)])
def test_solving_sigma_gives_back_the_target(target, epochs, delta):
    sigma = accountant.noise_multiplier(target, epochs, delta)
    assert accountant.epsilon(sigma, epochs, delta) == pytest.approx(target, rel=1e-12)


def test_epsilon_grows_with_epochs_and_falls_with_sigma():
    eps = [accountant.epsilon(2.0, t, 1e-5) for t in range(0, 10)]
    assert eps[0] == 0 and all(b > a for a, b in zip(eps, eps[1:]))
    by_sigma = [accountant.epsilon(s, 5, 1e-5) for s in (0.5, 1, 2, 4, 8)]
    assert all(b < a for a, b in zip(by_sigma, by_sigma[1:]))
    assert accountant.epsilon(0.0, 3, 1e-5) == math.inf
    cfg = DefenseConfig(act_clip=1, act_epsilon=4)
    spent = [accountant.spent(cfg, 6, t) for t in range(1, 7)]
    assert all(b > a for a, b in zip(spent, spent[1:])) and spent[-1] == pytest.approx(4)


def test_defense_clips_each_row_and_adds_noise_of_the_right_std():
    torch.manual_seed(0)
    clip, epochs = 2.0, 3
    cfg = DefenseConfig(act_clip=clip)  # clipping only
    a = torch.randn(64, 8, 4, 4) * torch.linspace(0.01, 3, 64).reshape(64, 1, 1, 1)
    out = Defense(cfg).eval()(a)
    norms = a.reshape(64, -1).norm(dim=1)
    sent = out.reshape(64, -1).norm(dim=1)
    assert torch.allclose(sent, norms.clamp(max=clip), rtol=1e-5)
    big = norms > clip
    assert big.any() and (~big).any()
    assert torch.allclose(out[~big], a[~big])  # rows under the clip are unchanged
    # the direction is kept
    cos = torch.nn.functional.cosine_similarity(out.reshape(64, -1), a.reshape(64, -1))
    assert torch.allclose(cos, torch.ones(64), atol=1e-5)

    noisy_cfg = DefenseConfig(act_clip=clip, act_epsilon=2.0)
    with pytest.raises(ValueError, match="epochs"):
        Defense(noisy_cfg)
    d = Defense(noisy_cfg, epochs).eval()  # eval mode: the noise stays on
    sigma = accountant.noise_multiplier(2.0, epochs, 1e-5)
    assert d.act_sigma == pytest.approx(sigma)
    zeros = torch.zeros(2000, 128)
    noise = d(zeros)
    assert noise.mean().abs() < 0.01 * sigma * clip
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.01)  # 256k draws
    x = torch.full((500, 128), 10.0)  # every row clipped to norm 2
    y = d(x)
    expected = torch.full((128,), clip / math.sqrt(128))
    assert torch.allclose(y.mean(0), expected, atol=5 * sigma * clip / math.sqrt(500))


def test_gradients_flow_through_the_clip():
    a = torch.randn(4, 10, requires_grad=True)
    Defense(DefenseConfig(act_clip=0.5))(a).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("overrides,words", [
    (["defense.act_epsilon=8"], "act_clip"),
    (["defense.act_clip=-1"], "act_clip"),
    (["defense.act_clip=1", "defense.act_epsilon=-2"], "act_epsilon"),
    (["defense.act_clip=1", "defense.act_epsilon=8", "defense.act_delta=0"], "act_delta"),
    (["defense.act_clip=1", "defense.act_epsilon=8", "defense.act_delta=1"], "act_delta"),
    (["defense.act_clip=1", "defense.noise_sigma=0.5"], "drop defense.noise_sigma"),
])
def test_bad_settings_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        config.load(None, overrides)


def test_good_settings_load():
    cfg = config.load(None, ["defense.act_clip=5", "defense.act_epsilon=8",
                             "defense.act_delta=0.000001"])
    assert (cfg.defense.act_clip, cfg.defense.act_epsilon, cfg.defense.act_delta) == (5, 8, 1e-6)
    assert config.load(None, []).defense.act_clip == 0


def test_a_run_records_the_epsilon_it_spent(tmp_path):
    proc = mpirun.ok(3, *mpirun.TINY, "defense.act_clip=10", "defense.act_epsilon=8",
                     "output=r.h5", cwd=tmp_path)
    run = reader.read(tmp_path / "r.h5")
    eps = run.epsilon
    assert eps is not None and eps.dtype == np.float64 and eps.shape == (2,)
    assert abs(eps[-1] - 8) < 1e-6 and 0 < eps[0] < eps[1]
    sigma = accountant.noise_multiplier(8, 2, 1e-5)
    assert eps[0] == pytest.approx(accountant.epsilon(sigma, 1, 1e-5))
    log = proc.stdout + proc.stderr
    assert "epoch 2/2 DP activations: epsilon 8.0000 at delta 1e-05" in log
    for k, series in run.clients.items():
        assert series["train_loss"][-1] < series["train_loss"][0], (k, series["train_loss"])
    assert "act_clip" in run.config["defense"]
    # a run without DP activations has no series (the plain file's groups lack "privacy")
    plain = reader.Run(tmp_path, {}, {}, {}, {}, np.zeros(0), {}, groups={"attack": {}})
    assert plain.epsilon is None
