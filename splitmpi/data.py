"""Data sets, per-client shards and loaders.

Every image comes out as a float32 tensor normalised to [-1, 1] (``Normalize(0.5, 0.5)``
per channel, synthetic data generated in that range); the attack code relies on this
range, e.g. to bound and compare reconstructions, so keep it when adding a data set.

The built-in data sets are read from files under ``data.root``, never downloaded, one entry
of ``DATASETS`` each; ``data.name=package.module:function`` is a user's own (docs/data.md).

Every rank computes the same partition from the same config, then a client keeps only its
own shard, so no indices are ever sent over MPI.
"""
from __future__ import annotations

import functools
import math
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .config import Config, DataConfig, user_function
from .errors import ConfigError

SYNTHETIC_SEED = 1234  # fixed, so every rank generates the same images whatever train.seed
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10,
                  "mnist": 10}


@dataclass(frozen=True)
class DataSpec:
    channels: int
    image_size: int
    num_classes: int


@dataclass(frozen=True)
class Builtin:
    """A data set read from files under ``data.root``: which files and where (checked before
    any work starts), what ``spec`` says without reading an image, and how to read it."""

    title: str  # its name in messages
    channels: int
    size: int  # its own image size; data.image_size resizes
    classes: Callable[[DataConfig], int]
    read: Callable[[DataConfig, bool, Callable], Dataset]  # (cfg, train, transform)
    augment: Literal["none", "crop", "crop+flip", "photo"]  # training only, see _transform
    how: str  # how the files get there, for the error naming a missing one
    folder: str = ""  # the folder of ``files`` under data.root
    files: tuple[str, ...] = ()  # {split} is data.emnist_split
    trees: tuple[str, str] = ()  # class-folder sets: their train and test folders


# --- readers -------------------------------------------------------------------------------

def _torchvision():
    """torchvision's ``datasets`` and ``transforms``, imported on first use: torchvision
    costs every rank 1.5 s of start-up and 170 MB, and the synthetic data needs none of it."""
    from torchvision import datasets, transforms
    return datasets, transforms


def _reader(reader_class: Callable[[], type]) -> Callable[[DataConfig, bool, Callable], Dataset]:
    """Reads with a torchvision-style class taking ``(root, train=, transform=)``."""
    def read(cfg: DataConfig, train: bool, transform: Callable) -> Dataset:
        return reader_class()(cfg.root, train=train, download=False, transform=transform)
    return read


def _own(name: str) -> Callable[[], type]:
    """torchvision's own ``datasets.<name>``: its idx files are checked for existence only."""
    return lambda: getattr(_torchvision()[0], name)


