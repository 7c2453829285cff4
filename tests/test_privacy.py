"""Reconstruction metrics against known values, and the report's tables and figures."""
import math

import numpy as np
import pytest
import torch

from splitmpi import attack, config, privacy, reader


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_images():
    x = rand(3, 3, 16, 16)
    assert torch.isinf(privacy.psnr(x, x)).all()
    assert torch.allclose(privacy.ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert (privacy.mse(x, x) == 0).all() and (privacy.score(x, x) == 1).all()


@pytest.mark.parametrize("e", [0.01, 0.05, 0.2])
def test_uniform_error_psnr(e):
    x = 0.2 + 0.5 * rand(2, 1, 20, 20)
    y = x + e  # every pixel off by e
    expected = -10 * math.log10(e ** 2)
    assert torch.allclose(privacy.psnr(x, y), torch.full((2,), expected, dtype=torch.float64))
    assert torch.allclose(privacy.score(x, y), torch.full((2,), 1 - 1000 * e ** 2,
                                                          dtype=torch.float64))
    # random signs, same magnitude: same MSE, same PSNR
    sign = torch.where(rand(2, 1, 20, 20, seed=1) > 0.5, 1.0, -1.0).double()
    assert torch.allclose(privacy.psnr(x, x + e * sign), torch.full((2,), expected,
                                                                    dtype=torch.float64))


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.5, 0.25
    c1 = (0.01 * 1) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # no variance: contrast term is 1
    got = privacy.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def naive_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s formula window by window (valid positions), one channel."""
    size, sigma = 11, 1.5
    g = np.exp(-((np.arange(size) - 5) ** 2) / (2 * sigma ** 2))
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
    assert privacy.ssim(x, y).item() == pytest.approx(expected, rel=1e-9)
    assert 0.3 < expected < 0.99
    # noisier reconstruction, lower SSIM and PSNR
    z = (x + 0.5 * (rand(1, 2, 18, 17, seed=4) - 0.5)).clamp(0, 1)
    assert privacy.ssim(x, z).item() < expected
    assert privacy.psnr(x, z).item() < privacy.psnr(x, y).item()


def test_small_images_and_ranges():
    x = rand(2, 3, 8, 8)
    assert privacy.ssim(x, x).shape == (2,)  # 7x7 window fits an 8 px image
    assert torch.equal(privacy.to_unit(torch.tensor([-1.0, 0.0, 1.0, 3.0])),
                       torch.tensor([0.0, 0.5, 1.0, 1.0]))
    u8 = privacy.to_uint8(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1))
    assert u8.dtype == np.uint8 and u8.shape == (1, 1, 1, 3) and u8.ravel().tolist() == [
        0, 128, 255]
    s = privacy.summarise({"psnr": np.array([10.0, 20.0])})
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
    target = attack.Target(torch.nn.Sequential(), None, 0.9 - 0.01 * sum(defense.values()), "x")
    attack.write(cfg, method, target, ev, result, {"eval_source": "test"})


def test_tables_and_plots(tmp_path):
    write_fake(tmp_path / "a.h5", 1, 30.0)
    write_fake(tmp_path / "a.h5", 1, 20.0, method="rmle")
    write_fake(tmp_path / "b.h5", 3, 15.0)
    write_fake(tmp_path / "c.h5", 1, 22.0, noise_sigma=0.5)
    runs = [reader.read(tmp_path / n) for n in ("a.h5", "b.h5", "c.h5")]
    tables = dict(privacy.attack_tables(runs))
    assert len(tables) == 2
    by_cut, frontier = tables.values()
    assert [(r["cut"], r["method"]) for r in by_cut] == [(1, "decoder"), (1, "rmle"),
                                                         (3, "decoder")]
    assert by_cut[0]["psnr_db"] == pytest.approx(30.0, abs=0.01)
    noisy = [r for r in frontier if r["defense"] == "noise"]
    assert len(noisy) == 1 and noisy[0]["strength"] == 0.5
    assert noisy[0]["d_psnr_db"] == pytest.approx(-8.0, abs=0.01)
    assert noisy[0]["d_accuracy_points"] == pytest.approx(-0.5, abs=0.01)
    paths = privacy.plot_attack(runs, tmp_path / "fig")
    assert {p.name for p in paths} == {"attack_grid_cnn5_decoder.png",
                                       "attack_grid_cnn5_rmle.png", "attack_by_cut_cnn5.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
    assert privacy.attack_tables([]) == [] and privacy.plot_attack([], tmp_path) == []


def test_wire_figure(tmp_path):
    cfg = config.load(None, ["data.image_size=16", "data.train_size=60", "data.test_size=30"])
    path = privacy.wire_figure(cfg, tmp_path)
    assert path.exists() and path.stat().st_size > 1000
