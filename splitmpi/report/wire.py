"""What crosses the wire, drawn: the one figure of the report that runs a network.

It needs torch (and the model and data code), unlike every other table and figure here, so
the command imports this module only for ``--wire``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .. import data, models
from ..attack.metrics import to_uint8, to_unit
from ..attack.target import clients_for, load_extractor_state
from .plotting import pyplot, save, show


def wire_figure(cfg, outdir, channels_shown: int = 6) -> Path:
    """What crosses the wire for one test sample in cnn5: per block (up to 3), a few
    activation maps after the conv+ReLU (before the max-pool) and after its max-pool.

    The network is ``models.build`` from ``cfg`` with arch cnn5 (weights from
    ``cfg.attack.checkpoint`` when given, else the seeded initial ones); the sample is the
    first test image of client 1.
    """
    plt = pyplot()
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
    show(axes[0][1], to_uint8(to_unit(x))[0])
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
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return save(fig, outdir / "wire_cnn5.png")
