"""Run configuration: typed dataclasses, YAML files and dotted ``key=value`` overrides.

Every rank resolves the same config from the same inputs, so validation errors are
found identically everywhere before any work starts (exit code 2, see ``errors``).

A field's annotation is its contract: ``Literal[...]`` lists the choices (errors and
``--help`` read them from there), and each section checks its own ranges in
``validate``. The string under a field says what it is for.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .errors import ConfigError

# A partition is a named scheme or an explicit class list per client; the note is how the
# list form reads in errors and in --help.
Partition = Literal["blocks", "iid", "dirichlet", "shards"] | Annotated[
    list, "a list of class lists, e.g. [[0,1,2,3],[4,5,6],[7,8,9]]"]

# The built-in data sets (``data.DATASETS`` reads them); a user's own is "package.module:function".
DataName = Literal["synthetic", "mnist", "fashionmnist", "kmnist", "emnist", "cifar10",
                   "cifar100", "svhn", "stl10", "imagenet", "folder"] | Annotated[
    str, "package.module:function (your own data sets)"]


def _at_least(low: float, prefix: str, section: object, *names: str) -> None:
    """A section's range check: the first of ``names`` below ``low`` is the error."""
    for name in names:
        value = getattr(section, name)
        if value < low:
            raise ConfigError(f"{prefix}.{name}={value} must be at least {low}",
                              f"set {prefix}.{name} to {low} or more")


def _positive(prefix: str, section: object, *names: str) -> None:
    """Like ``_at_least`` for rates and scales, where 0 is as wrong as a negative."""
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"{prefix}.{name}={value} must be positive",
                              f"set {prefix}.{name} > 0")


@dataclass
class DataConfig:
    name: DataName = "synthetic"
    """synthetic is built in; the others are read from ``root`` and never downloaded
    (docs/data.md); ``package.module:function`` returns your own (train, test) data sets."""
    root: str = "data"
    """Folder holding the data sets (see the README for the layout of each)."""
    partition: Partition = "blocks"
    """Which classes each client holds: ``blocks`` (contiguous class blocks, 0-3/4-6/7-9
    for 3 clients), ``iid``, ``dirichlet`` (see ``dirichlet_alpha``), ``shards`` (the
    training set sorted by label, cut into clients x ``shards_per_client`` equal shards,
    each client given that many at random: the federated-learning benchmark convention),
    or one class list per client."""
    dirichlet_alpha: float = 0.5
    """Concentration of the ``dirichlet`` partition: smaller is more skewed."""
    shards_per_client: int = 2
    """``shards`` only: the shards of sorted labels each client gets."""
    image_size: int = 0
    """0: the data set's own (mnist 28, cifar10 32, imagenet 224); else resize to this."""
    channels: int = 3
    """synthetic only; real data sets know their own."""
    num_classes: int = 10
    """synthetic only; real data sets know their own."""
    train_size: int = 3000
    """synthetic only: training samples over all classes."""
    test_size: int = 600
    """synthetic only: test samples over all classes."""
    limit: int = 0
    """>0: use at most this many train (and test) samples per client, for quick runs."""
    test_limit: int = 0
    """>0: use at most this many test samples per client (instead of ``limit``): with
    many clients, each evaluates on a sample of the test split of its classes."""
    workers: int = 0
    """DataLoader worker processes per client; 0 loads in the client's own process."""
    emnist_split: Literal["balanced", "byclass", "bymerge", "digits", "letters",
                          "mnist"] = "balanced"
    """emnist only: which of its splits (torchvision's names)."""

    def validate(self) -> None:
        _check_name("data.name", self.name, DataName)
        _at_least(1, "data", self, "num_classes", "channels", "train_size", "test_size")
        _at_least(0, "data", self, "limit", "workers", "test_limit")
        _at_least(1, "data", self, "shards_per_client")
        _positive("data", self, "dirichlet_alpha")
        if self.image_size < 0 or (0 < self.image_size < 8):
            raise ConfigError(f"data.image_size={self.image_size} is too small",
                              "use 0 (the data set's own) or at least 8")
        part = self.partition
        if isinstance(part, list) and not all(
                isinstance(c, list) and c and all(isinstance(i, int) for i in c) for c in part):
            raise ConfigError("data.partition as a list must hold one non-empty list of class "
                              "indices per client",
                              "e.g. data.partition=[[0,1,2,3],[4,5,6],[7,8,9]]")


