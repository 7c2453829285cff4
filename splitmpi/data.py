"""Data sets, per-client shards and loaders.

Every image comes out as a float32 tensor normalised to [-1, 1] (``Normalize(0.5, 0.5)``
per channel, synthetic data generated in that range); the attack code relies on this
range, e.g. to bound and compare reconstructions, so keep it when adding a data set.

Every rank computes the same partition from the same config, then a client keeps only its
own shard, so no indices are ever sent over MPI.
"""
from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .config import Config, DataConfig
from .errors import ConfigError

SYNTHETIC_SEED = 1234  # fixed, so every rank generates the same images whatever train.seed
DEFAULT_SIZE = {"mnist": 28, "cifar10": 32, "imagenet": 224, "synthetic": 32}
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class DataSpec:
    channels: int
    image_size: int
    num_classes: int


def spec(cfg: DataConfig) -> DataSpec:
    """Shape of the images and number of classes, known before any image is read."""
    size = _image_size(cfg)
    if cfg.name == "mnist":
        return DataSpec(1, size, 10)
    if cfg.name == "cifar10":
        return DataSpec(3, size, 10)
    if cfg.name == "imagenet":
        return DataSpec(3, size, len(_class_folders(Path(cfg.root) / "train")))
    return DataSpec(cfg.channels, size, cfg.num_classes)


def _image_size(cfg: DataConfig) -> int:
    return cfg.image_size or DEFAULT_SIZE[cfg.name]


# --- files on disk -------------------------------------------------------------------------

def _missing(kind: str, path: Path, fix: str) -> ConfigError:
    return ConfigError(f"{kind} {path} not found", fix)


def _class_folders(folder: Path) -> list[str]:
    """Class folder names as ImageFolder sees them (sorted sub-directories)."""
    fix = ("put one folder per class (e.g. n01440764/) under data.root/train/ and "
           "data.root/val/, or set data.root")
    if not folder.is_dir():
        raise _missing("ImageNet folder", folder, fix)
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise ConfigError(f"ImageNet folder {folder} holds no class folders", fix)
    return classes


def check_available(cfg: DataConfig) -> None:
    """Fail before any work starts, naming the first missing file and where it belongs."""
    root = Path(cfg.root)
    if cfg.name == "mnist":
        raw = root / "MNIST" / "raw"
        for name in MNIST_FILES:
            if not (raw / name).is_file():
                raise _missing("MNIST file", raw / name,
                               f"put the uncompressed MNIST idx files under {raw}/ "
                               f"(data.root={cfg.root}) or set data.root")
    elif cfg.name == "cifar10":
        files = _cifar10_files()
        folder = root / files.base_folder
        for name in [n for n, _ in files.train_list + files.test_list] + [
                files.meta["filename"]]:
            if not (folder / name).is_file():
                raise _missing("CIFAR-10 file", folder / name,
                               f"unpack cifar-10-python.tar.gz into {root}/ so that {folder}/ "
                               f"exists (data.root={cfg.root}) or set data.root")
    elif cfg.name == "imagenet":
        train = _class_folders(root / "train")
        val = _class_folders(root / "val")
        if train != val:
            only = sorted(set(train) ^ set(val))
            raise ConfigError(f"ImageNet class folders differ between {root}/train and "
                              f"{root}/val (e.g. {', '.join(only[:3])})",
                              "give val/ the same class folders as train/ (sort the "
                              "validation images into class folders)")


def _torchvision():
    """torchvision's ``datasets`` and ``transforms``, imported on first use: torchvision
    costs every rank 1.5 s of start-up and 170 MB, and the synthetic data needs none of it."""
    from torchvision import datasets, transforms
    return datasets, transforms


@functools.cache
def _cifar10_files() -> type:
    """torchvision's CIFAR-10 reader checking that files exist rather than their md5 sums.

    ``check_integrity(path, None)`` only tests existence, so small stand-in copies (tests,
    subsets) load through torchvision's own code.
    """
    datasets, _ = _torchvision()

    class CIFAR10Files(datasets.CIFAR10):
        train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
        test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
        meta = {**datasets.CIFAR10.meta, "md5": None}

    return CIFAR10Files