@functools.cache
def _cifar_files(name: str) -> type:
    """torchvision's CIFAR-10 or CIFAR-100 reader checking that files exist rather than
    their md5 sums.

    ``check_integrity(path, None)`` only tests existence, so small stand-in copies (tests,
    subsets) load through torchvision's own code. CIFAR-100 gives its 100 fine labels.
    """
    base = getattr(_torchvision()[0], name)

    class CIFARFiles(base):
        train_list = [[file, None] for file, _ in base.train_list]
        test_list = [[file, None] for file, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return CIFARFiles


class _TrainOrTest:
    """For torchvision readers that take ``split=`` and keep labels in ``.labels``:
    ``train=`` and ``.targets``, as the other readers have them."""

    def __init__(self, root, train: bool, **kwargs):
        super().__init__(root, split="train" if train else "test", **kwargs)

    @property
    def targets(self) -> np.ndarray:
        return self.labels


@functools.cache
def _svhn_files() -> type:
    """torchvision's SVHN reader checking that its file exists rather than its md5 sum,
    taking ``train=`` and giving its labels (0..9, as torchvision maps the file's 10 for
    the digit 0) as ``.targets``."""
    datasets, _ = _torchvision()

    class SVHNFiles(_TrainOrTest, datasets.SVHN):
        split_list = {split: [url, file, None]
                      for split, (url, file, _) in datasets.SVHN.split_list.items()}

    return SVHNFiles


@functools.cache
def _stl10_files() -> type:
    """torchvision's STL-10 reader for the labelled train and test splits only (the
    unlabeled 2.7 GB file is neither needed nor checked), files checked for existence
    rather than md5 sums, taking ``train=`` and giving ``.targets`` (0..9)."""
    datasets, _ = _torchvision()

    class STL10Files(_TrainOrTest, datasets.STL10):
        train_list = [[file, None] for file, _ in datasets.STL10.train_list[:2]]
        test_list = [[file, None] for file, _ in datasets.STL10.test_list]

    return STL10Files


@functools.cache
def _emnist_files() -> type:
    """torchvision's EMNIST reader, ``letters`` labelled 0..25: torchvision gives them
    1..26 with an empty class 0, which would leave a "blocks" client without samples."""
    datasets, _ = _torchvision()

    class EMNISTFiles(datasets.EMNIST):
        @property
        def raw_folder(self) -> str:  # torchvision names it after the class
            return os.path.join(self.root, "EMNIST", "raw")

        def __init__(self, root, split: str, **kwargs):
            super().__init__(root, split, **kwargs)
            if split == "letters":
                self.targets = self.targets - 1
                self.classes = self.classes[1:]

    return EMNISTFiles


def _read_emnist(cfg: DataConfig, train: bool, transform: Callable) -> Dataset:
    return _emnist_files()(cfg.root, cfg.emnist_split, train=train, download=False,
                           transform=transform)


def _read_tree(cfg: DataConfig, train: bool, transform: Callable) -> Dataset:
    """ImageFolder over the train or test class folders (imagenet, folder); every image is
    converted to RGB."""
    datasets, _ = _torchvision()
    entry = DATASETS[cfg.name]
    folder = Path(cfg.root) / entry.trees[0 if train else 1]
    try:
        return datasets.ImageFolder(folder, transform=transform)
    except FileNotFoundError as exc:  # e.g. a class folder without images
        raise ConfigError(f"{entry.title} folder {folder}: {exc}",
                          "put at least one image in every class folder") from None


def _fixed(count: int) -> Callable[[DataConfig], int]:
    return lambda cfg: count


def _tree_classes(cfg: DataConfig) -> int:
    return len(_class_folders(cfg, DATASETS[cfg.name].trees[0]))


def _idx_set(title: str, reader: str) -> Builtin:
    """A 28 px grey set in MNIST's four idx files, read by torchvision's class ``reader``
    from root/<reader>/raw/ (torchvision names the folder after the class)."""
    return Builtin(title, 1, 28, _fixed(10), _reader(_own(reader)), "none",
                   f"put the uncompressed {title} idx files under {{folder}}/",
                   f"{reader}/raw", MNIST_FILES)


DATASETS: dict[str, Builtin] = {
    "mnist": _idx_set("MNIST", "MNIST"),
    "fashionmnist": _idx_set("Fashion-MNIST", "FashionMNIST"),
    "kmnist": _idx_set("KMNIST", "KMNIST"),
    "emnist": Builtin(
        "EMNIST", 1, 28, lambda cfg: EMNIST_CLASSES[cfg.emnist_split], _read_emnist, "none",
        "unzip EMNIST's gzip.zip and gunzip its emnist-{split}-* files into {folder}/",
        "EMNIST/raw", tuple(f"emnist-{{split}}-{part}" for part in (
            "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
            "test-images-idx3-ubyte", "test-labels-idx1-ubyte"))),
    "cifar10": Builtin(
        "CIFAR-10", 3, 32, _fixed(10), _reader(lambda: _cifar_files("CIFAR10")), "crop+flip",
        "unpack cifar-10-python.tar.gz into {root}/ so that {folder}/ exists",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")),
    "cifar100": Builtin(
        "CIFAR-100", 3, 32, _fixed(100), _reader(lambda: _cifar_files("CIFAR100")),
        "crop+flip", "unpack cifar-100-python.tar.gz into {root}/ so that {folder}/ exists",
        "cifar-100-python", ("train", "test", "meta")),
    "svhn": Builtin(  # digits: a flip would make another digit
        "SVHN", 3, 32, _fixed(10), _reader(_svhn_files), "crop",
        "put SVHN's cropped digits, train_32x32.mat and test_32x32.mat, in {folder}/",
        "", ("train_32x32.mat", "test_32x32.mat")),
    "stl10": Builtin(
        "STL-10", 3, 96, _fixed(10), _reader(_stl10_files), "crop+flip",
        "unpack stl10_binary.tar.gz into {root}/ so that {folder}/ exists",
        "stl10_binary", ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")),
    "imagenet": Builtin(
        "ImageNet", 3, 224, _tree_classes, _read_tree, "photo",
        "put one folder per class (e.g. n01440764/) under {root}/train/ and {root}/val/",
        trees=("train", "val")),
    "folder": Builtin(
        "Image", 3, 224, _tree_classes, _read_tree, "photo",
        "put one folder of images per class (e.g. cat/, dog/) under {root}/train/ and "
        "{root}/test/", trees=("train", "test")),
}
DEFAULT_SIZE = {"synthetic": 32} | {name: entry.size for name, entry in DATASETS.items()}


def spec(cfg: DataConfig) -> DataSpec:
    """Shape of the images and number of classes, known before any image is read (a
    user's data set: from its first training item and its labels)."""
    if cfg.name == "synthetic":
        return DataSpec(cfg.channels, _image_size(cfg), cfg.num_classes)
    if ":" in cfg.name:
        return _user_spec(cfg)
    entry = DATASETS[cfg.name]
    return DataSpec(entry.channels, _image_size(cfg), entry.classes(cfg))


def _image_size(cfg: DataConfig) -> int:
    return cfg.image_size or DEFAULT_SIZE[cfg.name]


# --- files on disk -------------------------------------------------------------------------

def _missing(kind: str, path: Path, fix: str) -> ConfigError:
    return ConfigError(f"{kind} {path} not found", fix)


def _fix(cfg: DataConfig, entry: Builtin) -> str:
    root = Path(cfg.root)
    how = entry.how.format(root=root, folder=root / entry.folder, split=cfg.emnist_split)
    return f"{how} (data.root={cfg.root}) or set data.root"


def _class_folders(cfg: DataConfig, tree: str) -> list[str]:
    """Class folder names as ImageFolder sees them (sorted sub-directories)."""
    entry = DATASETS[cfg.name]
    folder = Path(cfg.root) / tree
    if not folder.is_dir():
        raise _missing(f"{entry.title} folder", folder, _fix(cfg, entry))
    classes = sorted(item.name for item in os.scandir(folder) if item.is_dir())
    if not classes:
        raise ConfigError(f"{entry.title} folder {folder} holds no class folders",
                          _fix(cfg, entry))
    return classes


def check_available(cfg: DataConfig) -> None:
    """Fail before any work starts, naming the first missing file and where it belongs (a
    user's data set: building and checking it, once per process)."""
    if cfg.name == "synthetic":
        return
    if ":" in cfg.name:
        _user_spec(cfg)
        return
    entry = DATASETS[cfg.name]
    if entry.trees:
        _check_trees(cfg, entry)
    folder = Path(cfg.root) / entry.folder
    for name in entry.files:
        path = folder / name.format(split=cfg.emnist_split)
        if not path.is_file():
            raise _missing(f"{entry.title} file", path, _fix(cfg, entry))


def _check_trees(cfg: DataConfig, entry: Builtin) -> None:
    """Train and test hold the same class folders, so a label means one class in both."""
    train, test = (_class_folders(cfg, tree) for tree in entry.trees)
    if train != test:
        root, (train_tree, test_tree) = Path(cfg.root), entry.trees
        only = sorted(set(train) ^ set(test))
        raise ConfigError(f"{entry.title} class folders differ between {root}/{train_tree} "
                          f"and {root}/{test_tree} (e.g. {', '.join(only[:3])})",
                          f"give {test_tree}/ the same class folders as {train_tree}/, each "
                          "with at least one image")


# --- a user's data sets --------------------------------------------------------------------

ITEMS = ("(train, test): two data sets (len() and [i]) whose items are (image, label), the "
         "image a float tensor (channels, size, size) in [-1, 1], the label an int")


class UserData(NamedTuple):
    train: Dataset
    test: Dataset
    spec: DataSpec


class Labelled(Dataset):
    """A user's data set with its labels read once, as ``.targets``: the partition reads
    them without opening an image, and every item's label is that int."""

    def __init__(self, dataset: Dataset, targets: np.ndarray):
        self.dataset = dataset
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[index][0], int(self.targets[index])


def _user_spec(cfg: DataConfig) -> DataSpec:
    shape = _user_data(cfg.name, cfg.root).spec
    if cfg.image_size and cfg.image_size != shape.image_size:
        raise ConfigError(f"data.image_size={cfg.image_size} but {cfg.name} gives "
                          f"{shape.image_size} px images",
                          "leave data.image_size at 0 (your function sizes its images) or "
                          "resize them in your function")
    return shape


@functools.cache
def _user_data(name: str, root: str) -> UserData:
    """``package.module:function`` called with data.root, once per process (``spec`` and
    ``_load`` share it), checked, labels read once.

    torch's random state is left as it was: the function and reading labels item by item
    may draw from it (random transforms), and ranks call this at different moments.
    """
    function = user_function("data.name", name, "(root)")
    with torch.random.fork_rng(devices=[]):
        result = function(root)
        if not (isinstance(result, (tuple, list)) and len(result) == 2
                and all(hasattr(d, "__len__") and hasattr(d, "__getitem__") for d in result)):
            raise ConfigError(f"data.name={name}: {name.partition(':')[2]}({root!r}) "
                              f"returned {_describe(result)}", f"return {ITEMS}")
        train, test = (_labelled(name, d, which) for d, which in zip(result, ("train", "test")))
        shape, test_shape = _image_shape(name, train, "train"), _image_shape(name, test, "test")
    if test_shape != shape:
        raise ConfigError(f"data.name={name}: train images are (channels, size) {shape} but "
                          f"test images {test_shape}",
                          "give train and test images the same channels and size")
    classes = int(max(train.targets.max(), test.targets.max())) + 1
    return UserData(train, test, DataSpec(shape[0], shape[1], classes))


def _describe(value: object) -> str:
    """A value's type as an error names it: tensors with their dtype and shape, tuples with
    their members' types."""
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return (f"a {type(value).__name__} of {len(value)} "
                f"({', '.join(type(v).__name__ for v in value[:4])})")
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _item(name: str, dataset: Dataset, index: int, which: str) -> tuple:
    item = dataset[index]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ConfigError(f"data.name={name}: item {index} of the {which} data set is "
                          f"{_describe(item)}", f"return {ITEMS}")
    return item


def _labelled(name: str, dataset: Dataset, which: str) -> Labelled:
    """``dataset`` with its labels as an int64 array: its ``.targets``, else each item's."""
    if len(dataset) == 0:
        raise ConfigError(f"data.name={name}: the {which} data set is empty",
                          "return at least one sample in each of train and test")
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [_item(name, dataset, i, which)[1] for i in range(len(dataset))]
        targets = [t.item() if torch.is_tensor(t) else t for t in targets]
    try:
        labels = np.asarray(targets)
    except ValueError:  # ragged
        labels = np.asarray(targets, dtype=object)
    if labels.shape != (len(dataset),) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"data.name={name}: the {which} labels are not one int per sample "
                          f"(found {labels.dtype} of shape {labels.shape} for {len(dataset)} "
                          "samples)", "label the classes 0, 1, 2, ... with ints")
    if labels.min() < 0:
        raise ConfigError(f"data.name={name}: the {which} labels include {labels.min()}",
                          "label the classes 0, 1, 2, ... with ints")
    return Labelled(dataset, labels.astype(np.int64))


def _image_shape(name: str, dataset: Labelled, which: str) -> tuple[int, int]:
    """(channels, size) of the first image, which must be a square float tensor in [-1, 1]."""
    image = _item(name, dataset.dataset, 0, which)[0]
    if not (torch.is_tensor(image) and image.is_floating_point() and image.dim() == 3
            and image.shape[1] == image.shape[2]):
        raise ConfigError(f"data.name={name}: the first {which} image is {_describe(image)}",
                          "give each image as a float tensor (channels, size, size), e.g. "
                          "through transforms.ToTensor() after a square resize or crop")
    low, high = image.min().item(), image.max().item()
    if low < -1 - 1e-6 or high > 1 + 1e-6:
        raise ConfigError(f"data.name={name}: the first {which} image has values in "
                          f"[{low:.3g}, {high:.3g}], not in [-1, 1]",
                          "normalise to [-1, 1], e.g. transforms.Normalize([0.5] * channels, "
                          "[0.5] * channels) after transforms.ToTensor()")
    return image.shape[0], image.shape[1]


# --- transforms and full data sets ---------------------------------------------------------

def _normalise(channels: int) -> list:
    _, transforms = _torchvision()
    return [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]


def _transform(cfg: DataConfig, entry: Builtin, train: bool) -> Callable:
    """Resize to data.image_size where set, the data set's own augmentation when training,
    then [-1, 1]. Fixed-size sets crop at a padded random offset (``crop``) and flip (not
    digits); photos (``photo``) take ImageNet's random resized crops, and a centre crop to
    test."""
    _, transforms = _torchvision()
    size = _image_size(cfg)
    if entry.augment == "photo":
        steps = ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
                 if train else
                 [transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size)])
    else:
        steps = [transforms.Resize(size)] if size != entry.size else []
        if train and entry.augment != "none":
            steps.append(transforms.RandomCrop(size, padding=size // 8))
        if train and entry.augment == "crop+flip":
            steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + _normalise(entry.channels))


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
    if ":" in cfg.name:
        user = _user_data(cfg.name, cfg.root)
        return user.train, user.test
    entry = DATASETS[cfg.name]
    try:
        return (entry.read(cfg, True, _transform(cfg, entry, True)),
                entry.read(cfg, False, _transform(cfg, entry, False)))
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
    """Per class, shares ~ Dirichlet(alpha); then empty clients take one sample each, from
    the client that holds the most at that moment."""
    owner = np.empty(len(targets), dtype=np.int64)
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(members)).astype(int)[:-1]
        for client, part in enumerate(np.split(members, cuts)):
            owner[part] = client
    held = np.bincount(owner, minlength=clients)
    for client in np.flatnonzero(held == 0):
        donor = int(np.argmax(held))
        owner[np.flatnonzero(owner == donor)[0]] = client
        held[donor] -= 1
        held[client] += 1
    return owner


