"""Label inference from the feature gradients a U-shaped server receives.

In every u_shape training step the server receives dL/dh (``Kind.FEATURE_GRAD``), the
gradient of the client's loss with respect to the classifier's input. For the final
``nn.Linear`` that row is W^T (softmax - onehot(y)) / B: its direction is dominated by
-W_y, so rows of one label point the same way. Three attacks read the labels back from
the rows alone (docs/privacy.md, "Labels in the U-shape"):

- ``cosine_attack``: the attacker knows a few labelled rows per class; every other row
  gets the class whose known rows' mean direction is closest (cosine similarity);
- ``cluster_attack``: k-means on the rows' directions into as many clusters as classes;
  scored after the best cluster-to-label matching (``match_clusters``), and with the
  known rows naming the clusters (``name_clusters``);
- ``norm_auc``: two classes only, the row's norm as a score (Li et al. 2022, "Label
  leakage and protection in two-party split learning").

``score`` runs all three on one client's rows. In a training run (``attack.labels``) the
server sends each client the rows it received from it and the client scores them, so no
label ever reaches the server. Pure numpy and scipy; scipy is imported inside the two
functions that need it, so that a training run without ``attack.labels`` does not load it.
"""
from __future__ import annotations

import numpy as np

# The per-client series ``score`` returns, one value per epoch in ``/attack/labels/<k>``.
SERIES = ("cosine_accuracy", "cluster_accuracy", "cluster_known_accuracy", "norm_auc",
          "chance", "rows")
RESTARTS = 5  # k-means starts; the one of least distortion wins


def directions(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero): what the label decides."""
    rows = _finite(rows)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def _finite(rows: np.ndarray) -> np.ndarray:
    """Rows as float64 vectors; a diverged run's NaN or infinite entries count as 0, so
    that measuring never fails a run."""
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    return np.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)


def known_rows(labels: np.ndarray, known: int) -> np.ndarray:
    """A boolean mask of the rows the attacker knows: the first ``known`` of each class in
    the order they were sent."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        mask[np.flatnonzero(labels == c)[:known]] = True
    return mask


def cosine_attack(rows: np.ndarray, labels: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Each row's class: the known class whose known rows' mean direction has the largest
    cosine similarity with it. ``labels`` is read only where ``known`` is set."""
    unit = directions(rows)
    classes = np.unique(labels[known])
    means = directions(np.stack([unit[known & (labels == c)].mean(0) for c in classes]))
    return classes[np.argmax(unit @ means.T, axis=1)]


def cluster_attack(rows: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means (k-means++ starts, ``RESTARTS`` of them) on the rows' directions; returns
    each row's cluster."""
    from scipy.cluster.vq import kmeans2

    unit = directions(rows)
    best, least = None, np.inf
    for _ in range(RESTARTS):
        centres, assigned = kmeans2(unit, clusters, minit="++", seed=rng)
        distortion = ((unit - centres[assigned]) ** 2).sum()
        if distortion < least:
            best, least = assigned, distortion
    return best


def match_clusters(clusters: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """The cluster -> label naming that gets the most rows right (Hungarian method): the
    best any attacker who only had to name the clusters could do."""
    from scipy.optimize import linear_sum_assignment

    ids, classes = np.unique(clusters), np.unique(labels)
    counts = np.array([[np.sum((clusters == i) & (labels == c)) for c in classes]
                       for i in ids])
    picked, named = linear_sum_assignment(counts, maximize=True)
    return {int(ids[i]): int(classes[c]) for i, c in zip(picked, named)}


def name_clusters(clusters: np.ndarray, labels: np.ndarray, known: np.ndarray) -> dict:
    """The cluster -> label naming the attacker can make: the majority label of the known
    rows in each cluster. A cluster holding no known row gets no name (its rows count
    wrong)."""
    naming = {}
    for i in np.unique(clusters[known]):
        votes = labels[known & (clusters == i)]
        values, counts = np.unique(votes, return_counts=True)
        naming[int(i)] = int(values[np.argmax(counts)])
    return naming


def norm_auc(rows: np.ndarray, labels: np.ndarray, known: np.ndarray) -> float:
    """Two classes only (NaN otherwise): the AUC of the row's L2 norm as a score for one
    class, over the unknown rows. The positive class is the one whose known rows have the
    larger mean norm, a side the attacker can pick; 0.5 is chance."""
    from scipy.stats import rankdata

    classes = np.unique(labels)
    test = ~known
    if len(classes) != 2 or len(np.unique(labels[test])) != 2:
        return float("nan")
    norms = np.linalg.norm(_finite(rows), axis=1)
    mean_known = [norms[known & (labels == c)].mean() for c in classes]
    positive = labels[test] == classes[int(np.argmax(mean_known))]
    ranks = rankdata(norms[test])  # ties get their mean rank: Mann-Whitney's U
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predicted == labels)) if len(labels) else float("nan")


def score(rows: np.ndarray, labels: np.ndarray, known: int,
          rng: np.random.Generator) -> dict[str, float]:
    """Every attack on one client's rows (``labels``: the true label of each row, in the
    same order). Accuracies are over the rows the attacker does not know; the clusters are
    fitted on all rows, as many as classes present; ``chance`` is 1 / classes present."""
    labels = np.asarray(labels)
    result = dict.fromkeys(SERIES, float("nan"))
    result["rows"] = float(len(labels))
    if not len(labels):
        return result
    mask = known_rows(labels, known)
    test = ~mask
    classes = np.unique(labels)
    clusters = cluster_attack(rows, len(classes), rng)
    best, named = match_clusters(clusters, labels), name_clusters(clusters, labels, mask)
    result.update(
        cosine_accuracy=_accuracy(cosine_attack(rows, labels, mask)[test], labels[test]),
        cluster_accuracy=_accuracy(np.array([best.get(int(i), -1) for i in clusters[test]]),
                                   labels[test]),
        cluster_known_accuracy=_accuracy(
            np.array([named.get(int(i), -1) for i in clusters[test]]), labels[test]),
        norm_auc=norm_auc(rows, labels, mask), chance=1.0 / len(classes))
    return result
