"""Data: the real file formats through the users' path, partitions, per-client test sets,
the synthetic set, a user's own data sets, and reproducible batch order."""
import functools
import itertools
import textwrap

import numpy as np
import pytest
import torch

from datasets import (
    write_cifar10,
    write_cifar100,
    write_emnist,
    write_fashionmnist,
    write_imagefolder,
    write_kmnist,
    write_mnist,
    write_stl10,
    write_svhn,
)
from splitmpi import data
from splitmpi.config import Config, DataConfig
from splitmpi.errors import ConfigError


def make_cfg(name="synthetic", root="data", **data_values) -> Config:
    cfg = Config()
    cfg.data.name, cfg.data.root = name, str(root)
    for key, value in data_values.items():
        setattr(cfg.data, key, value)
    cfg.train.batch_size = 8
    return cfg


def everything(loader):
    """All (images, labels) of one pass, concatenated."""
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def assert_normalised(x, channels, size):
    assert x.dtype == torch.float32 and x.shape[1:] == (channels, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() < -0.5 and x.max() > 0.5  # uses the range, not a sliver of it


# --- real formats through client_loaders ---------------------------------------------------

def test_mnist_idx_files(tmp_path):
    written = write_mnist(tmp_path)
    train, test, classes = data.client_loaders(make_cfg("mnist", tmp_path), 1, 3)
    assert classes == [0, 1, 2, 3]
    x, y = everything(train)
    assert_normalised(x, 1, 28)
    assert sorted(y.tolist()) == sorted(np.repeat(classes, 10).tolist())
    xt, yt = everything(test)
    mine = np.isin(written.test_labels, classes)
    assert yt.tolist() == written.test_labels[mine].tolist()
    expected = torch.from_numpy(written.test_images[mine]).float() / 255 * 2 - 1
    torch.testing.assert_close(xt[:, 0], expected)


@pytest.mark.parametrize("name, writer, channels", [("mnist", write_mnist, 1),
                                                    ("stl10", write_stl10, 3)])
def test_resized_to_the_image_size(tmp_path, name, writer, channels):
    """28 px MNIST up and 96 px STL-10 down to data.image_size."""
    writer(tmp_path)
    cfg = make_cfg(name, tmp_path, image_size=32)
    assert data.spec(cfg.data) == data.DataSpec(channels, 32, 10)
    x, _ = next(iter(data.client_loaders(cfg, 1, 1)[0]))
    assert_normalised(x, channels, 32)


def test_cifar10_batches(tmp_path):
    written = write_cifar10(tmp_path)
    train, test, classes = data.client_loaders(make_cfg("cifar10", tmp_path), 2, 3)
    assert classes == [4, 5, 6]
    x, y = everything(train)
    assert_normalised(x, 3, 32)
    assert set(y.tolist()) == {4, 5, 6} and len(y) == 30
    xt, yt = everything(test)  # no augmentation: exactly the stored pixels
    mine = np.isin(written.test_labels, classes)
    assert yt.tolist() == written.test_labels[mine].tolist()
    expected = torch.from_numpy(written.test_images[mine]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(xt, expected * 2 - 1)


def test_imagenet_folders(tmp_path):
    write_imagefolder(tmp_path, classes=4)
    cfg = make_cfg("imagenet", tmp_path, image_size=32)
    assert data.spec(cfg.data) == data.DataSpec(3, 32, 4)
    train, test, classes = data.client_loaders(cfg, 2, 2)
    assert classes == [2, 3]
    x, y = everything(train)
    assert_normalised(x, 3, 32)
    assert sorted(y.tolist()) == [2, 2, 2, 3, 3, 3]
    xt, yt = everything(test)
    assert_normalised(xt, 3, 32)
    assert sorted(yt.tolist()) == [2, 2, 3, 3]


# Every built-in format: its writer, data.* settings, and its spec.
FORMATS = {
    "mnist": (write_mnist, {}, (1, 28, 10)),
    "fashionmnist": (write_fashionmnist, {}, (1, 28, 10)),
    "kmnist": (write_kmnist, {}, (1, 28, 10)),
    "emnist": (write_emnist, {}, (1, 28, 47)),
    "cifar10": (write_cifar10, {}, (3, 32, 10)),
    "cifar100": (write_cifar100, {}, (3, 32, 100)),
    "svhn": (write_svhn, {}, (3, 32, 10)),
    "stl10": (write_stl10, {}, (3, 96, 10)),
    "imagenet": (write_imagefolder, {"image_size": 32}, (3, 32, 4)),
    "folder": (functools.partial(write_imagefolder, test_folder="test"), {"image_size": 24},
               (3, 24, 4)),
}


def as_tensors(images: np.ndarray) -> torch.Tensor:
    """Written uint8 images (N,H,W[,C]) as the [-1, 1] tensors (N,C,H,W) they should read as."""
    x = torch.from_numpy(images).float() / 255 * 2 - 1
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_what_was_written(tmp_path, name):
    """Spec, sample counts, labels in file order (class folders: as a multiset), the test
    images pixel for pixel (class folders, JPEG: shape and range), and a "blocks" split
    that gives each of 3 clients its classes' samples and only those in its test set."""
    writer, settings, shape = FORMATS[name]
    written = writer(tmp_path)
    cfg = make_cfg(name, tmp_path, **settings)
    assert data.spec(cfg.data) == data.DataSpec(*shape)
    train, test = data._load(cfg.data)
    channels, size, _ = shape
    for dataset, labels in ((train, written.train_labels), (test, written.test_labels)):
        if data.DATASETS[name].trees:
            assert sorted(data.targets_of(dataset).tolist()) == sorted(labels.tolist())
        else:
            assert data.targets_of(dataset).tolist() == labels.tolist()
    assert_normalised(torch.stack([train[i][0] for i in range(len(train))]), channels, size)
    xt = torch.stack([test[i][0] for i in range(len(test))])
    assert_normalised(xt, channels, size)
    if not data.DATASETS[name].trees:
        torch.testing.assert_close(xt, as_tensors(written.test_images))
    for client in (1, 2, 3):
        mine, mine_test, classes = data.client_datasets(cfg, client, 3)
        assert len(mine) > 0 and set(data.targets_of(mine_test).tolist()) == set(classes)


def test_emnist_letters_are_labelled_from_0(tmp_path):
    """torchvision reads the letters as 1..26 with an empty class 0; here they are 0..25,
    so "blocks" gives every client letters."""
    written = write_emnist(tmp_path, split="letters")
    cfg = make_cfg("emnist", tmp_path, emnist_split="letters")
    assert data.spec(cfg.data) == data.DataSpec(1, 28, 26)
    train, test, classes = data.client_datasets(cfg, 1, 26)
    assert classes == [0] and len(train) == 2
    assert data.targets_of(train.dataset).tolist() == (written.train_labels - 1).tolist()
    assert data.targets_of(test.dataset).tolist() == (written.test_labels - 1).tolist()


# --- missing files -------------------------------------------------------------------------

FILES = [(name, file) for name, entry in data.DATASETS.items() for file in entry.files]


@pytest.mark.parametrize("name, file", FILES)
def test_every_missing_file_is_named_with_its_folder(tmp_path, name, file):
    """Empty stand-ins for every file but one: the error names the missing one, and the fix
    the folder it belongs in."""
    entry = data.DATASETS[name]
    folder = tmp_path / entry.folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = make_cfg(name, tmp_path, emnist_split="digits")
    for other in entry.files:
        if other != file:
            (folder / other.format(split="digits")).touch()
    missing = folder / file.format(split="digits")
    with pytest.raises(ConfigError, match=f"{entry.title} file {missing} not found") as err:
        data.check_available(cfg.data)
    assert f"{folder}/" in err.value.fix and f"data.root={tmp_path}" in err.value.fix


def test_folder_needs_train_and_test(tmp_path):
    write_imagefolder(tmp_path, test_folder="val")  # ImageNet's name, not folder's
    with pytest.raises(ConfigError, match=f"Image folder {tmp_path}/test not found") as err:
        data.check_available(make_cfg("folder", tmp_path).data)
    assert f"{tmp_path}/train/ and {tmp_path}/test/" in err.value.fix


@pytest.mark.parametrize("name", data.MNIST_FILES)
def test_missing_mnist_file_is_named(tmp_path, name):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / name).unlink()
    with pytest.raises(ConfigError, match=f"MNIST file .*{name} not found"):
        data.client_datasets(make_cfg("mnist", tmp_path), 1, 1)


def test_missing_cifar10_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="data_batch_3 not found") as err:
        data.check_available(make_cfg("cifar10", tmp_path).data)
    assert "cifar-10-python.tar.gz" in err.value.fix


