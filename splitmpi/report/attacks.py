"""What the attacks recovered: their tables and figures.

Reads the ``/attack/<method>`` groups that ``splitmpi.attack`` writes, from
``reader.Run.groups["attack"]``, with numpy alone (no torch): the summary attributes for
the tables, the stored uint8 originals and reconstructions for the figures. And the
label inference a training run measured with ``attack.labels=true`` (``/attack/labels``,
``reader.Run.label_inference``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .plotting import pyplot, save, show, slug
from .render import Table, natural

DEFENSES = ("noise_sigma", "nopeek_alpha", "dropout")


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


def _fmt(v: float, digits: int = 2) -> float:
    return round(v, digits) if isinstance(v, float) and math.isfinite(v) else v


def attack_tables(runs) -> list[Table]:
    """The inversion tables (``inversion_tables``), then label inference
    (``label_table``)."""
    return inversion_tables(runs) + label_table(runs)


def label_table(runs) -> list[Table]:
    """Label inference from the feature gradients of each attack.labels run, per client,
    in its last epoch: the attacks' accuracies against chance (1 / the client's classes),
    with the label defense and the client's test accuracy. ``[]`` when no run has one."""
    rows = []
    for run in runs:
        defense = run.config.get("defense", {})
        for k, series in run.label_inference.items():
            if not len(series["rows"]):
                continue
            last = {name: float(v[-1]) for name, v in series.items()}
            rows.append({
                "path": str(run.path), "client": k, "epoch": len(series["rows"]),
                "grad_clip": defense.get("grad_clip", 0.0),
                "grad_noise": defense.get("grad_noise", 0.0),
                "cosine": _fmt(last["cosine_accuracy"], 3),
                "cluster": _fmt(last["cluster_accuracy"], 3),
                "cluster_known": _fmt(last["cluster_known_accuracy"], 3),
                "norm_auc": _fmt(last["norm_auc"], 3), "chance": _fmt(last["chance"], 3),
                "rows": int(last["rows"]) if math.isfinite(last["rows"]) else 0,
                "test_accuracy_pct": _fmt(100 * float(run.clients[k]["test_accuracy"][-1]))})
    title = ("Label inference from the U-shape's feature gradients (last epoch; accuracy "
             "of the label guessed for each row the attacker did not know)")
    return [Table(title, rows)] if rows else []


def inversion_tables(runs) -> list[Table]:
    """(title, rows) tables: leakage by cut and method (undefended runs), and the
    privacy/utility frontier (every defense and strength against the undefended run of
    the same arch, cut and method). Accuracies in percent, their changes in points."""
    records = attack_records(runs)
    if not records:
        return []
    order = sorted(records, key=lambda r: (r["arch"], natural(r["cut"]), r["method"],
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
        tables.append(Table("Inversion attack by cut and method (no defense; pixels in [0,1], "
                       "score = 1 - 1000*MSE)", by_cut))
    tables.append(Table("Privacy/utility frontier (accuracy vs attack PSNR/SSIM per defense and "
                   "strength; d_* against the undefended run)", frontier))
    return tables


def plot_attack(runs, outdir) -> list[Path]:
    """Per (arch, method) over undefended runs: a fig-3-like grid (originals, then one row
    of reconstructions per cut) and PSNR/SSIM by cut. Returns the written PNG paths."""
    records = [r for r in attack_records(runs) if r["defense"] == "none"]
    if not records:
        return []
    plt = pyplot()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch in sorted({r["arch"] for r in records}):
        mine = [r for r in records if r["arch"] == arch]
        for method in sorted({r["method"] for r in mine}):
            rows = sorted((r for r in mine if r["method"] == method),
                          key=lambda r: natural(r["cut"]))
            rows = [r for r in rows if "reconstructions" in r["group"]]
            if not rows:
                continue
            originals = rows[0]["group"]["originals"]
            cols = min(len(originals), *(len(r["group"]["reconstructions"]) for r in rows))
            fig, axes = plt.subplots(1 + len(rows), cols, squeeze=False,
                                     figsize=(1.2 * cols + 1.4, 1.25 * (1 + len(rows))))
            for j in range(cols):
                show(axes[0][j], originals[j])
                for i, r in enumerate(rows, start=1):
                    show(axes[i][j], r["group"]["reconstructions"][j])
            axes[0][0].set_ylabel("original", fontsize=8)
            for i, r in enumerate(rows, start=1):
                axes[i][0].set_ylabel(f"cut {r['cut']}\n{r['psnr_mean']:.1f} dB", fontsize=8)
            fig.suptitle(f"{arch}: {method} inversion by cut", fontsize=9)
            paths.append(save(fig, outdir / f"attack_grid_{slug(arch)}_{slug(method)}.png"))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
        for method in sorted({r["method"] for r in mine}):
            rows = sorted((r for r in mine if r["method"] == method),
                          key=lambda r: natural(r["cut"]))
            labels = [str(r["cut"]) for r in rows]
            a1.errorbar(labels, [r["psnr_mean"] for r in rows],
                        yerr=[r["psnr_std"] for r in rows], marker="o", capsize=3, label=method)
            a2.errorbar(labels, [r["ssim_mean"] for r in rows],
                        yerr=[r["ssim_std"] for r in rows], marker="o", capsize=3, label=method)
        a1.set(xlabel="cut", ylabel="PSNR (dB, [0,1] pixels)", title=f"{arch}: PSNR by cut")
        a2.set(xlabel="cut", ylabel="SSIM", title=f"{arch}: SSIM by cut")
        a1.legend(fontsize=8)
        paths.append(save(fig, outdir / f"attack_by_cut_{slug(arch)}.png"))
    return paths