@dataclass
class ModelConfig:
    arch: str = "cnn5"
    """cnn5: the spatio-temporal paper's 5-block CNN; any torchvision classification model
    by name (resnet18, vgg11_bn, vit_b_16, ...); or ``package.module:function``, your own
    network (docs/models.md). Checked when the network is built (``models.build``)."""
    cut: str | int = 2
    """The module after which the clients' extractor ends, by its dotted name (layer2,
    features.6); cnn5: 0..5 blocks on the client (0: none, label_sharing only) or
    flatten. ``python -m splitmpi --list-cuts`` lists a network's cuts."""
    weights: str = ""
    """Empty: random init from train.seed; else a local file holding a torchvision state
    dict, or a splitmpi checkpoint folder. Nothing is downloaded."""

    def validate(self) -> None:
        if not self.arch:
            raise ConfigError("model.arch is empty", "set model.arch, e.g. model.arch=cnn5")
        if isinstance(self.cut, str) and self.cut.isdigit():
            self.cut = int(self.cut)  # a quoted "3" in YAML is cnn5's cut 3


SPLITFED = ("sfl_v1", "sfl_v2")  # the split.mode values that average every client-side model


@dataclass
class SplitConfig:
    mode: Literal["sl", "sfl_v1", "sfl_v2", "parallel"] = "sl"
    """sl: split learning, one server update per request on one cloud model; sfl_v1
    (SplitFed v1): a cloud copy per client, averaged by samples after every epoch; sfl_v2
    (SplitFed v2): one cloud model, the clients one after another in a random order per
    epoch; parallel (parallel split learning): one server update on the batches of up to
    ``server.batch_clients`` clients at once. Both SplitFed modes average the client-side
    models after every epoch: the extractors and, in u_shape, the classifiers
    (docs/architecture.md#modes)."""
    topology: Literal["u_shape", "label_sharing"] = "u_shape"
    """u_shape keeps inputs and labels on the clients; label_sharing sends the labels
    with the activations and puts the output layer on the server."""
    share: bool = True
    """Clients average their extractors after every epoch."""
    share_bn: Literal["average", "local", "recalibrate"] = "recalibrate"
    """What sharing does with BatchNorm (docs/sharing.md): average it all, keep it local,
    or average and then re-estimate the running statistics on each client's data."""
    bn_recalibrate_batches: int = 20
    """recalibrate: at most this many training batches re-estimate the statistics."""
    share_optimizer: Literal["keep", "average", "reset"] = "keep"
    """What sharing does with the SGD momentum of the averaged parameters (docs/sharing.md):
    keep each client's own (0.1's numbers), average it like the parameters, or reset it."""
    share_weights: Literal["equal", "samples"] = "equal"
    """How the clients weigh in the average: equal (the paper's plain mean) or by their
    number of training samples (FedAvg's weighting)."""

    def validate(self) -> None:
        _at_least(1, "split", self, "bn_recalibrate_batches")


@dataclass
class TrainConfig:
    epochs: int = 5
    """Passes over every client's training shard."""
    batch_size: int = 32
    """Samples per client and step."""
    lr: float = 0.01
    """SGD learning rate of every model part, on the clients and the server."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """SGD weight decay."""
    seed: int = 0
    """Same seed, same world size, CPU: the same numbers, bit for bit."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """auto: cuda where the node has a GPU, else cpu."""
    amp: Literal["none", "bf16"] = "none"
    """bf16: mixed precision (torch.autocast) for the forward passes."""
    threads: int = 0
    """torch threads per rank; 0: the node's cores shared by the ranks on the node."""
    log_every: int = 0
    """>0: rank 0 logs a progress line every N training steps served (all clients)."""
    log_seconds: float = 60.0
    """>0: rank 0 logs a progress line at least every this many seconds of training."""
    checkpoint_every: int = 0
    """>0: checkpoint every N epochs (SIGUSR1 and SIGTERM always do)."""
    checkpoint_dir: str = ""
    """Where checkpoints go; empty: OUTPUT.ckpt."""
    resume: str = ""
    """Empty: start afresh; auto: the latest complete checkpoint, if any; or an
    epoch-NNNNN folder."""

    def validate(self) -> None:
        _at_least(1, "train", self, "epochs", "batch_size")
        _at_least(0, "train", self, "momentum", "weight_decay", "threads", "log_every",
                  "log_seconds", "checkpoint_every")
        _positive("train", self, "lr")