def _owners_shards(targets: np.ndarray, clients: int, per_client: int,
                   rng: np.random.Generator) -> np.ndarray:
    """The samples sorted by label (a stable sort, so by index within a label) and cut
    into ``clients * per_client`` shards of equal size (to one sample); each client gets
    ``per_client`` of them, drawn at random."""
    order = np.argsort(targets, kind="stable")
    shards = np.array_split(order, clients * per_client)
    owner = np.empty(len(targets), dtype=np.int64)
    for shard, client in zip(shards, rng.permutation(clients * per_client) // per_client):
        owner[shard] = client
    return owner


def partition(targets: np.ndarray, num_classes: int, clients: int, cfg: DataConfig,
              seed: int) -> list[np.ndarray]:
    """Sorted train indices of each client; the same inputs give the same split everywhere.
    Any client left without samples is a ConfigError naming the fix."""
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
    elif cfg.partition == "shards":
        owner = _owners_shards(targets, clients, cfg.shards_per_client, rng)
    else:
        owner = _owners_by_class(targets, _class_lists(num_classes, clients, cfg), rng)
    held = np.bincount(owner[owner >= 0], minlength=clients)
    if not held.all():
        empty = np.flatnonzero(held == 0) + 1
        raise ConfigError(f"data.partition={_describe_partition(cfg)} leaves "
                          f"{len(empty)} of {clients} clients without training samples "
                          f"(client {', '.join(map(str, empty[:5]))}"
                          f"{', ...' if len(empty) > 5 else ''}; {len(targets)} samples)",
                          "use fewer clients (clients.count), more data"
                          + (", or fewer data.shards_per_client" if cfg.partition == "shards"
                             else "") + ", or another data.partition (iid, dirichlet)")
    # each client's indices, sorted: one stable sort by owner, cut by the counts
    order = np.argsort(owner, kind="stable")
    return np.split(order[owner[order] >= 0], np.cumsum(held)[:-1])


def _describe_partition(cfg: DataConfig) -> str:
    part = cfg.partition
    return f"{part} ({cfg.shards_per_client} per client)" if part == "shards" else (
        part if isinstance(part, str) else "[class lists]")


# --- per-client data sets and loaders ------------------------------------------------------

def _client_seed(seed: int, client: int, *more: int) -> int:
    """A well-mixed 32-bit seed per (run seed, client[, more keys])."""
    return int(np.random.SeedSequence([seed, client, *more]).generate_state(1)[0])


def _cap(indices: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` indices, a seeded random choice, kept in order."""
    if limit <= 0 or len(indices) <= limit:
        return indices
    return np.sort(rng.permutation(indices)[:limit])


class Shards:
    """The data of the clients one rank hosts (``ids``, of ``clients`` in all): the data
    sets are loaded and the partition computed once, and each client's subsets and
    loaders are made when asked for, so a rank hosting thousands of clients keeps only
    their train indices.

    A client's classes are the labels in its full train shard; its test subset holds
    exactly the test samples of those classes, so it measures the classes it learns.
    ``data.limit`` (and ``data.test_limit`` for the test subset) cap both with a seeded
    choice of the client's own."""

    def __init__(self, cfg: Config, ids: Iterable[int], clients: int):
        self.cfg = cfg
        self.train, self.test = _load(cfg.data)
        targets = targets_of(self.train)
        self.test_targets = targets_of(self.test)
        self.targets = targets
        shards = partition(targets, spec(cfg.data).num_classes, clients, cfg.data,
                           cfg.train.seed)
        self.full = {}
        for k in ids:
            if not 1 <= k <= clients:
                raise ValueError(f"client {k} is not in 1..{clients}")
            self.full[k] = shards[k - 1]
        self.classes = {k: [int(c) for c in np.unique(targets[mine])]
                        for k, mine in self.full.items()}

    def indices(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Client k's train and test indices, capped."""
        mine = self.full[k]
        test_mine = np.flatnonzero(np.isin(self.test_targets, self.classes[k]))
        rng = np.random.default_rng(_client_seed(self.cfg.train.seed, k))
        limits = self.cfg.data
        return (_cap(mine, limits.limit, rng),
                _cap(test_mine, limits.test_limit or limits.limit, rng))

    def samples(self, k: int) -> int:
        """Client k's training samples (after ``data.limit``)."""
        n = len(self.full[k])
        return min(n, self.cfg.data.limit) if self.cfg.data.limit > 0 else n

    def datasets(self, k: int) -> tuple[Dataset, Dataset, list[int]]:
        """(train subset, test subset, classes) of client k."""
        mine, test_mine = self.indices(k)
        return (Subset(self.train, mine.tolist()), Subset(self.test, test_mine.tolist()),
                self.classes[k])

    def trained_labels(self, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``defense.label_epsilon``: (labels trained on, true labels) of client k's train
        subset, in its order; None when it is off. Randomized response is drawn once per
        sample from (seed, client, LABEL_STREAM), never from torch's generators, so every
        epoch (and a resumed run) trains on the same noisy label and everything the client
        sends is post-processing of it (docs/privacy.md, "The label defense")."""
        if self.cfg.defense.label_epsilon <= 0:
            return None
        mine = self.indices(k)[0]
        return self._randomised(k, mine), self.targets[mine]

    def _randomised(self, k: int, mine: np.ndarray) -> np.ndarray:
        """The labels client k trains on, of its train samples ``mine`` (its capped train
        indices, in order): ``trained_labels``'s draw, for a caller that has ``mine``."""
        rng = np.random.default_rng(_client_seed(self.cfg.train.seed, k, 0, LABEL_STREAM))
        return randomised_response(self.targets[mine], spec(self.cfg.data).num_classes,
                                   self.cfg.defense.label_epsilon, rng)

    def loaders(self, k: int) -> tuple[DataLoader, DataLoader, list[int]]:
        """Train and test loaders of client k. The train loader's ``sampler`` is an
        ``EpochOrder``: order and augmentations are a function of (seed, client, epoch).
        Under ``defense.label_epsilon`` its items are (image, trained label, true label)
        (``Randomised``); the test loader's labels are always the true ones."""
        train, test, classes = self.datasets(k)
        if self.cfg.defense.label_epsilon > 0:  # (its indices, not indices(k) once more)
            train = Randomised(train, self._randomised(k, np.asarray(train.indices)))
        cfg = self.cfg
        workers = cfg.data.workers
        common = dict(batch_size=cfg.train.batch_size, drop_last=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
        order = EpochOrder(len(train), cfg.train.seed, k, TRAIN_STREAM)
        return (DataLoader(Seeded(train), sampler=order, generator=_unused(), **common),
                DataLoader(test, shuffle=False, generator=_unused(), **common), classes)


def client_datasets(cfg: Config, client: int, clients: int) -> tuple[Dataset, Dataset, list[int]]:
    """(train subset, test subset, classes) of client ``client`` in 1..clients
    (``Shards.datasets``)."""
    return Shards(cfg, [client], clients).datasets(client)


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


# EpochOrder streams (key (seed, client, epoch, stream)): training, BatchNorm
# recalibration; and the key (seed, client, 0, LABEL_STREAM) of the labels' randomized
# response, a stream no EpochOrder draws from (SeedSequence pads keys with zeros, so every
# key is given all four words)
TRAIN_STREAM, SAMPLE_STREAM, LABEL_STREAM = 0, 1, 2


def randomised_response(labels: np.ndarray, num_classes: int, epsilon: float,
                        rng: np.random.Generator) -> np.ndarray:
    """K-ary randomized response (Warner 1965; Ghazi et al. 2021): each label kept with
    probability e^epsilon / (e^epsilon + K - 1), else replaced by one of the other K - 1
    classes uniformly. Every output label is then epsilon-label-DP for its input label
    (any two inputs give any output with probabilities within a factor e^epsilon). K is
    the task's whole label domain, not a client's classes, so the guarantee is the
    standard one."""
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes < 2:
        return labels.copy()
    keep = 1 / (1 + (num_classes - 1) * math.exp(-epsilon))  # e^eps / (e^eps + K - 1)
    kept = rng.random(len(labels)) < keep
    shift = rng.integers(1, num_classes, len(labels))  # 1..K-1: never the label itself
    return np.where(kept, labels, (labels + shift) % num_classes)


class Randomised(Dataset):
    """A train subset whose items are (image, trained label, true label): the client
    trains on the randomized-response label and keeps the true one only to score the
    label-inference attacks against it (``attack.labels``); the true one is never sent."""

    def __init__(self, dataset: Dataset, trained: np.ndarray):
        self.dataset = dataset
        self.targets = trained

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        x, y = self.dataset[index]
        return x, int(self.targets[index]), int(y)


def client_loaders(cfg: Config, client: int,
                   clients: int) -> tuple[DataLoader, DataLoader, list[int]]:
    """Train and test loaders of one client (``Shards.loaders``)."""
    return Shards(cfg, [client], clients).loaders(client)


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
