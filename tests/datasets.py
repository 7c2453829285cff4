"""Tiny data sets in the real on-disk formats, so tests read them the way users' files are read.

Each image shows a bright class-dependent square (and, in colour, a class-dependent tint)
on a noisy dark background, so a model can learn something from a few samples.
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


class Written(NamedTuple):
    """What was written: uint8 images (N,H,W or N,H,W,3) and int64 labels, in file order."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def class_images(labels: np.ndarray, size: int, channels: int,
                 rng: np.random.Generator) -> np.ndarray:
    """uint8 images (N,H,W[,C]) whose bright square's position (and tint) depend on the label."""
    images = rng.integers(0, 60, (len(labels), size, size, channels), dtype=np.uint8)
    side = max(2, size // 4)
    for image, label in zip(images, labels):
        cell = label % 16
        row, col = (cell // 4) * (size - side) // 3, (cell % 4) * (size - side) // 3
        image[row:row + side, col:col + side] = 160 + 95 * (np.arange(channels) == label % channels)
    return images[..., 0] if channels == 1 else images


def _labels(classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced labels in shuffled order, like real data files."""
    return rng.permutation(np.repeat(np.arange(classes), per_class)).astype(np.int64)


def _split(classes: int, train_per_class: int, test_per_class: int, size: int,
           channels: int, seed: int) -> Written:
    rng = np.random.default_rng(seed)
    train = _labels(classes, train_per_class, rng)
    test = _labels(classes, test_per_class, rng)
    return Written(class_images(train, size, channels, rng), train,
                   class_images(test, size, channels, rng), test)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed big-endian idx file of uint8 (magic 2051 for images, 2049 labels)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_idx_pair(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
    _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def write_mnist(root, train_per_class: int = 10, test_per_class: int = 4, seed: int = 0,
                folder: str = "MNIST") -> Written:
    """The four idx files torchvision's MNIST reads, under root/MNIST/raw/ (or the folder of
    another set in MNIST's format)."""
    written = _split(10, train_per_class, test_per_class, 28, 1, seed)
    raw = Path(root) / folder / "raw"
    _write_idx_pair(raw, "train", written.train_images, written.train_labels)
    _write_idx_pair(raw, "t10k", written.test_images, written.test_labels)
    return written


def write_fashionmnist(root, train_per_class: int = 3, test_per_class: int = 2,
                       seed: int = 0) -> Written:
    """Fashion-MNIST: MNIST's idx files under root/FashionMNIST/raw/."""
    return write_mnist(root, train_per_class, test_per_class, seed, folder="FashionMNIST")


def write_kmnist(root, train_per_class: int = 3, test_per_class: int = 2,
                 seed: int = 0) -> Written:
    """Kuzushiji-MNIST: MNIST's idx files under root/KMNIST/raw/."""
    return write_mnist(root, train_per_class, test_per_class, seed, folder="KMNIST")


EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10,
                  "mnist": 10}


def write_emnist(root, split: str = "balanced", train_per_class: int = 2,
                 test_per_class: int = 1, seed: int = 0) -> Written:
    """One EMNIST split's idx files, root/EMNIST/raw/emnist-<split>-{train,test}-*, as
    unzipped from gzip.zip. ``letters`` files label the letters 1..26, as the real ones do;
    the returned labels are those in the files."""
    written = _split(EMNIST_CLASSES[split], train_per_class, test_per_class, 28, 1, seed)
    if split == "letters":
        written = written._replace(train_labels=written.train_labels + 1,
                                   test_labels=written.test_labels + 1)
    raw = Path(root) / "EMNIST" / "raw"
    _write_idx_pair(raw, f"emnist-{split}-train", written.train_images, written.train_labels)
    _write_idx_pair(raw, f"emnist-{split}-test", written.test_images, written.test_labels)
    return written


def _pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_cifar10(root, train_per_class: int = 10, test_per_class: int = 4,
                  seed: int = 0) -> Written:
    """cifar-10-batches-py/ as in the python tarball: five train batches, a test batch, meta.

    Rows are 3072 bytes, the red, green and blue 32x32 planes in turn. Keys are ``str``, as
    the original Python 2 pickles read with ``encoding="latin1"`` (what torchvision does).
    """
    written = _split(10, train_per_class, test_per_class, 32, 3, seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i + 1}", images, labels) for i, (images, labels) in enumerate(
        zip(np.array_split(written.train_images, 5), np.array_split(written.train_labels, 5)))]
    batches.append(("test_batch", written.test_images, written.test_labels))
    for name, images, labels in batches:
        _pickle(folder / name, {
            "batch_label": name, "labels": [int(x) for x in labels],
            "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
            "filenames": [f"{name}_{i}.png" for i in range(len(images))]})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES,
                                      "num_cases_per_batch": len(batches[0][2]),
                                      "num_vis": 3072})
    return written