@dataclass
class CommConfig:
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Type of the activations and gradients on the wire: 16 bits halve the bytes."""
    gpu_aware: bool = False
    """Hand CUDA buffers straight to MPI; only for a CUDA-aware MPI."""
    wait: Literal["auto", "spin", "sleep"] = "auto"
    """How a rank waits for messages: spin (MPI's busy-polling calls) or sleep (poll and
    sleep); auto: sleep where the node has more ranks than cores, else spin."""
    compress: str = "none"
    """The cut layer's batches on the wire, per sample (``compress.Codec``): none; topk:F
    keeps the fraction F of entries of largest magnitude; int8 or fp8 (e4m3), one scale
    per sample. Replaces wire_dtype for what it codes."""
    compress_grad: bool = False
    """Code the gradients too (feature and activation gradients), not only activations
    and features."""

    def validate(self) -> None:
        from .compress import Codec  # torch: imported when a config is checked, not loaded
        Codec.parse(self.compress)


@dataclass
class ServerConfig:
    schedule: Literal["round_robin", "sequential", "fifo"] = "round_robin"
    """Order the server serves the clients' requests in (``schedule.POLICIES``); fifo
    serves in arrival order, so it is not reproducible across runs."""
    batch_clients: Literal["all"] | Annotated[int, "a number of clients, 1 or more"] = "all"
    """split.mode=parallel only: the most clients whose batches one server update takes.
    round_robin waits for the next this many clients in rank order; fifo takes the first
    request to arrive and those already waiting."""

    def validate(self) -> None:
        if self.batch_clients != "all":
            _at_least(1, "server", self, "batch_clients")


@dataclass
class ClientsConfig:
    count: int = 0
    """The logical clients, N; 0: one per client rank (world size - 1). N may exceed the
    client ranks: each rank then hosts a contiguous block of clients (docs/scale.md)."""
    per_epoch: Annotated[int, "a number of clients"] | Annotated[
        float, "a fraction of clients.count in (0, 1]"] = 1.0
    """The clients that train (and share) in each epoch: a count (an integer) or a
    fraction of clients.count (a number with a point; 1.0 = all), drawn afresh each epoch
    from train.seed and recorded in the results file (/clients/participated)."""
    eval_every: int = 1
    """Evaluate every client after every this many epochs (and always after the last);
    0: only after the last. Epochs without evaluation have NaN test metrics."""
    delay_ms: list | Annotated[str, "uniform:LO,HI or lognormal:MU,SIGMA"] = field(
        default_factory=list)
    """Simulated network delay of each client, in milliseconds: a request leaves no
    sooner than this after the client's previous step ended. One value per client, or a
    distribution each client draws its delay from once (seeded): ``uniform:LO,HI``, or
    ``lognormal:MU,SIGMA`` (exp(N(MU, SIGMA^2)) ms)."""

    def validate(self) -> None:
        _at_least(0, "clients", self, "count", "eval_every")
        if isinstance(self.per_epoch, float) and not 0 < self.per_epoch <= 1:
            raise ConfigError(f"clients.per_epoch={self.per_epoch} is a fraction outside "
                              "(0, 1]", "give a fraction in (0, 1], e.g. 0.1, or a count "
                              "of clients (an integer), e.g. 10")
        if isinstance(self.per_epoch, int) and self.per_epoch < 1:
            raise ConfigError(f"clients.per_epoch={self.per_epoch} is not positive",
                              "give a count of 1 or more, or a fraction such as 0.1")
        if self.count and isinstance(self.per_epoch, int) and self.per_epoch > self.count:
            raise ConfigError(f"clients.per_epoch={self.per_epoch} is more than "
                              f"clients.count={self.count}",
                              f"set clients.per_epoch to at most {self.count}")
        if isinstance(self.delay_ms, str):
            parse_delay(self.delay_ms)


@dataclass
class DefenseConfig:
    noise_sigma: float = 0.0
    """Standard deviation of Gaussian noise added to every activation sent."""
    nopeek_alpha: float = 0.0
    """Weight of the NoPeek distance-correlation loss."""
    dropout: float = 0.0
    """Dropout probability on the cut (training only)."""
    grad_clip: float = 0.0
    """u_shape, against label leakage: the largest L2 norm of each sample's feature
    gradient (its loss's dL/dh) a client sends; 0 = off (docs/privacy.md)."""
    grad_noise: float = 0.0
    """u_shape: Gaussian noise added to each clipped feature-gradient row, its std in units
    of ``grad_clip`` (std = grad_noise * grad_clip); needs grad_clip > 0."""
    grad_maxnorm: bool = False
    """u_shape: Li et al.'s max-norm defense against the norm attack: each feature-gradient
    row gets Gaussian noise that brings its expected squared norm up to the batch's largest
    (after grad_clip, before grad_noise)."""
    act_clip: float = 0.0
    """Differentially private activations: the largest L2 norm of each sample's activation
    row sent; Gaussian noise of std sigma * act_clip is added to each entry, training and
    eval; 0 = off (docs/privacy.md, splitmpi/accountant.py)."""
    act_epsilon: float = 0.0
    """With act_clip: the epsilon spent after train.epochs epochs, at act_delta; sigma is
    solved for it. 0 = no noise (clipping only, epsilon infinite)."""
    act_delta: float = 1e-5
    """The delta of act_epsilon, in (0, 1)."""
    label_epsilon: float = 0.0
    """Label differential privacy: each client trains on its training labels after
    randomized response, drawn once per sample (kept with probability e^eps / (e^eps + K -
    1), else another of the data set's K classes), so the whole run is label_epsilon-label-DP
    for each training label; u_shape and label_sharing; test labels stay true; 0 = off
    (docs/privacy.md, "The label defense")."""

    def validate(self) -> None:
        _at_least(0, "defense", self, "noise_sigma", "nopeek_alpha", "grad_clip",
                  "grad_noise", "act_clip", "act_epsilon", "label_epsilon")
        if math.isnan(self.label_epsilon):  # NaN passes the range check, and would replace
            raise ConfigError("defense.label_epsilon=nan is not a number",  # every label
                              "set defense.label_epsilon to 0 (off) or more")
        if not 0 < self.act_delta < 1:
            raise ConfigError(f"defense.act_delta={self.act_delta} is not a probability "
                              "between 0 and 1", "set defense.act_delta in (0, 1), e.g. 1e-5")
        if self.act_epsilon > 0 and self.act_clip == 0:
            raise ConfigError(f"defense.act_epsilon={self.act_epsilon} needs clipped "
                              "activations, but defense.act_clip=0",
                              "set defense.act_clip > 0 too, about the activations' typical "
                              "row norm (docs/privacy.md)")
        if self.act_clip > 0 and self.noise_sigma > 0:
            raise ConfigError(f"defense.act_clip={self.act_clip} adds its own noise, and "
                              f"defense.noise_sigma={self.noise_sigma} would add more that "
                              "the accountant does not count",
                              "drop defense.noise_sigma (set it to 0), or drop "
                              "defense.act_clip")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"defense.dropout={self.dropout} is not a probability below 1",
                              "set defense.dropout to at least 0 and below 1")
        if self.grad_noise > 0 and self.grad_clip == 0:
            raise ConfigError(f"defense.grad_noise={self.grad_noise} is relative to the clip "
                              "norm, but defense.grad_clip=0",
                              "set defense.grad_clip > 0 too, e.g. defense.grad_clip=1")


