"""Reconstruction metrics against known values, and the report's tables and figures."""
import math

import numpy as np
import pytest
import torch

from splitmpi import config, reader
from splitmpi.attack import metrics
from splitmpi.attack.output import write
from splitmpi.attack.target import Target
from splitmpi.report.attacks import attack_tables, plot_attack
from splitmpi.report.wire import wire_figure


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_images():
    x = rand(3, 3, 16, 16)
    assert torch.isinf(metrics.psnr(x, x)).all()
    assert torch.allclose(metrics.ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert (metrics.mse(x, x) == 0).all() and (metrics.score(x, x) == 1).all()


@pytest.mark.parametrize("e", [0.01, 0.05, 0.2])
def test_uniform_error_psnr(e):
    x = 0.2 + 0.5 * rand(2, 1, 20, 20)
    y = x + e  # every pixel off by e
    expected = -10 * math.log10(e ** 2)
    assert torch.allclose(metrics.psnr(x, y), torch.full((2,), expected, dtype=torch.float64))
    assert torch.allclose(metrics.score(x, y), torch.full((2,), 1 - 1000 * e ** 2,
                                                          dtype=torch.float64))
    # random signs, same magnitude: same MSE, same PSNR
    sign = torch.where(rand(2, 1, 20, 20, seed=1) > 0.5, 1.0, -1.0).double()
    assert torch.allclose(metrics.psnr(x, x + e * sign), torch.full((2,), expected,
                                                                    dtype=torch.float64))


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.5, 0.25
    c1 = (0.01 * 1) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # no variance: contrast term is 1
    got = metrics.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def naive_ssim(x: np.ndarray, y: np.ndarray, size: int = 11) -> float:
    """Wang et al.'s formula window by window (valid positions), one channel, a ``size`` x
    ``size`` Gaussian window of sigma 1.5."""
    sigma = 1.5
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2)
                          / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_windowed_formula_and_averages_channels():
    x = rand(1, 2, 18, 17)
    y = (x + 0.15 * (rand(1, 2, 18, 17, seed=3) - 0.5)).clamp(0, 1)
    expected = np.mean([naive_ssim(x[0, c].numpy(), y[0, c].numpy()) for c in range(2)])
    assert metrics.ssim(x, y).item() == pytest.approx(expected, rel=1e-9)
    assert 0.3 < expected < 0.99
    # noisier reconstruction, lower SSIM and PSNR
    z = (x + 0.5 * (rand(1, 2, 18, 17, seed=4) - 0.5)).clamp(0, 1)
    assert metrics.ssim(x, z).item() < expected
    assert metrics.psnr(x, z).item() < metrics.psnr(x, y).item()


@pytest.mark.parametrize("height, width, window", [(8, 8, 7), (8, 13, 7), (10, 9, 9),
                                                   (13, 10, 9), (12, 12, 11)])
def test_small_images_use_the_largest_odd_window_that_fits(height, width, window):
    x = rand(2, 1, height, width)
    y = (x + 0.3 * (rand(2, 1, height, width, seed=5) - 0.5)).clamp(0, 1)
    got = metrics.ssim(x, y)
    assert got.shape == (2,)
    for i in range(2):
        expected = naive_ssim(x[i, 0].numpy(), y[i, 0].numpy(), window)
        assert got[i].item() == pytest.approx(expected, rel=1e-9)
        # the images tell windows apart: one size smaller would not match
        assert got[i].item() != pytest.approx(naive_ssim(x[i, 0].numpy(), y[i, 0].numpy(),
                                                         window - 2), rel=1e-6)


def test_ranges_and_summary():
    assert torch.equal(metrics.to_unit(torch.tensor([-1.0, 0.0, 1.0, 3.0])),
                       torch.tensor([0.0, 0.5, 1.0, 1.0]))
    u8 = metrics.to_uint8(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1))
    assert u8.dtype == np.uint8 and u8.shape == (1, 1, 1, 3) and u8.ravel().tolist() == [
        0, 128, 255]
    s = metrics.summarise({"psnr": np.array([10.0, 20.0])})
    assert s == {"psnr_mean": 15.0, "psnr_std": 5.0}


def fake_result(psnr_db: float, n=4, size=8, seed=0) -> tuple[torch.Tensor, dict]:
    """Evaluated images in [-1, 1] and a reconstruction off by a uniform error."""
    ev = rand(n, 1, size, size, seed=seed).float() * 1.6 - 0.8
    e = 10 ** (-psnr_db / 20)  # [0,1]-pixel error
    return ev, {"reconstruction": ev + 2 * e, "series": {"train_loss": np.ones(2)},
                "attrs": {}}


def write_fake(path, cut, psnr_db, method="decoder", **defense):
    cfg = config.load(None, [f"model.cut={cut}", f"attack.output={path}", f"attack.method={method}",
                             *[f"defense.{k}={v}" for k, v in defense.items()]])
    ev, result = fake_result(psnr_db)
    target = Target(torch.nn.Sequential(), None, 0.9 - 0.01 * sum(defense.values()), "x")
    write(cfg, method, target, ev, result, {"eval_source": "test"})


def test_tables_and_plots(tmp_path):
    write_fake(tmp_path / "a.h5", 1, 30.0)
    write_fake(tmp_path / "a.h5", 1, 20.0, method="rmle")
    write_fake(tmp_path / "b.h5", 3, 15.0)
    write_fake(tmp_path / "c.h5", 1, 22.0, noise_sigma=0.5)
    runs = [reader.read(tmp_path / n) for n in ("a.h5", "b.h5", "c.h5")]
    tables = dict(attack_tables(runs))
    assert len(tables) == 2
    by_cut, frontier = tables.values()
    assert [(r["cut"], r["method"]) for r in by_cut] == [(1, "decoder"), (1, "rmle"),
                                                         (3, "decoder")]
    assert by_cut[0]["psnr_db"] == pytest.approx(30.0, abs=0.01)
    noisy = [r for r in frontier if r["defense"] == "noise"]
    assert len(noisy) == 1 and noisy[0]["strength"] == 0.5
    assert noisy[0]["d_psnr_db"] == pytest.approx(-8.0, abs=0.01)
    assert noisy[0]["d_accuracy_points"] == pytest.approx(-0.5, abs=0.01)
    paths = plot_attack(runs, tmp_path / "fig")
    assert {p.name for p in paths} == {"attack_grid_cnn5_decoder.png",
                                       "attack_grid_cnn5_rmle.png", "attack_by_cut_cnn5.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
    assert attack_tables([]) == [] and plot_attack([], tmp_path) == []


def test_wire_figure(tmp_path):
    cfg = config.load(None, ["data.image_size=16", "data.train_size=60", "data.test_size=30"])
    path = wire_figure(cfg, tmp_path)
    assert path.exists() and path.stat().st_size > 1000