def write_cifar100(root, train_per_class: int = 2, test_per_class: int = 1,
                   seed: int = 0) -> Written:
    """cifar-100-python/ as in the python tarball: train, test and meta pickles, 100 fine
    labels in 20 coarse ones (five each), rows laid out as in CIFAR-10."""
    written = _split(100, train_per_class, test_per_class, 32, 3, seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, images, labels in (("train", written.train_images, written.train_labels),
                                 ("test", written.test_images, written.test_labels)):
        _pickle(folder / name, {
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": [int(x) for x in labels],
            "coarse_labels": [int(x) // 5 for x in labels],
            "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
            "filenames": [f"{name}_{i}.png" for i in range(len(images))]})
    _pickle(folder / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)],
                              "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return written


def write_svhn(root, train_per_class: int = 3, test_per_class: int = 2,
               seed: int = 0) -> Written:
    """SVHN's cropped digits: root/{train,test}_32x32.mat, MATLAB files holding X (32, 32,
    3, N) uint8 and y (N, 1) with the digit 0 labelled 10. The returned labels are 0..9."""
    from scipy.io import savemat
    written = _split(10, train_per_class, test_per_class, 32, 3, seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    for split, images, labels in (("train", written.train_images, written.train_labels),
                                  ("test", written.test_images, written.test_labels)):
        savemat(Path(root) / f"{split}_32x32.mat",
                {"X": images.transpose(1, 2, 3, 0),
                 "y": np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]})
    return written


def write_stl10(root, train_per_class: int = 2, test_per_class: int = 1,
                seed: int = 0) -> Written:
    """stl10_binary/ as in the tarball, less the unlabeled split: {train,test}_X.bin hold
    96x96 images as raw uint8 in column-major order (each channel's columns in turn),
    {train,test}_y.bin one byte per image, the labels 1..10. The returned labels are 0..9."""
    written = _split(10, train_per_class, test_per_class, 96, 3, seed)
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (("train", written.train_images, written.train_labels),
                                  ("test", written.test_images, written.test_labels)):
        (folder / f"{split}_X.bin").write_bytes(
            np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    return written


def write_imagefolder(root, classes: int = 4, train_per_class: int = 3, val_per_class: int = 2,
                      size: int = 64, seed: int = 0, test_folder: str = "val") -> Written:
    """ImageNet-style JPEGs: root/{train,val}/n0000000k/*.JPEG, one folder per class
    (``test_folder="test"``: the layout of data.name=folder).

    The returned images are those before JPEG compression.
    """
    written = _split(classes, train_per_class, val_per_class, size, 3, seed)
    for split, images, labels in (("train", written.train_images, written.train_labels),
                                  (test_folder, written.test_images, written.test_labels)):
        for i, (image, label) in enumerate(zip(images, labels)):
            wnid = f"n{label:08d}"
            folder = Path(root) / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{i:08d}.JPEG"
            Image.fromarray(image).save(folder / name, "JPEG", quality=95)
    return written