@dataclass
class AttackConfig:
    """Read by ``python -m splitmpi.attack``; a training run reads only ``labels``,
    ``label_rows`` and ``known_labels``, which change none of its training numbers, so
    checkpoints do not depend on this section (``checkpoint.VOLATILE``)."""

    method: Literal["decoder", "rmle", "both", "completion"] = "decoder"
    """decoder: an inverse network; rmle: white-box optimisation; both: both on one
    extractor; completion: the server completes its cloud with a head trained on a few
    known labels (a run's checkpoint, u_shape)."""
    checkpoint: str = ""
    """Extractor to attack: a .pt file, a run's checkpoint folder (OUTPUT.h5.ckpt or one
    epoch-NNNNN in it) or a results file OUTPUT.h5; empty: train the config's model first."""
    client: int = 1
    """A run's checkpoint: whose extractor (client k = 1..N)."""
    epoch: int = 0
    """A run's checkpoint: the saved epoch to attack; 0: the latest."""
    save: str = ""
    """Where to save the in-process trained model (.pt, for attack.checkpoint)."""
    aux: Literal["train", "others"] = "train"
    """The attacker's images: train: random train-split images; others: only the other
    clients' shards."""
    aux_samples: int = 1000
    """Attacker's auxiliary images, same distribution as the clients'."""
    eval_samples: int = 64
    """Clients' held-out images the attack is scored on."""
    epochs: int = 10
    """Decoder training epochs."""
    batch_size: int = 64
    """Decoder training batch size."""
    lr: float = 0.001
    """Decoder learning rate."""
    decoder_width: int = 32
    """Fewest channels of a decoder layer (mirrored widths above it)."""
    rmle_steps: int = 200
    """Optimisation steps of rMLE."""
    rmle_tv: float = 0.01
    """Total-variation prior weight."""
    rmle_lr: float = 0.05
    """Adam step size on the input pixels ([-1, 1] scale)."""
    grid: int = 8
    """Originals and reconstructions stored for figures."""
    output: str = ""
    """Results file for /attack/<method>; empty: the top-level output."""
    labels: bool = False
    """Training runs, u_shape: measure label inference from the feature gradients the
    server receives; each client scores the rows it sent, per epoch, into /attack/labels
    (docs/privacy.md)."""
    label_rows: int = 512
    """attack.labels: the most feature-gradient rows recorded per client and epoch (the
    first ones of the epoch)."""
    known_labels: int = 4
    """attack.labels: labelled rows per class the attacker is given (the first of each
    class); they name the classes and are not scored."""

    def validate(self) -> None:
        _at_least(1, "attack", self, "aux_samples", "eval_samples", "batch_size",
                  "decoder_width", "label_rows", "known_labels")
        _at_least(0, "attack", self, "epochs", "rmle_steps", "grid", "rmle_tv")
        _positive("attack", self, "lr", "rmle_lr")


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
    audit: bool = False
    """The server digests every message; clients check none is their raw data."""
    output: str = "results.h5"
    """The HDF5 results file (rank 0 writes it)."""
    overwrite: bool = False
    """Replace an existing output file; without it an existing file is never touched."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        """Multi-line, in the order of the dataclasses: what ``-c`` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_name(key: str, value: str, annotation: Any) -> None:
    """A name field that takes one of its choices or a user's ``package.module:function``."""
    names = [v for kind in _alternatives(annotation) if typing.get_origin(kind) is Literal
             for v in typing.get_args(kind)]
    if value in names or ":" in value:
        return
    close = difflib.get_close_matches(value, names, n=3)
    raise ConfigError(f"{key}={value!r} is not supported"
                      + (f" (did you mean {' or '.join(close)}?)" if close else ""),
                      f"use one of: {choices(annotation)}")


