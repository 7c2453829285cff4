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

from ..reader import LIST_CLIENTS
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
            # the run's defense section (every defense key), else the group's attributes
            defense = (getattr(run, "config", None) or {}).get("defense") or {
                d: attrs.get(f"defense_{d}", 0.0) for d in DEFENSES}
            kind, strength = _cell_defense(defense)
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


LABEL_COLUMNS = (("cosine", "cosine_accuracy"), ("cluster", "cluster_accuracy"),
                 ("cluster_known", "cluster_known_accuracy"), ("norm_auc", "norm_auc"),
                 ("chance", "chance"))


def best_epoch(cosine, cluster) -> np.ndarray:
    """The attacker's best epoch: per client (the last axis) the highest of the cosine and
    cluster accuracies over the epochs (the first axis), NaN where none was measured. Each
    epoch sends every training sample's feature gradient again, so labels read in any
    epoch are read: a defense that hides them only once the model is sure of its samples
    (``defense.grad_maxnorm``) still gives them away in the first epochs."""
    both = np.fmax(np.asarray(cosine, dtype=np.float64), np.asarray(cluster, dtype=np.float64))
    seen = np.isfinite(both).any(axis=0)
    return np.where(seen, np.max(np.where(np.isfinite(both), both, -np.inf), axis=0), np.nan)


def _label_summary(run) -> dict:
    """A run of many clients in one row: each column the mean over the clients measured in
    the last epoch (rows > 0), ``clients`` = how many; ``best_epoch`` the mean over the
    clients measured in any epoch of ``best_epoch``; test accuracy the clients' mean."""
    series = run.label_series
    last = {n: np.asarray(v[-1], dtype=np.float64) for n, v in series.items()}
    measured = np.nan_to_num(last["rows"]) > 0
    mean = {n: float(np.nanmean(v[measured])) if measured.any() and
            np.isfinite(v[measured]).any() else float("nan") for n, v in last.items()}
    best = best_epoch(series["cosine_accuracy"], series["cluster_accuracy"])
    acc = np.asarray(run.series["test_accuracy"][-1], dtype=np.float64)
    return {"client": f"mean of {int(measured.sum())}/{len(measured)}",
            **{col: _fmt(mean[name], 3) for col, name in LABEL_COLUMNS},
            "best_epoch": _fmt(float(np.nanmean(best)) if np.isfinite(best).any()
                               else float("nan"), 3),
            "rows": int(np.nansum(last["rows"])),
            "test_accuracy_pct": _fmt(100 * float(np.nanmean(acc)) if np.isfinite(acc).any()
                                      else float("nan"))}


def label_table(runs) -> list[Table]:
    """Label inference from the feature gradients of each attack.labels run, per client,
    in its last epoch: the attacks' accuracies against chance (1 / the client's classes),
    ``best_epoch`` (the best of cosine and cluster in the attacker's best epoch), with the
    label defenses (grad_clip, grad_noise, label_epsilon) and the client's test accuracy.
    ``[]`` when no run has one. A run of more than ``reader.LIST_CLIENTS`` clients gets one
    row: the means over the clients measured in the last epoch."""
    rows = []
    for run in runs:
        defense = run.config.get("defense", {})
        series_2d = getattr(run, "label_series", None)
        if series_2d and len(run.clients) > LIST_CLIENTS:
            if len(series_2d["rows"]):
                rows.append({"path": str(run.path), "epoch": len(series_2d["rows"]),
                             "grad_clip": defense.get("grad_clip", 0.0),
                             "grad_noise": defense.get("grad_noise", 0.0),
                             "label_epsilon": defense.get("label_epsilon", 0.0),
                             **_label_summary(run)})
            continue
        for k, series in run.label_inference.items():
            if not len(series["rows"]):
                continue
            last = {name: float(v[-1]) for name, v in series.items()}
            rows.append({
                "path": str(run.path), "client": k, "epoch": len(series["rows"]),
                "grad_clip": defense.get("grad_clip", 0.0),
                "grad_noise": defense.get("grad_noise", 0.0),
                "label_epsilon": defense.get("label_epsilon", 0.0),
                "cosine": _fmt(last["cosine_accuracy"], 3),
                "cluster": _fmt(last["cluster_accuracy"], 3),
                "cluster_known": _fmt(last["cluster_known_accuracy"], 3),
                "norm_auc": _fmt(last["norm_auc"], 3), "chance": _fmt(last["chance"], 3),
                "best_epoch": _fmt(float(best_epoch(series["cosine_accuracy"],
                                                    series["cluster_accuracy"])), 3),
                "rows": int(last["rows"]) if math.isfinite(last["rows"]) else 0,
                "test_accuracy_pct": _fmt(100 * float(run.clients[k]["test_accuracy"][-1]))})
    title = ("Label inference from the U-shape's feature gradients (last epoch, and "
             "best_epoch: the attacker's best epoch; accuracy of the label guessed for each "
             "row the attacker did not know)")
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


