"""The compressed cut layer (``comm.compress``): each codec's round trip keeps what it
promises, per sample; the transport sends the codec's bytes and hands back float32; runs
under mpiexec (int8's learning against float32: tests/test_run.py)."""
import math

import numpy as np
import pytest
import torch

import mpirun
from splitmpi import config, loopback, reader
from splitmpi.compress import Codec
from splitmpi.errors import ConfigError
from splitmpi.transport import HEADER, HEADER_LEN, Kind, Transport

CLIENT, SERVER = 1, 0


@pytest.fixture
def world():
    with loopback.World(2) as w:
        yield w


def batch(shape=(5, 8, 6, 6)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 2, shape[0])  # samples of very different magnitudes
    return torch.randn(shape, generator=g) * scales.reshape(-1, *[1] * (len(shape) - 1))


def round_trip(name: str, x: torch.Tensor) -> torch.Tensor:
    codec = Codec.parse(name)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.nbytes(tuple(x.shape))
    return codec.decode(payload, tuple(x.shape))


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_each_samples_largest_entries(fraction):
    x = batch()
    y = round_trip(f"topk:{fraction}", x)
    per_sample = x[0].numel()
    k = max(1, math.ceil(fraction * per_sample))
    for row, kept in zip(x.reshape(len(x), -1), y.reshape(len(y), -1)):
        largest = row.abs().topk(k).indices
        assert torch.equal(kept[largest], row[largest])  # bit for bit
        others = torch.ones(per_sample, dtype=torch.bool)
        others[largest] = False
        assert not kept[others].any()
    assert Codec.parse(f"topk:{fraction}").nbytes(tuple(x.shape)) == len(x) * k * 8


def test_int8_error_is_at_most_half_a_level_of_each_sample():
    x = batch()
    y = round_trip("int8", x)
    for row, back in zip(x.reshape(len(x), -1), y.reshape(len(y), -1)):
        bound = row.abs().max() / 254
        assert (row - back).abs().max() <= bound * (1 + 1e-5)
    assert Codec.parse("int8").nbytes(tuple(x.shape)) == len(x) * (4 + x[0].numel())


def test_fp8_keeps_three_mantissa_bits_of_each_sample():
    x = batch()
    y = round_trip("fp8", x)
    for row, back in zip(x.reshape(len(x), -1), y.reshape(len(y), -1)):
        scale = row.abs().max() / 448
        normal = row.abs() >= scale * 2 ** -6  # e4m3's normal range, scaled
        relative = ((row - back).abs() / row.abs())[normal]
        assert relative.max() <= 1 / 16 + 1e-6
        small = (row - back)[~normal].abs()
        assert not len(small) or small.max() <= scale * 2 ** -10


@pytest.mark.parametrize("value, words", [
    ("topk:0", "the fraction must be in (0, 1]"), ("topk:1.5", "the fraction must be in"),
    ("topk:much", "'much' is not a fraction"), ("gzip", "'gzip' is not a codec"),
    ("int8:3", "'int8:3' is not a codec")])
def test_bad_codecs_are_refused_with_the_choices(value, words):
    with pytest.raises(ConfigError, match="comm.compress") as err:
        config.load(None, [f"comm.compress={value}"])
    assert words in str(err.value) and "topk:F" in err.value.fix


def test_the_transport_sends_the_codecs_bytes(world):
    """Activations coded; gradients only with compress_grad; labels never; an empty batch
    (the end of a phase) as it is."""
    activation, grad, labels = batch(), batch((5, 16)), torch.arange(5)
    codec = Codec.parse("int8")

    def sender():
        for compress_grad in (False, True):
            t = Transport(world.comm(CLIENT), compress="int8", compress_grad=compress_grad)
            for x, kind in ((activation, Kind.ACTIVATION), (grad, Kind.FEATURE_GRAD),
                            (labels, Kind.LABELS), (torch.empty(0, 8, 6, 6), Kind.ACTIVATION)):
                t.send(x, SERVER, kind)

    def receiver():
        runs = []
        for compress_grad in (False, True):
            t = Transport(world.comm(SERVER), compress="int8", compress_grad=compress_grad)
            got = [t.recv(CLIENT, kind) for kind in (Kind.ACTIVATION, Kind.FEATURE_GRAD,
                                                     Kind.LABELS, Kind.ACTIVATION)]
            runs.append((got, dict(t.bytes_received)))
        return runs

    runs, _ = loopback.run(receiver, sender)
    header = HEADER_LEN * HEADER.itemsize
    for compress_grad, (got, received) in zip((False, True), runs):
        assert torch.equal(got[0], codec.decode(codec.encode(activation), activation.shape))
        assert received[Kind.ACTIVATION] == 2 * header + codec.nbytes(activation.shape)
        coded_grad = codec.decode(codec.encode(grad), grad.shape)
        assert torch.equal(got[1], coded_grad if compress_grad else grad)
        assert received[Kind.FEATURE_GRAD] == header + (
            codec.nbytes(grad.shape) if compress_grad else grad.numel() * 4)
        assert torch.equal(got[2], labels) and got[3].shape == (0, 8, 6, 6)


def test_topk_and_fp8_under_mpiexec(tmp_path):
    """2 ranks, everything coded: the bytes the codec promises cross, and training runs."""
    for compress in ("topk:0.25", "fp8"):
        mpirun.ok(2, *mpirun.TINY, "train.epochs=1", f"comm.compress={compress}",
                  "comm.compress_grad=true", f"output={compress}.h5", cwd=tmp_path)
        run = reader.read(tmp_path / f"{compress}.h5")
        assert np.isfinite(run.clients[1]["train_loss"]).all()
        assert run.clients[1]["train_accuracy"][0] > 0