def user_function(key: str, value: str, parameters: str) -> Callable:
    """The function a ``package.module:function`` value names (model.arch, data.name),
    imported as Python imports it (the working directory and PYTHONPATH); ``parameters``
    is how splitmpi calls it, for the messages."""
    module_name, _, name = value.partition(":")
    if not module_name or not name.isidentifier():
        raise ConfigError(f"{key}={value} is not package.module:function",
                          f"e.g. {key}=mymodule:build for def build{parameters} in mymodule.py")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while it loads
        raise ConfigError(f"{key}={value}: cannot import module {module_name} "
                          f"({type(exc).__name__}: {exc})",
                          f"put the folder holding {module_name.split('.')[0]} on PYTHONPATH "
                          "for every rank (or start from it), and check that it imports"
                          ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{key}={value}: module {module_name} ({module.__file__}) has no "
                          f"function {name}", f"define {name}{parameters} there")
    return function


def _alternatives(annotation: Any) -> tuple:
    """The members of a union annotation, or the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def choices(annotation: Any) -> str:
    """What a choice field accepts, as errors and ``--help`` list it; empty for other
    fields."""
    literal = [v for kind in _alternatives(annotation) if typing.get_origin(kind) is Literal
               for v in typing.get_args(kind)]
    if not literal:
        return ""
    others = [kind.__metadata__[0] for kind in _alternatives(annotation)
              if typing.get_origin(kind) is Annotated]
    return " or ".join([", ".join(map(str, literal)), *others])


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints pass as floats, nothing else converts."""
    kinds = [typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind
             for kind in _alternatives(annotation)]
    for kind in kinds:
        if typing.get_origin(kind) is Literal:
            # compare types too: True == 1, so a YAML true would pass for a choice 1
            if any(type(value) is type(c) and value == c for c in typing.get_args(kind)):
                return value
        elif kind is bool and isinstance(value, bool):
            return value
        elif kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif kind is float and isinstance(value, str) and _is_float(value):
            return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        elif kind in (str, list) and isinstance(value, kind):
            return value
    allowed = choices(annotation)
    if allowed:
        raise ConfigError(f"{key}={value!r} is not supported", f"use one of: {allowed}")
    names = " or ".join(kind.__name__ for kind in kinds)
    raise ConfigError(f"{key} must be {names}, got {value!r}",
                      f"set {key} to a {names} value")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def field_types(section: Any) -> dict:
    """A section's field annotations, resolved (``Annotated`` notes kept for messages)."""
    return typing.get_type_hints(type(section), include_extras=True)