def _folder(outdir) -> Path:
    """The figures' folder, made if missing (the plot functions are called directly too)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return outdir


def _by_arch(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """The records of each architecture, in name order: one set of figures per arch."""
    return [(arch, [r for r in records if r["arch"] == arch])
            for arch in sorted({r["arch"] for r in records})]


def plot_attack(runs, outdir) -> list[Path]:
    """Per (arch, method) over undefended runs: a fig-3-like grid (originals, then one row
    of reconstructions per cut) and PSNR/SSIM by cut. Returns the written PNG paths."""
    records = [r for r in attack_records(runs) if r["defense"] == "none"]
    if not records:
        return []
    plt, outdir = pyplot(), _folder(outdir)
    paths = []
    for arch, mine in _by_arch(records):
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


# --- the attack x defense matrix (jobs/privacy_sweep.py: real runs, attacked afterwards) ---

# (defense kind, the defense key whose value is its strength), in the matrix's row order
MATRIX_DEFENSES = (("noise", "noise_sigma"), ("nopeek", "nopeek_alpha"),
                   ("dropout", "dropout"), ("grad", "grad_noise"), ("gradclip", "grad_clip"),
                   ("dp", "act_epsilon"), ("actclip", "act_clip"),
                   ("labeldp", "label_epsilon"), ("maxnorm", "grad_maxnorm"))
_SETUP = {"grad": "gradclip", "dp": "actclip"}  # grad_noise needs grad_clip, act_epsilon act_clip


def _cell_defense(defense: dict) -> tuple[str, float]:
    """(kind, strength) of a run's defense section: 'none', one kind, or 'a+b' (NaN)."""
    active = [(kind, _num(defense.get(key, 0.0))) for kind, key in MATRIX_DEFENSES
              if _num(defense.get(key, 0.0)) > 0]
    kinds = {k for k, _ in active}
    active = [(k, v) for k, v in active
              if not (k in _SETUP.values() and any(_SETUP.get(o) == k for o in kinds))]
    if not active:
        return "none", 0.0
    if len(active) == 1:
        return active[0]
    return "+".join(k for k, _ in active), float("nan")


