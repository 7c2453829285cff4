"""Feature-inversion attacks on a trained extractor: ``python -m splitmpi.attack``.

The curious server sees what crosses the cut for each image (the extractor's activation
after the client's defense) and tries to rebuild the image:

- ``decoder`` (He et al. 2019's inverse network, the split-learning paper's attack): a
  decoder mirroring the extractor (one transposed convolution per down-sampling stage, a
  3x3 convolution per stage that keeps the size, tanh output) is trained on
  (features, image) pairs from auxiliary images the attacker holds, then applied to the
  features of the client's held-out images.
- ``rmle`` (white-box, regularised maximum likelihood): knowing the extractor weights,
  Adam optimises an input, from mid-grey (zeros) plus faint noise, so that its features
  match the observed ones (MSE), plus ``attack.rmle_tv`` times its total variation;
  pixels are clamped to [-1, 1] after each step.

Target extractor: ``attack.checkpoint`` (a torch file holding an extractor state dict
under "extractor", top level or under ["model"] or ["state"]; the last is what a splitmpi
client checkpoint ``OUTPUT.ckpt/epoch-N/rank-1.pt`` holds), or, when empty, the config's
split model trained here in one process on client 1's shard (extractor -> defense -> cloud ->
classifier, the defense's NoPeek penalty added to the loss, as the client does), for
``train.epochs`` with the config's SGD settings. Clients for the partition:
``clients`` if set, else the number of class lists of an explicit ``data.partition``, else
3 (at most the number of classes). Utility = that model's accuracy on client 1's test
split with the defense in eval mode (noise on, dropout off).

Evaluated images: the first ``attack.eval_samples`` of client 1's test split. Auxiliary
images (never from the test split, so disjoint from the evaluated ones):
``attack.aux=train`` draws ``attack.aux_samples`` at random from the whole train split (all
classes, the attacker holds data of the same distribution); ``attack.aux=others`` draws
only from the other clients' train shards (none of client 1's images, and under the
"blocks" partition none of its classes). Features are computed as the server receives
them: extractor and defense in eval mode (noise on, dropout off), fresh noise per use.

Results go to ``attack.output`` (or ``output``): added as ``/attack/<method>`` to an
existing splitmpi results file, or a new results file (docs/privacy.md has the layout).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import config as config_mod
from . import data, models, privacy
from .config import Config
from .defense import Defense
from .errors import ConfigError

AUX_CHOICES = ("train", "others")
METHODS = ("decoder", "rmle")
RMLE_INIT_STD = 0.05


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- config -------------------------------------------------------------------------------

def clients_for(cfg: Config) -> int:
    """Clients assumed for the partition: ``clients``, an explicit partition's length, or 3
    (at most the number of classes, so "blocks" always works)."""
    if cfg.clients.count:
        return cfg.clients.count
    if isinstance(cfg.data.partition, list):
        return len(cfg.data.partition)
    return max(1, min(3, data.spec(cfg.data).num_classes))


def output_path(cfg: Config) -> Path:
    return Path(cfg.attack.output or cfg.output)


def validate(cfg: Config) -> None:
    """Attack settings that ``config.validate`` does not check; ConfigError on a bad one."""
    a = cfg.attack
    if a.aux not in AUX_CHOICES:
        raise ConfigError(f"attack.aux={a.aux!r} is not supported",
                          f"use one of: {', '.join(AUX_CHOICES)}")
    for key, value, low in (("attack.aux_samples", a.aux_samples, 1),
                            ("attack.eval_samples", a.eval_samples, 1),
                            ("attack.batch_size", a.batch_size, 1),
                            ("attack.decoder_width", a.decoder_width, 1),
                            ("attack.epochs", a.epochs, 0), ("attack.rmle_steps", a.rmle_steps, 0),
                            ("attack.grid", a.grid, 0)):
        if value < low:
            raise ConfigError(f"{key}={value} must be at least {low}", f"set {key} >= {low}")
    for key, value in (("attack.lr", a.lr), ("attack.rmle_lr", a.rmle_lr)):
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive", f"set {key} > 0")
    if a.rmle_tv < 0:
        raise ConfigError(f"attack.rmle_tv={a.rmle_tv} must be >= 0", "set attack.rmle_tv >= 0")
    if a.checkpoint and not Path(a.checkpoint).is_file():
        raise ConfigError(f"attack.checkpoint {a.checkpoint} not found",
                          "pass an existing .pt file, or leave attack.checkpoint empty to "
                          "train the config's model first")
    check_output(cfg)


def check_output(cfg: Config) -> None:
    """Before any work: the output is an existing splitmpi results file (the attack adds a
    group), or absent in a writable folder; a foreign file is replaced only with overwrite."""
    from .reader import NotAResult, read

    path = output_path(cfg)
    if path.exists():
        try:
            read(path)
        except NotAResult:
            if not cfg.overwrite:
                raise ConfigError(f"output {path} exists and is not a splitmpi results file",
                                  "pass attack.output=OTHER.h5, or overwrite=true to replace it")
        return
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {folder}: {exc.strerror}",
                          "set attack.output= to a writable path")


# --- the target: a trained extractor ------------------------------------------------------

@dataclass
class Target:
    extractor: nn.Module  # eval mode, parameters frozen
    defense: Defense  # eval mode: noise on, dropout off
    accuracy: float  # utility: client 1's test accuracy (NaN when unknown)
    source: str


def _load_checkpoint(path: str) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise ConfigError(f"attack.checkpoint {path} cannot be read as a torch file ({exc})",
                          "pass a file written by torch.save holding plain tensors") from None
    if not isinstance(ck, dict):
        raise ConfigError(f"attack.checkpoint {path} does not hold a dict",
                          'save {"extractor": extractor.state_dict()}')
    return ck


def _part(ck: dict, name: str) -> dict | None:
    """``ck[name]``, ``ck["model"][name]`` or (a splitmpi client checkpoint,
    ``OUTPUT.ckpt/epoch-N/rank-K.pt``) ``ck["state"][name]``."""
    if isinstance(ck.get(name), dict):
        return ck[name]
    for outer in ("model", "state"):
        inner = ck.get(outer)
        if isinstance(inner, dict) and isinstance(inner.get(name), dict):
            return inner[name]
    return None


def load_extractor_state(path: str) -> dict:
    return _extractor_state(_load_checkpoint(path), path)


def _extractor_state(ck: dict, path: str) -> dict:
    state = _part(ck, "extractor")
    if state is None:
        raise ConfigError(f"attack.checkpoint {path} has no extractor state dict",
                          'save it under "extractor" (top level) or ["model"]["extractor"], '
                          "or pass a splitmpi client checkpoint (OUTPUT.ckpt/epoch-N/rank-1.pt)")
    return state


def _load_into(module: nn.Module, state: dict, what: str, cfg: Config) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"attack.checkpoint {cfg.attack.checkpoint}: its {what} does not "
                          f"fit model.arch={cfg.model.arch} model.cut={cfg.model.cut} "
                          f"({first})", "set model.arch/model.cut/data.* to those the "
                          "checkpoint was trained with") from None


@torch.no_grad()
def accuracy(parts: models.SplitModel, defense: Defense, loader, device) -> float:
    for m in (parts.extractor, parts.cloud, parts.classifier, defense):
        m.eval()
    correct = seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = parts.classifier(parts.cloud(defense(parts.extractor(x))))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


def train_split_model(cfg: Config, device: torch.device) -> tuple[models.SplitModel, Defense,
                                                                   float]:
    """The config's split model trained in one process on client 1's shard, the defense
    between extractor and cloud as on the client. Returns (parts, defense, test accuracy)."""
    clients = clients_for(cfg)
    train_loader, test_loader, classes = data.client_loaders(cfg, 1, clients)
    sp = data.spec(cfg.data)
    parts = models.build(cfg.model, sp.channels, sp.image_size, sp.num_classes, cfg.train.seed)
    defense = Defense(cfg.defense)
    modules = [parts.extractor, parts.cloud, parts.classifier]
    for m in modules:
        m.to(device)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                          weight_decay=cfg.train.weight_decay)
    torch.manual_seed(cfg.train.seed * 1000 + 1)
    _log(f"training {cfg.model.arch} cut {cfg.model.cut} on client 1 of {clients} "
         f"(classes {classes}, {len(train_loader.dataset)} images), defense {_defense(cfg)}")
    acc = float("nan")
    for epoch in range(cfg.train.epochs):
        for m in (*modules, defense):
            m.train()
        loss_sum = seen = 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            a = parts.extractor(x)
            loss = F.cross_entropy(parts.classifier(parts.cloud(defense(a))), y)
            penalty = defense.penalty(x, a)
            total = loss if penalty is None else loss + penalty
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
        acc = accuracy(parts, defense, test_loader, device)
        _log(f"  epoch {epoch + 1}/{cfg.train.epochs}: train loss {loss_sum / max(seen, 1):.4f}"
             f", test accuracy {acc:.4f}")
    return parts, defense, acc


def _freeze(target_parts: list[nn.Module]) -> None:
    for m in target_parts:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def get_target(cfg: Config, device: torch.device) -> Target:
    """The extractor under attack (and the utility of its model), see the module doc."""
    defense = Defense(cfg.defense)
    if not cfg.attack.checkpoint:
        parts, defense, acc = train_split_model(cfg, device)
        if cfg.attack.save:
            Path(cfg.attack.save).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": {"extractor": parts.extractor.state_dict(),
                                  "cloud": parts.cloud.state_dict(),
                                  "classifier": parts.classifier.state_dict()},
                        "test_accuracy": acc, "config": cfg.to_json()}, cfg.attack.save)
            _log(f"saved the trained model to {cfg.attack.save}")
        source = f"trained here: {cfg.train.epochs} epochs on client 1 of {clients_for(cfg)}"
        _freeze([parts.extractor, defense])
        return Target(parts.extractor, defense, acc, source)
    ck = _load_checkpoint(cfg.attack.checkpoint)
    sp = data.spec(cfg.data)
    parts = models.build(cfg.model, sp.channels, sp.image_size, sp.num_classes, cfg.train.seed)
    state = _extractor_state(ck, cfg.attack.checkpoint)
    _load_into(parts.extractor, state, "extractor", cfg)
    for m in (parts.extractor, parts.cloud, parts.classifier):
        m.to(device)
    acc = float("nan")
    cloud, head = _part(ck, "cloud"), _part(ck, "classifier")
    if cloud is not None and head is not None:
        _load_into(parts.cloud, cloud, "cloud", cfg)
        _load_into(parts.classifier, head, "classifier", cfg)
        _, test_loader, _ = data.client_loaders(cfg, 1, clients_for(cfg))
        acc = accuracy(parts, defense, test_loader, device)
    elif isinstance(ck.get("test_accuracy"), (int, float)):
        acc = float(ck["test_accuracy"])
    _freeze([parts.extractor, defense])
    return Target(parts.extractor, defense, acc, f"checkpoint {cfg.attack.checkpoint}")


# --- images -------------------------------------------------------------------------------

def _stack(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[int(i)][0] for i in indices])


def attack_images(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """(auxiliary images, evaluated images, aux description, eval description), [-1, 1]."""
    clients = clients_for(cfg)
    train_mine, test_mine, _ = data.client_datasets(cfg, 1, clients)
    n_eval = min(cfg.attack.eval_samples, len(test_mine))
    evaluated = _stack(test_mine, range(n_eval))
    full_train = train_mine.dataset
    targets = data.targets_of(full_train)
    pool = np.arange(len(targets))
    if cfg.attack.aux == "others":
        shards = data.partition(targets, data.spec(cfg.data).num_classes, clients, cfg.data,
                                cfg.train.seed)
        pool = np.setdiff1d(pool, shards[0])
        if len(pool) == 0:
            raise ConfigError("attack.aux=others leaves no auxiliary images (client 1 holds "
                              "the whole train split)", "use attack.aux=train or more clients")
    rng = np.random.default_rng([cfg.train.seed, 777])
    chosen = np.sort(rng.permutation(pool)[:cfg.attack.aux_samples])
    aux = _stack(full_train, chosen)
    where = ("the whole train split (all classes)" if cfg.attack.aux == "train" else
             "the train shards of clients 2..N (none of client 1's images)")
    return (aux, evaluated,
            f"{len(chosen)} random images from {where}, seed train.seed",
            f"first {n_eval} images of client 1's test split")


@torch.no_grad()
def observe(target: Target, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """What the server receives for images ``x`` (eval mode: noise on, dropout off)."""
    dev = next(iter(target.extractor.parameters()), x).device
    return torch.cat([target.defense(target.extractor(x[i:i + batch].to(dev)))
                      for i in range(0, len(x), batch)])


# --- decoder inversion ----------------------------------------------------------------------

class FitTo(nn.Module):
    """Crop (or, rarely, resize) to a stage's spatial size: ceil-mode pooling makes odd
    sizes that a stride-2 transposed convolution overshoots by one."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        if x.shape[-2] >= h and x.shape[-1] >= w:
            return x[..., :h, :w]
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def stage_shapes(extractor: nn.Module, shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(C, H, W) of the input and after each top-level stage that changes the shape."""
    shapes = [tuple(shape)]
    x = torch.zeros(1, *shape, device=next(iter(extractor.parameters()),
                                           torch.zeros(0)).device)
    was = extractor.training
    extractor.eval()
    with torch.no_grad():
        for stage in extractor.children():
            x = stage(x)
            if tuple(x.shape[1:]) != shapes[-1]:
                shapes.append(tuple(x.shape[1:]))
    extractor.train(was)
    return shapes


def _conv_bn_relu(conv: nn.Module, width: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]


def build_decoder(shapes: list[tuple[int, int, int]], min_width: int = 32) -> nn.Sequential:
    """The extractor's stages mirrored, last first: per stage a stride-2 transposed
    convolution for each halving of the size (a 3x3 convolution when the size is kept)
    back to that stage's input width, then a 3x3 refining convolution; a final 3x3
    convolution to the image channels and tanh (images are in [-1, 1])."""
    layers: list[nn.Module] = []
    c = width = shapes[-1][0]
    for i in range(len(shapes) - 1, 0, -1):
        (c_out, h_out, _), (c_in, h_in, w_in) = shapes[i], shapes[i - 1]
        width = max(c_in if i > 1 else c_out, min_width)
        doublings = max(0, round(math.log2(max(h_in / h_out, 1e-9))))
        if doublings == 0:
            layers += _conv_bn_relu(nn.Conv2d(c, width, 3, padding=1), width)
        for _ in range(doublings):
            layers += _conv_bn_relu(nn.ConvTranspose2d(c, width, 4, stride=2, padding=1), width)
            c = width
        layers += [FitTo((h_in, w_in))]
        layers += _conv_bn_relu(nn.Conv2d(width, width, 3, padding=1), width)
        c = width
    if not layers:  # nothing on the client (cnn5 cut 0): the features are the image
        width = min_width
        layers += _conv_bn_relu(nn.Conv2d(c, width, 3, padding=1), width)
    layers += [nn.Conv2d(width, shapes[0][0], 3, padding=1), nn.Tanh()]
    return nn.Sequential(*layers)


def decoder_attack(cfg: Config, target: Target, aux: torch.Tensor, evaluated: torch.Tensor,
                   device: torch.device) -> dict:
    """Train the inverse network on the auxiliary images, reconstruct the evaluated ones."""
    a = cfg.attack
    torch.manual_seed(cfg.train.seed * 1000 + 2)
    decoder = build_decoder(stage_shapes(target.extractor, tuple(aux.shape[1:])),
                            min_width=a.decoder_width).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=a.lr)
    order = torch.Generator().manual_seed(cfg.train.seed * 1000 + 3)
    history, eval_history = [], []
    observed = observe(target, evaluated)
    for epoch in range(a.epochs):
        decoder.train()
        loss_sum = 0.0
        for idx in torch.randperm(len(aux), generator=order).split(a.batch_size):
            if len(idx) < 2 and len(aux) >= 2:
                continue  # BatchNorm needs two samples
            x = aux[idx].to(device)
            loss = F.mse_loss(decoder(observe(target, x)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
        history.append(loss_sum / len(aux))
        recon = _decode(decoder, observed)
        eval_history.append(float(privacy.mse(privacy.to_unit(evaluated),
                                              privacy.to_unit(recon.cpu())).mean()))
        _log(f"  decoder epoch {epoch + 1}/{a.epochs}: aux loss {history[-1]:.5f}, "
             f"evaluated MSE [0,1] {eval_history[-1]:.5f}")
    recon = _decode(decoder, observed)
    return {"reconstruction": recon.cpu(),
            "series": {"train_loss": np.asarray(history, dtype=np.float64),
                       "eval_mse": np.asarray(eval_history, dtype=np.float64)},
            "attrs": {"epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size,
                      "decoder_width": a.decoder_width,
                      "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
                      "decoder": "mirrored extractor: ConvTranspose2d(4, stride 2) per "
                                 "halving, Conv2d(3) per kept size, BN+ReLU, tanh output",
                      "train_loss": "MSE on [-1,1] pixels, aux images"}}


@torch.no_grad()
def _decode(decoder: nn.Module, features: torch.Tensor, batch: int = 256) -> torch.Tensor:
    decoder.eval()
    return torch.cat([decoder(features[i:i + batch]) for i in range(0, len(features), batch)])


# --- white-box optimisation (rMLE) --------------------------------------------------------

def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per pixel: mean |vertical| + mean |horizontal| neighbour difference."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def rmle(extractor: nn.Module, observed: torch.Tensor, shape: tuple, steps: int, tv: float,
         lr: float, start: torch.Tensor | None = None,
         seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Optimise inputs so ``extractor(x)`` matches ``observed``, from ``start`` or mid-grey
    (zeros) plus N(0, 0.05^2) noise (exact zeros can sit where every ReLU gradient is 0).

    Returns the inputs in [-1, 1] and the feature MSE before each step (and after the last).
    """
    device = observed.device
    if start is None:
        g = torch.Generator().manual_seed(seed)
        start = RMLE_INIT_STD * torch.randn(shape, generator=g)
    x = start.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    history = []
    for _ in range(steps):
        mismatch = F.mse_loss(extractor(x), observed)
        loss = mismatch + tv * total_variation(x) if tv > 0 else mismatch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
        history.append(mismatch.item())
    with torch.no_grad():
        history.append(F.mse_loss(extractor(x), observed).item())
    return x.detach(), np.asarray(history, dtype=np.float64)


def rmle_attack(cfg: Config, target: Target, evaluated: torch.Tensor,
                device: torch.device) -> dict:
    a = cfg.attack
    observed = observe(target, evaluated)
    _log(f"  rMLE: {a.rmle_steps} Adam steps (lr {a.rmle_lr}, TV {a.rmle_tv}) on "
         f"{len(evaluated)} images")
    recon, history = rmle(target.extractor, observed, tuple(evaluated.shape), a.rmle_steps,
                          a.rmle_tv, a.rmle_lr, seed=cfg.train.seed)
    _log(f"  rMLE: feature MSE {history[0]:.5f} -> {history[-1]:.5f}")
    return {"reconstruction": recon.cpu(), "series": {"feature_mse": history},
            "attrs": {"steps": a.rmle_steps, "tv": a.rmle_tv, "lr": a.rmle_lr,
                      "init": f"zeros (mid-grey) + N(0, {RMLE_INIT_STD}^2) noise",
                      "feature_mse_start": float(history[0]),
                      "feature_mse_end": float(history[-1])}}


# --- results file -------------------------------------------------------------------------

def _defense(cfg: Config) -> str:
    d = cfg.defense
    on = [f"{k}={v:g}" for k, v in dataclasses.asdict(d).items() if v]
    return ", ".join(on) or "none"


def _open_results(cfg: Config, path: Path) -> h5py.File:
    """An open results file to add the attack to: the existing one, or a new one whose
    root attributes ``results.ResultsWriter`` writes (world size 1, no epochs)."""
    from .reader import NotAResult, read
    from .results import ResultsWriter

    if path.exists():
        try:
            read(path)
            return h5py.File(path, "a")
        except NotAResult:
            if not cfg.overwrite:
                raise ConfigError(f"output {path} exists and is not a splitmpi results "
                                  "file", "pass attack.output=OTHER.h5, or overwrite=true")
    writer = ResultsWriter(dataclasses.replace(cfg, output=str(path)), world_size=1, clients=0)
    writer.file.attrs["clients"] = clients_for(cfg)
    writer.file.attrs["finished"] = _now()  # nothing else will be written at the root
    return writer.file


def write(cfg: Config, method: str, target: Target, evaluated: torch.Tensor, result: dict,
          info: dict) -> Path:
    """Add or replace ``/attack/<method>`` (layout in docs/privacy.md)."""
    path = output_path(cfg)
    original = privacy.to_unit(evaluated)
    recon = privacy.to_unit(result["reconstruction"])
    values = privacy.metrics(original, recon)
    summary = privacy.summarise(values)
    with _open_results(cfg, path) as f:
        name = f"attack/{method}"
        if name in f:
            del f[name]
        g = f.create_group(name)
        for key, v in values.items():
            g.create_dataset(key, data=v)
        for key, v in result["series"].items():
            g.create_dataset(key, data=v)
        k = min(cfg.attack.grid, len(original))
        g.create_dataset("originals", data=privacy.to_uint8(original[:k]))
        g.create_dataset("reconstructions", data=privacy.to_uint8(recon[:k]))
        attrs = {
            "method": method, "arch": cfg.model.arch, "cut": cfg.model.cut,
            "data": cfg.data.name, "image_shape": np.asarray(evaluated.shape[1:]),
            **{f"defense_{k2}": float(v) for k2, v in dataclasses.asdict(cfg.defense).items()},
            "utility_accuracy": float(target.accuracy), "utility_source": target.source,
            "pixel_range": privacy.PIXEL_RANGE,
            "score_formula": "1 - 1000 * MSE, MSE on [0,1] pixels",
            "psnr_formula": "10 log10(1 / MSE), data range 1",
            "ssim_settings": "Gaussian window 11x11 sigma 1.5, K1=0.01 K2=0.03, data range 1, "
                             "valid positions, mean over channels",
            "std": "population std over the evaluated images",
            "eval_samples": len(evaluated), "config": cfg.to_json(), **info,
            **summary, **result["attrs"], "finished": _now()}
        for key, v in attrs.items():
            g.attrs[key] = v
    return path


@torch.no_grad()
def _feature_rms(target: Target, x: torch.Tensor) -> float:
    """Root mean square of the clean activations (the scale noise_sigma compares with)."""
    dev = next(iter(target.extractor.parameters()), x).device
    return float(target.extractor(x.to(dev)).pow(2).mean().sqrt())


# --- command line -------------------------------------------------------------------------

def run(cfg: Config) -> Path:
    from .runtime import node_cores, pick_device, pick_threads

    torch.set_num_threads(pick_threads(cfg.train.threads, 1, node_cores()))
    device = pick_device(cfg.train.device, 0)
    data.check_available(cfg.data)
    started = _now()
    t0 = time.perf_counter()
    target = get_target(cfg, device)
    _log(f"target: {cfg.model.arch} cut {cfg.model.cut}, defense {_defense(cfg)}, "
         f"utility (client 1 test accuracy) {target.accuracy:.4f}")
    aux, evaluated, aux_source, eval_source = attack_images(cfg)
    methods = METHODS if cfg.attack.method == "both" else (cfg.attack.method,)
    path = output_path(cfg)
    for method in methods:
        t1 = time.perf_counter()
        _log(f"{method} attack: {eval_source}; aux: {aux_source}")
        if method == "decoder":
            result = decoder_attack(cfg, target, aux, evaluated, device)
        else:
            result = rmle_attack(cfg, target, evaluated.to(device), device)
        info = {"started": started, "seconds": time.perf_counter() - t1,
                "total_seconds": time.perf_counter() - t0, "eval_source": eval_source,
                "aux_source": aux_source if method == "decoder" else "none (white-box)",
                "aux_samples": len(aux) if method == "decoder" else 0,
                "feature_shape": np.asarray(observe(target, evaluated[:1]).shape[1:]),
                "feature_rms": _feature_rms(target, evaluated)}
        write(cfg, method, target, evaluated, result, info)
        g = privacy.summarise(privacy.metrics(privacy.to_unit(evaluated),
                                              privacy.to_unit(result["reconstruction"])))
        print(f"{method}: PSNR {g['psnr_mean']:.2f} +- {g['psnr_std']:.2f} dB, SSIM "
              f"{g['ssim_mean']:.3f} +- {g['ssim_std']:.3f}, score {g['score_mean']:.3f}, "
              f"MSE {g['mse_mean']:.5f} ([0,1] pixels); utility {target.accuracy:.4f} "
              f"-> {path}:/attack/{method}", flush=True)
    return path


def parser() -> argparse.ArgumentParser:
    keys = [f"  attack.{f.name}={getattr(config_mod.AttackConfig(), f.name)!r}"
            for f in dataclasses.fields(config_mod.AttackConfig)]
    p = argparse.ArgumentParser(
        prog="python -m splitmpi.attack",
        description="Feature-inversion attack (decoder or white-box rMLE) on a trained "
                    "extractor; results go to /attack/<method> of a splitmpi results file. "
                    "One process, no mpiexec.",
        epilog="attack keys and defaults (any config key can be overridden):\n"
               + "\n".join(keys), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config file (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.cut=1 attack.method=rmle")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)
        validate(cfg)
        run(cfg)
    except ConfigError as exc:
        sys.stderr.write(f"splitmpi.attack: error: {exc}\n")
        return ConfigError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