def _apply(section: Any, values: dict, prefix: str) -> None:
    hints = field_types(section)
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
        raise ConfigError(f"value of {key} is not valid YAML: {exc}", "quote or fix it") from None
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
            raise ConfigError(f"config file {path} is not valid YAML: {exc}",
                              "fix the file") from None
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
    """Checks that need no data and no MPI: each section's own, then those that span
    sections; world-size checks live in ``check_world``, file checks in the commands."""
    for section in (cfg.data, cfg.model, cfg.split, cfg.train, cfg.comm, cfg.server,
                    cfg.clients, cfg.defense, cfg.attack):
        section.validate()
    if ((cfg.model.arch == "cnn5" and cfg.model.cut == 0) or cfg.model.cut == "") and \
            cfg.split.topology == "u_shape":
        raise ConfigError(f"model.cut={cfg.model.cut!r} leaves no layer on the clients, so "
                          "u_shape would send raw inputs to the server",
                          "use split.topology=label_sharing for the all-at-server baseline, "
                          "or a cut that leaves layers on the clients")
    if cfg.split.topology != "u_shape":
        for key, on in (("attack.labels", cfg.attack.labels),
                        ("defense.grad_clip", cfg.defense.grad_clip > 0),
                        ("defense.grad_maxnorm", cfg.defense.grad_maxnorm)):
            if on:
                raise ConfigError(f"{key} concerns the feature gradient of u_shape, but "
                                  f"split.topology={cfg.split.topology} sends the labels "
                                  "themselves", f"drop {key}, or use split.topology=u_shape")
    mode = cfg.split.mode
    if mode in SPLITFED and not cfg.split.share:
        raise ConfigError(f"split.mode={mode} averages the clients' extractors after every "
                          "epoch, but split.share=false", "set split.share=true, or use "
                          "split.mode=sl for split learning without sharing")
    if mode == "sfl_v1" and cfg.split.share_weights != "samples":
        raise ConfigError("split.mode=sfl_v1 weighs clients by their samples (FedAvg), but "
                          f"split.share_weights={cfg.split.share_weights}",
                          "set split.share_weights=samples")
    if mode == "sfl_v2" and cfg.server.schedule != "sequential":
        raise ConfigError("split.mode=sfl_v2 serves the clients one after another, but "
                          f"server.schedule={cfg.server.schedule}",
                          "set server.schedule=sequential (sfl_v2 draws its order per epoch)")
    if mode == "parallel" and cfg.server.schedule == "sequential":
        raise ConfigError("split.mode=parallel gathers several clients' batches into one "
                          "update, but server.schedule=sequential serves one client's whole "
                          "phase at a time", "set server.schedule=round_robin (or fifo)")
    if mode != "parallel" and cfg.server.batch_clients != "all":
        raise ConfigError(f"server.batch_clients={cfg.server.batch_clients} is used by "
                          f"split.mode=parallel only, but split.mode={mode}",
                          "drop server.batch_clients, or set split.mode=parallel")
    if not cfg.output:
        raise ConfigError("output is empty", "set output=PATH.h5")


