"""Run configuration: typed dataclasses, YAML files and dotted ``key=value`` overrides.

Every rank resolves the same config from the same inputs, so validation errors are
found identically everywhere before any work starts (exit code 2, see ``errors``).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError

Partition = Union[str, list]


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | mnist | cifar10 | imagenet
    root: str = "data"
    # "blocks" (contiguous class blocks, 0-3/4-6/7-9 for 3 clients), "iid", "dirichlet",
    # or an explicit list of class lists, one per client.
    partition: Partition = "blocks"
    dirichlet_alpha: float = 0.5
    image_size: int = 0  # 0: the data set's own (mnist 28, cifar10 32, imagenet 224)
    channels: int = 3  # synthetic only
    num_classes: int = 10  # synthetic only; real data sets know their own
    train_size: int = 3000  # synthetic only: samples over all classes
    test_size: int = 600  # synthetic only
    limit: int = 0  # >0: use at most this many train (and test) samples per client
    workers: int = 0  # DataLoader worker processes per client


@dataclass
class ModelConfig:
    arch: str = "cnn5"  # cnn5 | resnet50
    cut: Union[str, int] = 2  # resnet50: layer1|layer2|layer3; cnn5: 0..4 blocks on the client


@dataclass
class SplitConfig:
    topology: str = "u_shape"  # u_shape | label_sharing
    share: bool = True


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16
    threads: int = 0  # torch threads per rank; 0: cores on this node / ranks on this node
    log_every: int = 0  # >0: also log every N training steps served
    checkpoint_every: int = 0  # >0: checkpoint every N epochs (SIGUSR1/SIGTERM always do)
    checkpoint_dir: str = ""  # default: OUTPUT.ckpt
    resume: str = ""  # empty: start afresh; auto: the latest complete checkpoint; or a PATH


@dataclass
class CommConfig:
    wire_dtype: str = "float32"  # float32 | bfloat16 | float16 (activations and gradients)
    gpu_aware: bool = False  # hand CUDA buffers straight to MPI (only for a CUDA-aware MPI)
    # how a rank waits for messages: spin (MPI's busy-polling calls), sleep (poll and sleep),
    # auto: sleep where the node has more ranks than cores, else spin
    wait: str = "auto"


@dataclass
class ServerConfig:
    schedule: str = "round_robin"  # round_robin | sequential | fifo


@dataclass
class ClientsConfig:
    count: int = 0  # 0: world size - 1; otherwise the launch must match it
    delay_ms: list = field(default_factory=list)  # per client: simulated network delay per request


@dataclass
class DefenseConfig:
    noise_sigma: float = 0.0  # std of Gaussian noise added to every activation sent
    nopeek_alpha: float = 0.0  # weight of the NoPeek distance-correlation loss
    dropout: float = 0.0  # dropout probability on the cut (training only)


@dataclass
class AttackConfig:
    # decoder (inverse network) | rmle (white-box optimisation) | both (one extractor, both)
    method: str = "decoder"
    checkpoint: str = ""  # extractor to attack (.pt); empty: train the config's model first
    save: str = ""  # where to save the in-process trained model (.pt, for attack.checkpoint)
    aux: str = "train"  # train: random train-split images | others: other clients' shards only
    aux_samples: int = 1000  # attacker's auxiliary images, same distribution as the clients'
    eval_samples: int = 64  # clients' held-out images the attack is scored on
    epochs: int = 10  # decoder training epochs
    batch_size: int = 64
    lr: float = 0.001
    decoder_width: int = 32  # fewest channels of a decoder layer (mirrored widths above it)
    rmle_steps: int = 200
    rmle_tv: float = 0.01  # total-variation prior weight
    rmle_lr: float = 0.05  # Adam step size on the input pixels ([-1, 1] scale)
    grid: int = 8  # originals/reconstructions stored for figures
    output: str = ""  # results file for /attack/<method>; empty: the top-level output


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    audit: bool = False  # server digests every message; clients check none is their raw data
    output: str = "results.h5"
    overwrite: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


CHOICES = {
    "data.name": ("synthetic", "mnist", "cifar10", "imagenet"),
    "model.arch": ("cnn5", "resnet50"),
    "split.topology": ("u_shape", "label_sharing"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("none", "bf16"),
    "comm.wire_dtype": ("float32", "bfloat16", "float16"),
    "comm.wait": ("auto", "spin", "sleep"),
    "server.schedule": ("round_robin", "sequential", "fifo"),
    "attack.method": ("decoder", "rmle", "both"),
}

CUTS = {"resnet50": ("layer1", "layer2", "layer3"), "cnn5": (0, 1, 2, 3, 4)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints pass as floats, nothing else converts."""
    allowed = typing.get_args(annotation) or (annotation,)
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (str, list) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r}",
                      f"set {key} to a {names} value")