def test_missing_imagenet_val(tmp_path):
    write_imagefolder(tmp_path)
    for image in (tmp_path / "val").rglob("*.JPEG"):
        image.unlink()
    for folder in (tmp_path / "val").iterdir():
        folder.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(ConfigError, match="val not found"):
        data.check_available(make_cfg("imagenet", tmp_path).data)


def test_imagenet_class_folders_must_match(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "val" / "n00000003").rename(tmp_path / "val" / "n00000009")
    with pytest.raises(ConfigError, match="n00000003, n00000009"):
        data.check_available(make_cfg("imagenet", tmp_path).data)


def test_imagenet_spec_needs_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="train not found"):
        data.spec(make_cfg("imagenet", tmp_path).data)


def test_synthetic_needs_no_files(tmp_path):
    root = tmp_path / "nothing"
    cfg = make_cfg("synthetic", root, train_size=60, test_size=20)
    data.check_available(cfg.data)
    train, test, classes = data.client_loaders(cfg, 1, 1)
    x, y = everything(train)
    assert x.shape == (60, 3, 32, 32) and classes == list(range(10))
    assert sorted(set(y.tolist())) == classes and len(everything(test)[1]) == 20
    assert not root.exists()  # nothing read there, nothing written
    with pytest.raises(ConfigError, match="not found"):  # the same root fails a real data set
        data.check_available(make_cfg("mnist", root).data)


