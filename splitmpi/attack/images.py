"""The images of an attack: those it tries to rebuild, and those the attacker trains on.

Evaluated images: the first ``attack.eval_samples`` of client k's test split (k =
``attack.client``, 1 by default: whose extractor is attacked). Auxiliary images (never from
the test split, so disjoint from the evaluated ones): ``attack.aux=train`` draws
``attack.aux_samples`` at random from the whole train split (all classes, the attacker
holds data of the same distribution); ``attack.aux=others`` draws only from the other
clients' train shards (none of client k's images, and under the "blocks" partition none of
its classes).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import data
from ..config import Config
from ..errors import ConfigError
from .target import clients_for


def _stack(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[int(i)][0] for i in indices])


def attack_images(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """(auxiliary images, evaluated images, aux description, eval description), [-1, 1]:
    the evaluated images are client ``attack.client``'s (the owner of the extractor)."""
    k, clients = cfg.attack.client, clients_for(cfg)
    train_mine, test_mine, _ = data.client_datasets(cfg, k, clients)
    n_eval = min(cfg.attack.eval_samples, len(test_mine))
    evaluated = _stack(test_mine, range(n_eval))
    full_train = train_mine.dataset
    targets = data.targets_of(full_train)
    pool = np.arange(len(targets))
    if cfg.attack.aux == "others":
        shards = data.partition(targets, data.spec(cfg.data).num_classes, clients, cfg.data,
                                cfg.train.seed)
        pool = np.setdiff1d(pool, shards[k - 1])
        if len(pool) == 0:
            raise ConfigError(f"attack.aux=others leaves no auxiliary images (client {k} "
                              "holds the whole train split)",
                              "use attack.aux=train or more clients")
    rng = np.random.default_rng([cfg.train.seed, 777])
    chosen = np.sort(rng.permutation(pool)[:cfg.attack.aux_samples])
    aux = _stack(full_train, chosen)
    where = ("the whole train split (all classes)" if cfg.attack.aux == "train" else
             f"the other clients' train shards (none of client {k}'s images)")
    return (aux, evaluated,
            f"{len(chosen)} random images from {where}, seed train.seed",
            f"first {n_eval} images of client {k}'s test split")
