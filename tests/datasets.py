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


def write_mnist(root, train_per_class: int = 10, test_per_class: int = 4,
                seed: int = 0) -> Written:
    """The four idx files torchvision's MNIST reads, under root/MNIST/raw/."""
    written = _split(10, train_per_class, test_per_class, 28, 1, seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (("train", written.train_images, written.train_labels),
                                  ("t10k", written.test_images, written.test_labels)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
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


def write_imagefolder(root, classes: int = 4, train_per_class: int = 3, val_per_class: int = 2,
                      size: int = 64, seed: int = 0) -> Written:
    """ImageNet-style JPEGs: root/{train,val}/n0000000k/*.JPEG, one folder per class.

    The returned images are those before JPEG compression.
    """
    written = _split(classes, train_per_class, val_per_class, size, 3, seed)
    for split, images, labels in (("train", written.train_images, written.train_labels),
                                  ("val", written.test_images, written.test_labels)):
        for i, (image, label) in enumerate(zip(images, labels)):
            wnid = f"n{label:08d}"
            folder = Path(root) / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{i:08d}.JPEG"
            Image.fromarray(image).save(folder / name, "JPEG", quality=95)
    return written