# --- a user's data sets --------------------------------------------------------------------

MODULE_NAMES = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module (a fresh name each time) where imports find it; returns its name.
    The data sets it makes are forgotten after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"splitmpi_test_userdata_{next(MODULE_NAMES)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    yield write
    data._user_data.cache_clear()


USER_DATA = """
    import torch
    from torch.utils.data import Dataset, TensorDataset

    CALLS = []


    class WithTargets(Dataset):
        def __init__(self, images, labels):
            self.images, self.targets = images, labels.tolist()

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.images[i], self.targets[i]


    def load(root):
        CALLS.append(root)
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(40) % 5
        images = torch.rand(40, 2, 12, 12, generator=g) * 2 - 1
        return WithTargets(images[:30], labels[:30]), TensorDataset(images[30:], labels[30:])
"""


def test_user_data_set(tmp_path, user_module):
    """``package.module:function(data.root)``: spec from the first item and the labels,
    ``.targets`` or each item's label, partitions as for a built-in set, one call a
    process, and torch's random state untouched."""
    module = user_module(USER_DATA)
    cfg = make_cfg(f"{module}:load", tmp_path)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert data.spec(cfg.data) == data.DataSpec(2, 12, 5)
    assert torch.equal(torch.get_rng_state(), before)
    data.check_available(cfg.data)
    train, test, classes = data.client_datasets(cfg, 2, 2)
    assert classes == [3, 4]
    assert data.targets_of(train).tolist() == [3, 4] * 6
    assert data.targets_of(test).tolist() == [3, 4] * 2
    image, label = test[0]
    assert image.shape == (2, 12, 12) and label == 3 and isinstance(label, int)
    x, y = everything(data.client_loaders(cfg, 1, 2)[0])
    assert x.shape == (18, 2, 12, 12) and sorted(set(y.tolist())) == [0, 1, 2]
    assert __import__(module).CALLS == [str(tmp_path)]
    cfg.data.image_size = 16
    with pytest.raises(ConfigError, match="data.image_size=16 but .* gives 12 px images"):
        data.spec(cfg.data)


@pytest.mark.parametrize("body, words", [
    ("return TensorDataset(X, Y)", ["load('data') returned a TensorDataset",
                                    "(train, test): two data sets"]),
    ("return {'train': TensorDataset(X, Y)}", ["returned a dict"]),
    ("return TensorDataset(X, Y.float()), TensorDataset(X, Y)",
     ["train labels are not one int per sample (found float"]),
    ("return TensorDataset(X, Y), TensorDataset(X, Y - 1)", ["test labels include -1"]),
    ("return TensorDataset(X + 3, Y), TensorDataset(X, Y)", ["not in [-1, 1]", "Normalize"]),
    ("return TensorDataset(X[:, :, :3], Y), TensorDataset(X, Y)",
     ["first train image is a torch.float32 tensor of shape (2, 3, 4)"]),
    ("return TensorDataset(X, Y), TensorDataset(X[:, :1], Y)",
     ["train images are (channels, size) (2, 4) but test images (1, 4)"]),
    ("return TensorDataset(X), TensorDataset(X, Y)",
     ["item 0 of the train data set is a tuple of 1"]),
    ("return TensorDataset(X[:0], Y[:0]), TensorDataset(X, Y)", ["train data set is empty"]),
])
def test_user_data_set_returning_the_wrong_thing(user_module, body, words):
    module = user_module(f"""
        import torch
        from torch.utils.data import TensorDataset

        X, Y = torch.zeros(6, 2, 4, 4), torch.arange(6) % 3


        def load(root):
            {body}
    """)
    with pytest.raises(ConfigError) as err:
        data.check_available(make_cfg(f"{module}:load").data)
    message = str(err.value)
    assert f"data.name={module}:load" in message
    for word in words:
        assert word in message