def _apply(section: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{n}" for n in hints)
            raise ConfigError(f"unknown config key {key!r}", f"use one of: {known}")
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section, got {value!r}",
                                  f"set its keys instead, e.g. {key}.<key>=...")
            _apply(current, value, f"{key}.")
        else:
            setattr(section, name, _coerce(key, value, hints[name]))


def parse_override(text: str) -> dict:
    """``a.b=1`` -> ``{"a": {"b": 1}}``; the value is read as YAML (so ``[1,2]`` is a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value",
                          "write overrides as dotted key=value, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"value of {key} is not valid YAML: {exc}", "quote or fix it")
    node: dict = {}
    root = node
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return root


def _merge(dst: dict, src: dict) -> dict:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value
    return dst


def load(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then the overrides, then validation."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found", "pass an existing YAML file with -c")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}", "fix the file")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping", "write key: value lines")
        values = loaded
    for text in overrides:
        _merge(values, parse_override(text))
    cfg = Config()
    _apply(cfg, values, "")
    validate(cfg)
    return cfg


def from_json(text: str) -> Config:
    """Rebuild a config stored in a results file (used by readers and resume)."""
    cfg = Config()
    _apply(cfg, json.loads(text), "")
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no data and no MPI; world-size checks live in ``check_world``."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not supported",
                              f"use one of: {', '.join(allowed)}")
    cuts = CUTS[cfg.model.arch]
    cut = cfg.model.cut
    if cfg.model.arch == "cnn5" and isinstance(cut, str) and cut.isdigit():
        cfg.model.cut = cut = int(cut)
    if cut not in cuts:
        raise ConfigError(f"model.cut={cut!r} is not a cut of {cfg.model.arch}",
                          f"use one of: {', '.join(map(str, cuts))}")
    if cfg.model.arch == "cnn5" and cut == 0 and cfg.split.topology == "u_shape":
        raise ConfigError("model.cut=0 leaves no layer on the clients, so u_shape would send "
                          "raw inputs to the server",
                          "use split.topology=label_sharing for the all-at-server baseline, "
                          "or a cut of 1..4")
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "data.num_classes": cfg.data.num_classes, "data.channels": cfg.data.channels,
                "data.train_size": cfg.data.train_size, "data.test_size": cfg.data.test_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1", f"set {key} to 1 or more")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr={cfg.train.lr} must be positive", "set train.lr > 0")
    d = cfg.defense
    if d.noise_sigma < 0 or d.nopeek_alpha < 0 or not 0 <= d.dropout < 1:
        raise ConfigError("defense settings out of range (noise_sigma >= 0, nopeek_alpha >= 0, "
                          "0 <= dropout < 1)", "fix the defense.* values")
    if cfg.data.dirichlet_alpha <= 0:
        raise ConfigError("data.dirichlet_alpha must be positive", "set it > 0, e.g. 0.5")
    if cfg.data.image_size < 0 or (0 < cfg.data.image_size < 8):
        raise ConfigError(f"data.image_size={cfg.data.image_size} is too small",
                          "use 0 (the data set's own) or at least 8")
    part = cfg.data.partition
    if isinstance(part, str) and part not in ("blocks", "iid", "dirichlet"):
        raise ConfigError(f"data.partition={part!r} is not supported",
                          "use blocks, iid, dirichlet or a list of class lists, "
                          "e.g. [[0,1,2,3],[4,5,6],[7,8,9]]")
    if isinstance(part, list) and not all(
            isinstance(c, list) and c and all(isinstance(i, int) for i in c) for c in part):
        raise ConfigError("data.partition as a list must hold one non-empty list of class "
                          "indices per client", "e.g. data.partition=[[0,1,2,3],[4,5,6],[7,8,9]]")
    if not cfg.output:
        raise ConfigError("output is empty", "set output=PATH.h5")


def check_world(cfg: Config, world_size: int) -> int:
    """Number of clients for this world; every rank calls it with the same inputs."""
    if world_size < 2:
        raise ConfigError(f"splitmpi needs a server and at least one client, got {world_size} "
                          "rank", "launch with mpirun -n 1+CLIENTS, e.g. mpirun -n 4 for 3 clients")
    clients = world_size - 1
    count = cfg.clients.count
    if count and count != clients:
        raise ConfigError(f"clients.count={count} but the world has {world_size} ranks "
                          f"({clients} clients + server)",
                          f"launch with mpirun -n {count + 1}, or set clients.count={clients}")
    delays = cfg.clients.delay_ms
    if delays and (len(delays) != clients or not all(
            isinstance(d, (int, float)) and d >= 0 for d in delays)):
        raise ConfigError(f"clients.delay_ms={delays} must hold one delay >= 0 per client "
                          f"({clients})", f"e.g. clients.delay_ms=[{', '.join(['0'] * clients)}]")
    part = cfg.data.partition
    if isinstance(part, list) and len(part) != clients:
        raise ConfigError(f"data.partition lists {len(part)} clients but the world has "
                          f"{clients} clients", f"launch with mpirun -n {len(part) + 1} or give "
                          f"{clients} class lists")
    return clients
