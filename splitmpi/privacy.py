"""Privacy metrics of reconstructions, and the tables and figures the report shows.

Metrics (pure torch): every function takes image batches ``(N, C, H, W)`` with pixels in
**[0, 1]** (``to_unit`` maps the data sets' [-1, 1] tensors there) and returns one value per
image:

- ``mse``: mean squared pixel error.
- ``psnr``: ``10 log10(1 / MSE)`` dB (data range 1); ``inf`` for identical images.
- ``ssim``: Wang et al. (2004) structural similarity with the standard Gaussian window
  (11x11, sigma 1.5; K1 = 0.01, K2 = 0.03; data range 1), computed over "valid" window
  positions only (as the reference MATLAB code and scikit-image's cropping do), averaged
  over positions and then over channels. Images smaller than 11 px use the largest odd
  window that fits.
- ``score``: the split-learning paper's reconstruction score ``1 - 1000 * MSE`` on [0, 1]
  pixels (so 0 at MSE 1e-3, i.e. PSNR 30 dB, and negative below that PSNR).

Report helpers, called by ``splitmpi.report`` with ``reader.Run`` objects whose
``groups["attack"]`` holds the ``/attack/<method>`` groups written by ``splitmpi.attack``:
``attack_tables``, ``plot_attack`` and ``wire_figure``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PIXEL_RANGE = "[0,1]"
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


# --- metrics ------------------------------------------------------------------------------

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


# --- reading attack groups back -----------------------------------------------------------

DEFENSES = ("noise_sigma", "nopeek_alpha", "dropout")
_CUT_ORDER = {"layer1": 1, "layer2": 2, "layer3": 3}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def attack_records(runs) -> list[dict]:
    """One flat record per ``/attack/<method>`` group over all runs."""
    records = []
    for run in runs:
        for method, g in sorted((getattr(run, "groups", {}) or {}).get("attack", {}).items()):
            if not isinstance(g, dict) or "@psnr_mean" not in g:
                continue
            attrs = {k[1:]: g[k] for k in g if k.startswith("@")}
            defense = {d: _num(attrs.get(f"defense_{d}", 0.0)) for d in DEFENSES}
            active = [d for d in DEFENSES if defense[d] > 0]
            kind = "+".join(d.split("_")[0] for d in active) or "none"
            strength = defense[active[0]] if len(active) == 1 else (0.0 if not active else
                                                                     float("nan"))
            cut = attrs.get("cut", "")
            cut = int(cut) if isinstance(cut, (int, np.integer)) else _text(cut)
            records.append({
                "path": str(run.path), "method": method, "arch": _text(attrs.get("arch", "")),
                "cut": cut, "defense": kind, "strength": strength,
                "accuracy": _num(attrs.get("utility_accuracy")),
                **{k: _num(attrs.get(k)) for k in (
                    "psnr_mean", "psnr_std", "ssim_mean", "ssim_std", "score_mean",
                    "score_std", "mse_mean", "mse_std")},
                "group": g})
    return records


def _cut_key(cut) -> tuple:
    return (_CUT_ORDER.get(cut, cut) if isinstance(cut, str) else cut, str(cut))


def _fmt(v: float, digits: int = 2) -> float:
    return round(v, digits) if isinstance(v, float) and math.isfinite(v) else v


def attack_tables(runs) -> list[tuple[str, list[dict]]]:
    """(title, rows) tables: leakage by cut and method (undefended runs), and the
    privacy/utility frontier (every defense and strength against the undefended run of
    the same arch, cut and method). Accuracies in percent, their changes in points."""
    records = attack_records(runs)
    if not records:
        return []
    order = sorted(records, key=lambda r: (r["arch"], _cut_key(r["cut"]), r["method"],
                                           r["defense"] != "none", r["defense"],
                                           r["strength"]))
    by_cut = [{"arch": r["arch"], "cut": r["cut"], "method": r["method"],
               "psnr_db": _fmt(r["psnr_mean"]), "psnr_std": _fmt(r["psnr_std"]),
               "ssim": _fmt(r["ssim_mean"], 3), "ssim_std": _fmt(r["ssim_std"], 3),
               "score": _fmt(r["score_mean"], 3), "mse": _fmt(r["mse_mean"], 5),
               "accuracy_pct": _fmt(100 * r["accuracy"])}
              for r in order if r["defense"] == "none"]
    base = {(r["arch"], r["cut"], r["method"]): r for r in order if r["defense"] == "none"}
    frontier = []
    for r in order:
        b = base.get((r["arch"], r["cut"], r["method"]))
        frontier.append({
            "arch": r["arch"], "cut": r["cut"], "method": r["method"],
            "defense": r["defense"], "strength": r["strength"],
            "accuracy_pct": _fmt(100 * r["accuracy"]), "psnr_db": _fmt(r["psnr_mean"]),
            "ssim": _fmt(r["ssim_mean"], 3),
            "d_accuracy_points": _fmt(100 * (r["accuracy"] - b["accuracy"])) if b else
            float("nan"),
            "d_psnr_db": _fmt(r["psnr_mean"] - b["psnr_mean"]) if b else float("nan"),
            "d_ssim": _fmt(r["ssim_mean"] - b["ssim_mean"], 3) if b else float("nan")})
    tables = []
    if by_cut:
        tables.append(("Inversion attack by cut and method (no defense; pixels in [0,1], "
                       "score = 1 - 1000*MSE)", by_cut))
    tables.append(("Privacy/utility frontier (accuracy vs attack PSNR/SSIM per defense and "
                   "strength; d_* against the undefended run)", frontier))
    return tables


# --- figures ------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _show(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def plot_attack(runs, outdir) -> list[Path]:
    """Per (arch, method) over undefended runs: a fig-3-like grid (originals, then one row
    of reconstructions per cut) and PSNR/SSIM by cut. Returns the written PNG paths."""
    records = [r for r in attack_records(runs) if r["defense"] == "none"]
    if not records:
        return []
    plt = _pyplot()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch in sorted({r["arch"] for r in records}):
        mine = [r for r in records if r["arch"] == arch]
        for method in sorted({r["method"] for r in mine}):
            rows = sorted((r for r in mine if r["method"] == method),
                          key=lambda r: _cut_key(r["cut"]))
            rows = [r for r in rows if "reconstructions" in r["group"]]
            if not rows:
                continue
            originals = rows[0]["group"]["originals"]
            cols = min(len(originals), *(len(r["group"]["reconstructions"]) for r in rows))
            fig, axes = plt.subplots(1 + len(rows), cols, squeeze=False,
                                     figsize=(1.2 * cols + 1.4, 1.25 * (1 + len(rows))))
            for j in range(cols):
                _show(axes[0][j], originals[j])
                for i, r in enumerate(rows, start=1):
                    _show(axes[i][j], r["group"]["reconstructions"][j])
            axes[0][0].set_ylabel("original", fontsize=8)
            for i, r in enumerate(rows, start=1):
                axes[i][0].set_ylabel(f"cut {r['cut']}\n{r['psnr_mean']:.1f} dB", fontsize=8)
            fig.suptitle(f"{arch}: {method} inversion by cut", fontsize=9)
            fig.tight_layout()
            path = outdir / f"attack_grid_{_slug(arch)}_{_slug(method)}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
        for method in sorted({r["method"] for r in mine}):
            rows = sorted((r for r in mine if r["method"] == method),
                          key=lambda r: _cut_key(r["cut"]))
            labels = [str(r["cut"]) for r in rows]
            a1.errorbar(labels, [r["psnr_mean"] for r in rows],
                        yerr=[r["psnr_std"] for r in rows], marker="o", capsize=3, label=method)
            a2.errorbar(labels, [r["ssim_mean"] for r in rows],
                        yerr=[r["ssim_std"] for r in rows], marker="o", capsize=3, label=method)
        a1.set(xlabel="cut", ylabel="PSNR (dB, [0,1] pixels)", title=f"{arch}: PSNR by cut")
        a2.set(xlabel="cut", ylabel="SSIM", title=f"{arch}: SSIM by cut")
        a1.legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"attack_by_cut_{_slug(arch)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def wire_figure(cfg, outdir, channels_shown: int = 6) -> Path:
    """What crosses the wire for one test sample in cnn5: per block (up to 3), a few
    activation maps after the conv+ReLU (before the max-pool) and after its max-pool.

    The network is ``models.build`` from ``cfg`` with arch cnn5 (weights from
    ``cfg.attack.checkpoint`` when given, else the seeded initial ones); the sample is the
    first test image of client 1.
    """
    from dataclasses import replace

    from . import data, models
    from .attack import clients_for, load_extractor_state

    plt = _pyplot()
    model_cfg = replace(cfg.model, arch="cnn5", cut=4)
    sp = data.spec(cfg.data)
    parts = models.build(model_cfg, sp.channels, sp.image_size, sp.num_classes, cfg.train.seed)
    if cfg.attack.checkpoint:
        state = load_extractor_state(cfg.attack.checkpoint)
        own = parts.extractor.state_dict()
        own.update({k: v for k, v in state.items() if k in own and own[k].shape == v.shape})
        parts.extractor.load_state_dict(own)
    _, test, _ = data.client_datasets(cfg, 1, clients_for(cfg))
    x = test[0][0][None]
    blocks = list(parts.extractor.children())[:3]
    rows = []
    with torch.no_grad():
        h = x
        for i, block in enumerate(blocks, start=1):
            conv, relu, pool = block
            before = relu(conv(h))
            h = pool(before)
            rows.append((f"block {i}: conv+ReLU ({'x'.join(map(str, before.shape[1:]))})",
                         before[0]))
            rows.append((f"block {i}: max-pool ({'x'.join(map(str, h.shape[1:]))})", h[0]))
    k = channels_shown
    fig, axes = plt.subplots(len(rows) + 1, k + 1, squeeze=False,
                             figsize=(1.3 * (k + 1), 1.3 * (len(rows) + 1)))
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].text(0.5, 0.5, "input\n(client side)", ha="center", va="center", fontsize=7)
    axes[0][1].axis("on")
    _show(axes[0][1], to_uint8(to_unit(x))[0])
    for i, (label, maps) in enumerate(rows, start=1):
        axes[i][0].text(0.5, 0.5, label.replace(" (", "\n("), ha="center", va="center",
                        fontsize=6)
        for j in range(k):
            ax = axes[i][j + 1]
            ax.axis("on")
            ax.imshow(maps[j % len(maps)].numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("cnn5: what crosses the wire (activation maps before vs after max-pool)",
                 fontsize=8)
    fig.tight_layout()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "wire_cnn5.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