def test_user_data_set_that_cannot_be_imported(user_module):
    with pytest.raises(ConfigError, match="cannot import module no_such_module .*PYTHONPATH"):
        data.spec(make_cfg("no_such_module:load").data)
    broken = user_module("import no_such_dependency\n")
    with pytest.raises(ConfigError, match=f"cannot import module {broken} .*no_such_dependency"):
        data.spec(make_cfg(f"{broken}:load").data)
    module = user_module("def other(root):\n    pass\n")
    with pytest.raises(ConfigError, match=f"module {module} .* has no function load") as err:
        data.spec(make_cfg(f"{module}:load").data)
    assert "define load(root)" in err.value.fix
    with pytest.raises(ConfigError, match="is not package.module:function"):
        data.spec(make_cfg(f"{module}:").data)


# --- partitions ----------------------------------------------------------------------------

TARGETS = np.repeat(np.arange(10), 7)


def classes_of(shards):
    return [sorted(set(TARGETS[s].tolist())) for s in shards]


def test_blocks_are_the_papers_split():
    shards = data.partition(TARGETS, 10, 3, DataConfig(), seed=0)
    assert classes_of(shards) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(TARGETS)))


def test_blocks_need_a_class_per_client():
    with pytest.raises(ConfigError, match="at most 10 clients"):
        data.partition(TARGETS, 10, 11, DataConfig(), seed=0)


def test_explicit_lists_split_shared_classes_evenly():
    cfg = DataConfig(partition=[[0, 1], [1, 2]])
    shards = data.partition(TARGETS, 10, 2, cfg, seed=0)
    assert classes_of(shards) == [[0, 1], [1, 2]]
    assert not set(shards[0]) & set(shards[1])
    shared = [int(np.sum(TARGETS[s] == 1)) for s in shards]
    assert sorted(shared) == [3, 4]
    assert [s.tolist() for s in data.partition(TARGETS, 10, 2, cfg, seed=0)] == \
        [s.tolist() for s in shards]


def test_partition_naming_a_missing_class():
    cfg = DataConfig(name="mnist", partition=[[0, 12], [1]])
    with pytest.raises(ConfigError, match="names class 12 but mnist has 10 classes"):
        data.partition(TARGETS, 10, 2, cfg, seed=0)
    with pytest.raises(ConfigError, match="names class 12 but synthetic has 10 classes"):
        data.client_datasets(make_cfg(partition=[[0, 12], [1]]), 1, 2)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_random_partitions_cover_once_and_are_seeded(scheme):
    cfg = DataConfig(partition=scheme, dirichlet_alpha=0.05)
    shards = data.partition(TARGETS, 10, 7, cfg, seed=3)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(TARGETS)))
    assert all(len(s) > 0 for s in shards)
    again = data.partition(TARGETS, 10, 7, cfg, seed=3)
    assert [s.tolist() for s in again] == [s.tolist() for s in shards]
    other = data.partition(TARGETS, 10, 7, cfg, seed=4)
    assert [s.tolist() for s in other] != [s.tolist() for s in shards]


def test_iid_is_balanced():
    sizes = [len(s) for s in data.partition(TARGETS, 10, 3, DataConfig(partition="iid"), 0)]
    assert sizes == [24, 23, 23]


def test_client_without_training_samples():
    cfg = make_cfg(train_size=5)  # only classes 0..4 have samples; client 3 gets 7..9
    with pytest.raises(ConfigError,
                       match=r"leaves 1 of 3 clients without training samples \(client 3;"):
        data.client_datasets(cfg, 3, 3)


# --- per-client data sets ------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["blocks", "dirichlet"])
def test_test_set_holds_only_the_clients_classes(scheme):
    cfg = make_cfg(partition=scheme, train_size=300, test_size=100)
    for client in (1, 2, 3):
        train, test, classes = data.client_datasets(cfg, client, 3)
        assert classes == sorted(set(data.targets_of(train).tolist()))
        test_labels = data.targets_of(test)
        assert set(test_labels.tolist()) == set(classes)
        assert len(test_labels) == 10 * len(classes)


def test_limit_caps_both_subsets_deterministically():
    cfg = make_cfg(train_size=300, test_size=100, limit=20)
    train, test, classes = data.client_datasets(cfg, 1, 3)
    assert len(train) == len(test) == 20 and classes == [0, 1, 2, 3]
    again, _, _ = data.client_datasets(cfg, 1, 3)
    assert again.indices == train.indices