def matrix_records(runs) -> list[dict]:
    """One record per training run (clients and test accuracies) that carries label
    inference (``attack.labels=true``, as every cell of jobs/privacy_sweep.py) or a
    completion group; a run with an inversion group alone is left to
    ``inversion_tables``. The record: its cut, defense, the clients' mean final test accuracy,
    decoder PSNR/SSIM, label inference (per client ``best_epoch``: the best of cosine and
    cluster accuracy in the attacker's best epoch; mean over clients) and model-completion
    accuracy."""
    records = []
    for run in runs:
        clients = getattr(run, "clients", {}) or {}
        groups = (getattr(run, "groups", {}) or {}).get("attack", {})
        labels = getattr(run, "label_inference", {}) or {}
        if not clients or not (labels or "completion" in groups):
            continue  # a matrix cell measured label inference (or was completed)
        cfg = run.config or {}
        kind, strength = _cell_defense(cfg.get("defense", {}))
        table = getattr(run, "series", {}).get("test_accuracy")
        if table is not None:  # (epochs, N): the clients evaluated in the last epoch
            accs = [float(a) for a in table[-1] if np.isfinite(a)] if len(table) else []
        else:
            accs = [float(c["test_accuracy"][-1]) for c in clients.values()
                    if len(c.get("test_accuracy", []))]
        best, chance = [], []
        found = getattr(run, "label_series", None)
        if found and len(found["rows"]):  # (epochs, N): the clients measured in any epoch
            measured = (np.nan_to_num(found["rows"]) > 0).any(axis=0)
            best = best_epoch(found["cosine_accuracy"], found["cluster_accuracy"])[
                measured].tolist()
            chance = np.nanmax(found["chance"][:, measured], axis=0).tolist()
        elif not found:
            for series in labels.values():
                if len(series["rows"]):
                    best.append(float(best_epoch(series["cosine_accuracy"],
                                                 series["cluster_accuracy"])))
                    chance.append(float(np.nanmax(series["chance"])))
        g = {m: groups.get(m, {}) for m in ("decoder", "rmle", "completion")}
        cut = cfg.get("model", {}).get("cut", "")
        eps = getattr(run, "epsilon", None)  # DP activations: the epsilon spent at the end
        records.append({
            "path": str(run.path), "arch": _text(cfg.get("model", {}).get("arch", "")),
            "cut": cut, "defense": kind, "strength": strength,
            "label": "none" if kind == "none" else f"{kind} {strength:g}",
            "accuracy": float(np.mean(accs)) if accs else float("nan"),
            "psnr": _num(g["decoder"].get("@psnr_mean")),
            "ssim": _num(g["decoder"].get("@ssim_mean")),
            "rmle_psnr": _num(g["rmle"].get("@psnr_mean")),
            "labels": float(np.nanmean(best)) if best else float("nan"),
            "labels_chance": float(np.mean(chance)) if chance else float("nan"),
            "completion": _num(g["completion"].get("@accuracy")),
            "completion_chance": _num(g["completion"].get("@chance")),
            "epsilon": float(eps[-1]) if eps is not None and len(eps) else float("nan"),
            "finished": bool(getattr(run, "finished", True))})
    kinds = [k for k, _ in MATRIX_DEFENSES]
    return sorted(records, key=lambda r: (r["arch"], natural(r["cut"]), r["defense"] != "none",
                                          kinds.index(r["defense"]) if r["defense"] in kinds
                                          else len(kinds), r["defense"], r["strength"]))


def matrix_table(runs) -> list[Table]:
    """The attack x defense matrix, one row per cell (run): accuracy in percent, decoder
    PSNR (dB) and SSIM, label inference and completion accuracy (with chance)."""
    records = matrix_records(runs)
    rmle = any(math.isfinite(r["rmle_psnr"]) for r in records)
    dp = any(math.isfinite(r["epsilon"]) for r in records)
    rows = [{"arch": r["arch"], "cut": r["cut"], "defense": r["defense"],
             "strength": _fmt(r["strength"], 4), "accuracy_pct": _fmt(100 * r["accuracy"]),
             "psnr_db": _fmt(r["psnr"]), "ssim": _fmt(r["ssim"], 3),
             "label_inference": _fmt(r["labels"], 3), "label_chance": _fmt(r["labels_chance"], 3),
             "completion": _fmt(r["completion"], 3),
             "completion_chance": _fmt(r["completion_chance"], 3),
             **({"rmle_psnr_db": _fmt(r["rmle_psnr"])} if rmle else {}),
             **({"epsilon": _fmt(r["epsilon"])} if dp else {}),
             "status": "finished" if r["finished"] else "unfinished"}
            for r in records]
    title = ("Attack x defense matrix (one training run per cell: clients' mean final test "
             "accuracy; decoder PSNR/SSIM and completion on client attack.client's last "
             "checkpoint; label inference = best of cosine/cluster in the attacker's best "
             "epoch, mean over clients)")
    return [Table(title, rows)] if rows else []