# --- transforms and full data sets ---------------------------------------------------------

def _normalise(channels: int) -> list:
    _, transforms = _torchvision()
    return [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]


def _mnist(cfg: DataConfig, train: bool) -> Dataset:
    datasets, transforms = _torchvision()
    size = _image_size(cfg)
    resize = [transforms.Resize(size)] if size != 28 else []
    return datasets.MNIST(cfg.root, train=train, download=False,
                          transform=transforms.Compose(resize + _normalise(1)))


def _cifar10(cfg: DataConfig, train: bool) -> Dataset:
    _, transforms = _torchvision()
    size = _image_size(cfg)
    steps = [transforms.Resize(size)] if size != 32 else []
    if train:
        steps += [transforms.RandomCrop(size, padding=size // 8),
                  transforms.RandomHorizontalFlip()]
    return _cifar10_files()(cfg.root, train=train, download=False,
                            transform=transforms.Compose(steps + _normalise(3)))


def _imagenet(cfg: DataConfig, train: bool) -> Dataset:
    datasets, transforms = _torchvision()
    size = _image_size(cfg)
    if train:
        steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size)]
    folder = Path(cfg.root) / ("train" if train else "val")
    try:
        return datasets.ImageFolder(folder, transform=transforms.Compose(steps + _normalise(3)))
    except FileNotFoundError as exc:  # e.g. a class folder without images
        raise ConfigError(f"ImageNet folder {folder}: {exc}",
                          "put at least one image in every class folder") from None


class SyntheticImages(Dataset):
    """Pre-generated image tensors with torchvision-style ``.data`` and ``.targets``."""

    def __init__(self, data: torch.Tensor, targets: torch.Tensor):
        self.data = data
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], int(self.targets[index])