# --- synthetic -----------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_independent_of_the_run_seed():
    cfg = make_cfg(train_size=200, test_size=50)
    first, _, _ = data.client_datasets(cfg, 1, 1)
    cfg.train.seed = 99
    second, _, _ = data.client_datasets(cfg, 1, 1)
    assert torch.equal(first.dataset.data, second.dataset.data)
    assert data.spec(cfg.data) == data.DataSpec(3, 32, 10)
    assert first.dataset.data.dtype == torch.float32
    assert first.dataset.data.abs().max() <= 1


def test_synthetic_is_class_conditional_in_shape_not_colour():
    train, test = data._load(make_cfg().data)
    y, yt = train.targets, test.targets

    def nearest_class_mean(features, test_features):
        means = torch.stack([features[y == k].mean(0) for k in range(10)])
        return (torch.cdist(test_features, means).argmin(1) == yt).float().mean().item()

    assert nearest_class_mean(train.data.flatten(1), test.data.flatten(1)) > 0.6  # chance 0.1
    assert nearest_class_mean(train.data.mean((2, 3)), test.data.mean((2, 3))) < 0.3


# --- loaders -------------------------------------------------------------------------------

def test_same_seed_same_batches():
    cfg = make_cfg(train_size=300, test_size=60)
    first = [y.tolist() for _, y in data.client_loaders(cfg, 1, 3)[0]]
    loader = data.client_loaders(cfg, 1, 3)[0]
    second = list(loader)
    assert [y.tolist() for _, y in second] == first
    assert [y.tolist() for _, y in loader] != first  # a new epoch, a new order
    cfg.train.seed = 1
    assert [y.tolist() for _, y in data.client_loaders(cfg, 1, 3)[0]] != first
    assert [y.tolist() for _, y in data.client_loaders(make_cfg(train_size=300), 2, 3)[0]] \
        != first


def test_loader_settings():
    cfg = make_cfg(train_size=100, test_size=30)
    train, test, _ = data.client_loaders(cfg, 1, 1)
    assert train.batch_size == test.batch_size == 8
    assert not train.drop_last and len(train) == 13
    _, test_labels = everything(test)  # unshuffled: the stored order
    assert test_labels.tolist() == data.targets_of(test.dataset).tolist()


def epochs_of(loader, count):
    return [[(x, y) for x, y in loader] for _ in range(count)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (x, y), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(x, xb) and torch.equal(y, yb)


def test_workers_and_resumes_see_the_same_augmented_batches(tmp_path):
    """CIFAR-10 with its random crops and flips: three epochs through 2 persistent workers
    equal three epochs in this process, and a fresh loader set to epoch 2 (a resumed run),
    or to epoch 2 after its first 2 batches (a mid-epoch resume), sees what the third epoch
    saw. Before augmentations had seeds of their own, workers drew them from a base seed
    taken at the first ``iter()``, which a resumed process drew anew."""
    write_cifar10(tmp_path)
    cfg = make_cfg("cifar10", tmp_path)
    plain = epochs_of(data.client_loaders(cfg, 1, 2)[0], 3)
    assert not torch.equal(plain[0][0][0], plain[1][0][0])  # each epoch a new order
    cfg.data.workers = 2
    workers = data.client_loaders(cfg, 1, 2)[0]
    assert workers.persistent_workers
    for epoch, batches in enumerate(epochs_of(workers, 3)):
        assert_same_batches(batches, plain[epoch])
    resumed = data.client_loaders(cfg, 1, 2)[0]
    resumed.sampler.set_epoch(2)
    assert_same_batches(list(resumed), plain[2])
    resumed.sampler.set_epoch(2, start=2 * cfg.train.batch_size)
    assert_same_batches(list(resumed), plain[2][2:])


def test_loading_leaves_the_training_random_state_alone(tmp_path):
    """Augmenting draws from each sample's own seed: with data.workers=0 the process's
    generator (dropout, noise) is where it was, and the batches do not depend on it."""
    write_cifar10(tmp_path)
    loader = data.client_loaders(make_cfg("cifar10", tmp_path), 1, 2)[0]
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = list(loader)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(6)
    loader.sampler.set_epoch(0)
    assert_same_batches(list(loader), first)


def test_targets_of_follows_subsets():
    train, _, classes = data.client_datasets(make_cfg(train_size=100), 2, 3)
    labels = data.targets_of(train)
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(classes)