def check_world(cfg: Config, world_size: int) -> int:
    """Number of clients for this world; every rank calls it with the same inputs."""
    if world_size < 2:
        raise ConfigError(f"splitmpi needs a server and at least one client, got {world_size} "
                          "rank", "launch with mpirun -n 1+CLIENTS, e.g. mpirun -n 4 for 3 clients")
    ranks = world_size - 1
    count = cfg.clients.count
    if count and count < ranks:
        raise ConfigError(f"clients.count={count} is smaller than the {ranks} client ranks "
                          f"of this launch ({world_size} ranks: {ranks} clients + server)",
                          f"launch with mpirun -n {count + 1}, or set clients.count to "
                          f"{ranks} or more (a rank may host many clients, not none)")
    clients = count or ranks
    if isinstance(cfg.clients.per_epoch, int) and cfg.clients.per_epoch > clients:
        raise ConfigError(f"clients.per_epoch={cfg.clients.per_epoch} is more than the "
                          f"{clients} clients of this run",
                          f"set clients.per_epoch to at most {clients}, or a fraction")
    delays = cfg.clients.delay_ms
    if isinstance(delays, list) and delays and (len(delays) != clients or not all(
            isinstance(d, (int, float)) and not isinstance(d, bool) and d >= 0
            for d in delays)):
        raise ConfigError(f"clients.delay_ms={_short(delays)} must hold one delay >= 0 per "
                          f"client ({clients})",
                          f"e.g. clients.delay_ms=[{', '.join(['0'] * min(clients, 4))}"
                          f"{', ...' if clients > 4 else ''}], or a distribution such as "
                          "uniform:0,20")
    if clients > ranks:
        for key, on, fix in (
                ("split.mode=sfl_v1", cfg.split.mode == "sfl_v1",
                 "use split.mode=sfl_v2 or sl, or one client per rank"),
                ("audit=true", cfg.audit, "drop audit, or run one client per rank"),
                ("attack.labels=true", cfg.attack.labels,
                 "drop attack.labels, or run one client per rank"),
                ("data.workers>0", cfg.data.workers > 0, "set data.workers=0")):
            if on:
                raise ConfigError(f"{key} is not supported with more clients "
                                  f"(clients.count={clients}) than client ranks ({ranks})",
                                  fix)
    part = cfg.data.partition
    if isinstance(part, list) and len(part) != clients:
        raise ConfigError(f"data.partition lists {len(part)} clients but the run has "
                          f"{clients} clients", f"set clients.count={len(part)} (and launch "
                          f"at most {len(part) + 1} ranks), or give {clients} class lists")
    return ranks


DISTRIBUTIONS = {"uniform": ("LO", "HI"), "lognormal": ("MU", "SIGMA")}


def parse_delay(text: str) -> tuple[str, float, float]:
    """``uniform:LO,HI`` or ``lognormal:MU,SIGMA`` -> (name, a, b), or a ConfigError."""
    name, _, args = text.partition(":")
    fix = ("set clients.delay_ms to a list of one delay per client, uniform:LO,HI "
           "(milliseconds) or lognormal:MU,SIGMA (the delay is exp(N(MU, SIGMA^2)) ms), "
           "e.g. clients.delay_ms=uniform:0,20")
    try:
        a, b = (float(v) for v in args.split(","))
    except ValueError:
        raise ConfigError(f"clients.delay_ms={text!r} does not parse", fix) from None
    if name not in DISTRIBUTIONS or not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError(f"clients.delay_ms={text!r} does not parse", fix)
    if (name == "uniform" and not 0 <= a <= b) or (name == "lognormal" and b < 0):
        raise ConfigError(f"clients.delay_ms={text!r}: "
                          + ("uniform needs 0 <= LO <= HI" if name == "uniform"
                             else "lognormal needs SIGMA >= 0"), fix)
    return name, a, b


def _short(values: list) -> str:
    """A list as an error message shows it: the first few values."""
    return str(values) if len(values) <= 6 else f"[{', '.join(map(str, values[:6]))}, ...]"