MATRIX_METRICS = (("psnr", "decoder PSNR (dB)"), ("ssim", "decoder SSIM"),
                  ("rmle_psnr", "rMLE PSNR (dB)"), ("labels", "label inference accuracy"),
                  ("completion", "completion accuracy"))


def plot_matrix(runs, outdir) -> list[Path]:
    """Per arch: ``privacy_frontier_<arch>.png``, accuracy against each attack's success
    (one panel per attack, one series per cut, a point per cell labelled by its defense),
    and per cut ``privacy_heatmap_<arch>_cut<cut>.png`` (rows defense+strength, columns the
    attacks, colour = attack success scaled per column, text = the metric and accuracy)."""
    records = matrix_records(runs)
    if not records:
        return []
    plt, outdir = pyplot(), _folder(outdir)
    paths = []
    for arch, mine in _by_arch(records):
        metrics = [(k, t) for k, t in MATRIX_METRICS
                   if any(math.isfinite(r[k]) for r in mine)]
        if not metrics:
            continue
        cuts = sorted({r["cut"] for r in mine}, key=natural)
        fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                                 figsize=(4.2 * len(metrics), 3.6))
        for ax, (key, title) in zip(axes[0], metrics):
            for cut in cuts:
                rows = [r for r in mine if r["cut"] == cut and math.isfinite(r[key])]
                if not rows:
                    continue
                ax.plot([r[key] for r in rows], [100 * r["accuracy"] for r in rows], "o",
                        label=f"cut {cut}")
                for r in rows:
                    ax.annotate(r["label"], (r[key], 100 * r["accuracy"]), fontsize=6,
                                xytext=(3, 2), textcoords="offset points")
            ax.set(xlabel=title + " (right: attack succeeds)", ylabel="test accuracy (%)",
                   title=title.split(" (")[0])
            ax.legend(fontsize=7)
        fig.suptitle(f"{arch}: privacy/utility frontier per attack", fontsize=9)
        paths.append(save(fig, outdir / f"privacy_frontier_{slug(arch)}.png"))
        for cut in cuts:
            rows = [r for r in mine if r["cut"] == cut]
            cols = [(k, t) for k, t in metrics if any(math.isfinite(r[k]) for r in rows)]
            if not cols:
                continue
            values = np.array([[r[k] for k, _ in cols] for r in rows], dtype=float)
            colour = np.full_like(values, np.nan)
            for j in range(values.shape[1]):
                col = values[:, j]
                ok = np.isfinite(col)
                lo, hi = (col[ok].min(), col[ok].max()) if ok.any() else (0.0, 0.0)
                colour[ok, j] = (col[ok] - lo) / (hi - lo) if hi > lo else 0.5
            fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2.6, 0.42 * len(rows) + 1.8))
            im = ax.imshow(np.ma.masked_invalid(colour), cmap="Reds", vmin=0, vmax=1,
                           aspect="auto")
            for i, r in enumerate(rows):
                for j, (k, _) in enumerate(cols):
                    v = values[i, j]
                    text = "-" if not math.isfinite(v) else (f"{v:.1f}" if k.endswith("psnr")
                                                             else f"{v:.2f}")
                    dark = np.isfinite(colour[i, j]) and colour[i, j] > 0.6
                    ax.text(j, i, f"{text}\nacc {100 * r['accuracy']:.0f}%", ha="center",
                            va="center", fontsize=6, color="white" if dark else "black")
            ax.set_xticks(range(len(cols)), [t.replace(" (dB)", "\n(dB)") for _, t in cols],
                          fontsize=7)
            ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
            fig.colorbar(im, ax=ax).set_label("attack success\n(scaled per column)", fontsize=7)
            ax.set_title(f"{arch} cut {cut}: attack success by defense", fontsize=9)
            paths.append(save(fig, outdir / f"privacy_heatmap_{slug(arch)}_cut"
                                            f"{slug(str(cut))}.png"))
    return paths
