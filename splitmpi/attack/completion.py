"""Model completion: the server turns its cloud into a classifier of the client's labels.

Fu et al., "Label inference attacks against vertical federated learning" (USENIX Security
2022), passive model completion. Under u_shape the labels never cross the cut, but the
server holds a trained part of the network: the cloud, whose output is the input of the
client's classifier. Given the labels of a few of the client's training samples
(``attack.known_labels`` per class: the first of each class in the client's shard) and the
activations the client sends for them (its extractor and defense, as in training, eval
mode), the server fits a fresh linear head on cloud(activation) and labels anything the
client sends afterwards. It is scored on client k's test split, beside the client's own
accuracy (its extractor, the cloud and its classifier on the same split) and chance.

The head is a multinomial logistic regression with a small L2 term, started at zero and
solved by L-BFGS: the problem is convex, so the head is the best one the known samples
define, with no learning rate or seed to tune for the attacker (the paper fine-tunes with
MixMatch on unlabelled data as well; this is its supervised core).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from .. import data, leakage
from ..config import Config
from .target import Target, observe

log = logging.getLogger(__name__)

L2 = 1e-3  # on the head's weights: keeps the fit finite on separable known samples
STEPS = 200  # L-BFGS iterations; a linear head on a few dozen samples converges well within


@torch.no_grad()
def cloud_features(target: Target, x: torch.Tensor) -> torch.Tensor:
    """cloud(what the client sends for ``x``), flattened: the classifier's input."""
    return target.cloud(observe(target, x)).flatten(1)


def fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int) -> nn.Linear:
    """The L2-regularised logistic regression of ``labels`` (0..classes-1) on ``features``."""
    head = nn.Linear(features.shape[1], classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=STEPS,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(features), labels) + \
            L2 / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.eval()


def completion_attack(cfg: Config, target: Target) -> dict:
    """Fit the head on client k's known samples and score it on client k's test split;
    returns the scalars and per-class arrays that ``output.write_completion`` stores."""
    k = target.client
    train, _, classes = data.client_datasets(cfg, k, cfg.clients.count)
    _, test_loader, _ = data.client_loaders(cfg, k, cfg.clients.count)
    targets = data.targets_of(train)
    known = np.flatnonzero(leakage.known_rows(targets, cfg.attack.known_labels))
    x = torch.stack([train[int(i)][0] for i in known])
    index = torch.as_tensor(classes)  # the head's output j is class classes[j]
    y = torch.searchsorted(index, torch.as_tensor(targets[known]))
    features = cloud_features(target, x)
    hits, seen = np.zeros(len(classes)), np.zeros(len(classes))
    finite = bool(torch.isfinite(features).all())
    if finite:
        log.info(f"completion: fitting a linear head on {features.shape[1]} cloud features "
                 f"of {len(known)} known samples of client {k} (classes {classes})")
        head = fit_head(features, y.to(features.device), len(classes))
    else:  # no head can be fitted on them, and the run learned nothing to complete
        log.warning(f"completion: the cloud's features of client {k}'s known samples are "
                    "not finite (the run diverged; its test accuracy "
                    f"{target.accuracy:.3f}): accuracy NaN")
    with torch.no_grad():
        for xb, yb in test_loader:
            truth = torch.searchsorted(index, yb)
            np.add.at(seen, truth.numpy(), 1)
            if finite:
                guess = head(cloud_features(target, xb)).argmax(1).cpu()
                np.add.at(hits, truth[guess == truth].numpy(), 1)
    if not finite:
        hits[:] = np.nan
    return {"accuracy": float(hits.sum() / max(seen.sum(), 1)),
            "client_accuracy": float(target.accuracy), "chance": 1 / len(classes),
            "known_samples": len(known), "test_samples": int(seen.sum()),
            "head_features": features.shape[1],
            "classes": np.asarray(classes, dtype=np.int64),
            "class_accuracy": hits / np.maximum(seen, 1),
            "class_test_samples": seen.astype(np.int64)}