def _smooth(count: int, channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Low-frequency random images: a 4x4 Gaussian grid upsampled bilinearly.

    Each channel has zero mean (patterns differ in shape, not average colour), and each
    image unit standard deviation. Bilinear upsampling is separable, so it is done as
    ``basis.T @ grid @ basis``, much faster than ``interpolate`` on many tiny grids.
    """
    coarse = torch.randn(count, channels, 4, 4, generator=g)
    basis = torch.nn.functional.interpolate(torch.eye(4)[:, None], size=size, mode="linear",
                                            align_corners=False)[:, 0]
    smooth = basis.T @ coarse @ basis
    smooth = smooth - smooth.mean(dim=(2, 3), keepdim=True)
    return smooth / smooth.std(dim=(1, 2, 3), keepdim=True)


def _samples(protos: torch.Tensor, count: int, size: int, shift: int,
             g: torch.Generator) -> SyntheticImages:
    """Balanced samples in [-1, 1]: the class prototype randomly shifted and rescaled, plus a
    random brightness, a smooth nuisance pattern (so a class is not one point plus pixel
    noise, which averaging would remove) and pixel noise.
    """
    classes, channels = protos.shape[:2]
    labels = torch.arange(count) % classes
    dy, dx = torch.randint(0, 2 * shift + 1, (2, count), generator=g)
    rows = (dy[:, None] + torch.arange(size))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(size))[:, None, None, :]
    images = protos[labels[:, None, None, None], torch.arange(channels)[:, None, None], rows, cols]
    contrast = 0.7 + 0.6 * torch.rand(count, 1, 1, 1, generator=g)
    brightness = 0.1 * torch.randn(count, channels, 1, 1, generator=g)
    nuisance = 0.6 * _smooth(count, channels, size, g)
    noise = 0.2 * torch.randn(count, channels, size, size, generator=g)
    images.mul_(0.3 * contrast).add_(brightness).add_(nuisance).add_(noise).clamp_(-1, 1)
    return SyntheticImages(images, labels)


def _synthetic(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Learnable class-conditional images, identical on every rank (fixed generator)."""
    size = _image_size(cfg)
    shift = max(1, size // 16)
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    protos = _smooth(cfg.num_classes, cfg.channels, size + 2 * shift, g)
    return (_samples(protos, cfg.train_size, size, shift, g),
            _samples(protos, cfg.test_size, size, shift, g))


def _load(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The full (train, test) data sets with their transforms."""
    check_available(cfg)
    if cfg.name == "synthetic":
        return _synthetic(cfg)
    build = {"mnist": _mnist, "cifar10": _cifar10, "imagenet": _imagenet}[cfg.name]
    try:
        return build(cfg, True), build(cfg, False)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"the {cfg.name} files under {cfg.root} are corrupt or truncated "
                          f"({type(exc).__name__}: {str(exc)[:160]})",
                          "replace them with complete copies of the data set") from None


def targets_of(dataset: Dataset) -> np.ndarray:
    """Labels of every sample without opening an image (follows Subset indices)."""
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    return np.asarray(dataset.targets, dtype=np.int64)


# --- partition -----------------------------------------------------------------------------

def _class_lists(num_classes: int, clients: int, cfg: DataConfig) -> list[list[int]]:
    """The classes of each client for "blocks" or an explicit list, checked."""
    if cfg.partition == "blocks":
        if clients > num_classes:
            raise ConfigError(f"data.partition=blocks needs at most {num_classes} clients "
                              f"({cfg.name} has {num_classes} classes), got {clients}",
                              "use fewer clients or data.partition=iid or dirichlet")
        return [block.tolist() for block in np.array_split(np.arange(num_classes), clients)]
    lists = cfg.partition
    if len(lists) != clients:
        raise ConfigError(f"data.partition lists {len(lists)} clients but there are {clients}",
                          f"give one class list per client ({clients} lists)")
    for label in (c for classes in lists for c in classes):
        if not 0 <= label < num_classes:
            raise ConfigError(f"data.partition names class {label} but {cfg.name} has "
                              f"{num_classes} classes",
                              f"use class indices 0..{num_classes - 1}")
    return lists


def _owners_by_class(targets: np.ndarray, lists: list[list[int]],
                     rng: np.random.Generator) -> np.ndarray:
    """Owner client per sample; a class listed by k clients is split evenly among them."""
    owner = np.full(len(targets), -1, dtype=np.int64)
    for label in sorted({c for classes in lists for c in classes}):
        holders = [i for i, classes in enumerate(lists) if label in classes]
        members = rng.permutation(np.flatnonzero(targets == label))
        for client, part in zip(holders, np.array_split(members, len(holders))):
            owner[part] = client
    return owner


def _owners_dirichlet(targets: np.ndarray, clients: int, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Per class, shares ~ Dirichlet(alpha); then empty clients take one sample each."""
    owner = np.empty(len(targets), dtype=np.int64)
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(members)).astype(int)[:-1]
        for client, part in enumerate(np.split(members, cuts)):
            owner[part] = client
    for client in range(clients):
        if not np.any(owner == client):
            donor = np.argmax(np.bincount(owner, minlength=clients))
            owner[np.flatnonzero(owner == donor)[0]] = client
    return owner


def partition(targets: np.ndarray, num_classes: int, clients: int, cfg: DataConfig,
              seed: int) -> list[np.ndarray]:
    """Sorted train indices of each client; the same inputs give the same split everywhere."""
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if cfg.partition == "iid":
        owner = np.empty(len(targets), dtype=np.int64)
        for client, part in enumerate(np.array_split(rng.permutation(len(targets)), clients)):
            owner[part] = client
    elif cfg.partition == "dirichlet":
        if len(targets) < clients:
            raise ConfigError(f"data.partition=dirichlet needs at least one sample per client, "
                              f"but there are {len(targets)} samples for {clients} clients",
                              "use fewer clients or more data")
        owner = _owners_dirichlet(targets, clients, cfg.dirichlet_alpha, rng)
    else:
        owner = _owners_by_class(targets, _class_lists(num_classes, clients, cfg), rng)
    return [np.flatnonzero(owner == client) for client in range(clients)]


# --- per-client data sets and loaders ------------------------------------------------------

def _client_seed(seed: int, client: int, *more: int) -> int:
    """A well-mixed 32-bit seed per (run seed, client[, more keys])."""
    return int(np.random.SeedSequence([seed, client, *more]).generate_state(1)[0])


def _cap(indices: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` indices, a seeded random choice, kept in order."""
    if limit <= 0 or len(indices) <= limit:
        return indices
    return np.sort(rng.permutation(indices)[:limit])


def client_datasets(cfg: Config, client: int, clients: int) -> tuple[Dataset, Dataset, list[int]]:
    """(train subset, test subset, classes) of client ``client`` in 1..clients.

    The classes are the labels in the client's full train shard; its test subset holds
    exactly the test samples of those classes, so it measures the classes it learns.
    """
    if not 1 <= client <= clients:
        raise ValueError(f"client {client} is not in 1..{clients}")
    train, test = _load(cfg.data)
    num_classes = spec(cfg.data).num_classes
    shards = partition(targets_of(train), num_classes, clients, cfg.data, cfg.train.seed)
    mine = shards[client - 1]
    if len(mine) == 0:
        raise ConfigError(f"client {client} gets no training samples under "
                          f"data.partition={cfg.data.partition}",
                          "use fewer clients or give every client a class with samples")
    classes = np.unique(targets_of(train)[mine])
    test_mine = np.flatnonzero(np.isin(targets_of(test), classes))
    rng = np.random.default_rng(_client_seed(cfg.train.seed, client))
    mine, test_mine = _cap(mine, cfg.data.limit, rng), _cap(test_mine, cfg.data.limit, rng)
    return (Subset(train, mine.tolist()), Subset(test, test_mine.tolist()),
            [int(c) for c in classes])


class EpochOrder(torch.utils.data.Sampler):
    """The training order of one client's shard: a permutation per epoch drawn from
    (seed, client, epoch, stream), each sample with a seed of its own for its random
    augmentation.

    An epoch's order and augmentations depend on nothing else: not on how many epochs this
    process ran before (a resumed run sees what the uninterrupted one saw), nor on the
    loader's workers (``data.workers`` changes no batch). ``start`` skips the samples of
    the steps a mid-epoch checkpoint already took. Each full pass moves to the next epoch,
    so a plain ``for batch in loader`` loop sees a new order every time.
    """

    def __init__(self, size: int, seed: int, client: int, stream: int = 0):
        self.size, self.seed, self.client, self.stream = size, seed, client, stream
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(
            _client_seed(self.seed, self.client, self.epoch, self.stream))
        order = torch.randperm(self.size, generator=g).tolist()
        seeds = torch.randint(2**62, (self.size,), generator=g).tolist()
        start, self.epoch, self.start = self.start, self.epoch + 1, 0
        yield from zip(order[start:], seeds[start:])


class Seeded(Dataset):
    """A data set indexed by (index, seed), as ``EpochOrder`` yields them: the sample's
    random transforms draw from its own seed, in a worker or in this process alike, and
    leave this process's random state as it was (training draws from it: dropout, noise)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


TRAIN_STREAM, SAMPLE_STREAM = 0, 1  # EpochOrder streams: training, BatchNorm recalibration


def client_loaders(cfg: Config, client: int,
                   clients: int) -> tuple[DataLoader, DataLoader, list[int]]:
    """Train and test loaders of one client. The train loader's ``sampler`` is an
    ``EpochOrder``: order and augmentations are a function of (seed, client, epoch)."""
    train, test, classes = client_datasets(cfg, client, clients)
    workers = cfg.data.workers
    common = dict(batch_size=cfg.train.batch_size, drop_last=False, num_workers=workers,
                  persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    order = EpochOrder(len(train), cfg.train.seed, client, TRAIN_STREAM)
    return (DataLoader(Seeded(train), sampler=order, generator=_unused(), **common),
            DataLoader(test, shuffle=False, generator=_unused(), **common), classes)


def _unused() -> torch.Generator:
    """For the loader's workers' base seed, which it would otherwise draw from the
    process's generator at every ``iter()``: nothing random depends on it any more."""
    return torch.Generator().manual_seed(0)


def sample_loader(loader: DataLoader, seed: int, client: int, epoch: int) -> DataLoader:
    """``loader``'s data in an order of its own, drawn from (seed, client, epoch): a
    sample of the training shard that leaves the training order alone."""
    order = EpochOrder(len(loader.dataset), seed, client, SAMPLE_STREAM)
    order.set_epoch(epoch)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=order,
                      generator=_unused(), num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory)
