"""Server schedules: each trains correctly, fifo serves a slow client less often without
starving it, and no schedule deadlocks at 1, 2 or 7 clients."""
import math

import pytest

import mpirun
from splitmpi import reader

SCHEDULES = ("round_robin", "sequential", "fifo")


@pytest.mark.parametrize("schedule", ["round_robin", "fifo"])
def test_each_schedule_learns(tmp_path, schedule):
    """iid shards: with class blocks a client's end-of-epoch test accuracy swings with
    which clients updated the shared cloud last, and fifo makes that order random.
    (sequential: tests/test_modes.py, as SplitFed's baseline.)"""
    mpirun.ok(4, "train.epochs=3", "data.image_size=16", "split.share=false",
              "data.partition=iid", f"server.schedule={schedule}", "output=s.h5", cwd=tmp_path,
              timeout=300)
    run = reader.read(tmp_path / "s.h5")
    for k, series in run.clients.items():
        chance = 1 / len(run.classes[k])
        assert series["train_accuracy"][-1] > 2 * chance, (schedule, k)
        assert series["test_accuracy"].max() > 3 * chance, (schedule, k)
        assert series["train_loss"][-1] < 0.7 * series["train_loss"][0], (schedule, k)


def phase_ends(tmp_path, schedule):
    mpirun.ok(4, "data.train_size=600", "data.test_size=60", "data.image_size=16",
              "data.partition=iid", "train.epochs=1", "clients.delay_ms=[0, 0, 300]",
              f"server.schedule={schedule}", f"output={schedule}.h5", cwd=tmp_path)
    run = reader.read(tmp_path / f"{schedule}.h5")
    for series in run.clients.values():  # never starved: every batch was served
        assert series["batches_served"][0] == math.ceil(series["train_samples"][0] / 32)
    return {k: run.clients[k]["phase_end_seconds"][0] for k in run.clients}


def test_fifo_serves_a_delayed_client_less_often_but_never_starves_it(tmp_path):
    """Client 3's requests leave 300 ms after its previous step ended (its forward runs
    within that time), several times a fast client's step on 2 loaded cores."""
    fifo = phase_ends(tmp_path, "fifo")
    turns = phase_ends(tmp_path, "round_robin")
    # fifo: the fast clients finish long before the slow one; round robin makes them wait
    assert max(fifo[1], fifo[2]) < 0.6 * fifo[3], fifo
    assert min(turns[1], turns[2]) > 0.8 * turns[3], turns


@pytest.mark.parametrize("n, schedule", [(n, s) for n in (2, 3) for s in SCHEDULES]
                         + [(8, "fifo")])
def test_no_deadlock(tmp_path, n, schedule):
    """1, 2 and 7 clients (round robin at 7 is the 3-client case with more turns)."""
    mpirun.ok(n, "data.train_size=140", "data.test_size=70", "data.image_size=16",
              "data.partition=iid", "train.epochs=2", "train.batch_size=16",
              f"server.schedule={schedule}", "output=d.h5", cwd=tmp_path, timeout=200)
    run = reader.read(tmp_path / "d.h5")
    assert run.finished and len(run.clients) == n - 1


@pytest.mark.parametrize("topology", ["u_shape", "label_sharing"])
def test_server_time_is_split_into_queue_idle_compute_and_classifier_wait(tmp_path, topology):
    """Sequential schedule, client 1 slow to send (30 ms before each request), client 2
    not. Client 2's first request waits in the queue for the whole of client 1's phase;
    client 1's requests never queue: the server idles for them instead (before, both were
    one number, so a request that never queued showed the client's delay as queue wait).
    The server's time on a request is computing, plus in u_shape waiting for the client's
    classifier round trip, which label_sharing does not have."""
    mpirun.ok(3, *mpirun.TINY, "train.epochs=1", "server.schedule=sequential",
              f"split.topology={topology}", "clients.delay_ms=[30, 0]", "output=t.h5",
              cwd=tmp_path)
    one, two = reader.read(tmp_path / "t.h5").clients.values()
    first = {name: one[name][0] for name in one}
    batches = first["batches_served"]
    assert first["server_idle_seconds"] > 0.03 * batches, first
    assert first["queue_wait_seconds"] < 0.25 * first["server_idle_seconds"], first
    assert two["queue_wait_seconds"][0] > 0.8 * first["phase_end_seconds"], (first, two)
    for client in (one, two):
        assert client["server_compute_seconds"][0] > 0
        if topology == "u_shape":
            assert client["classifier_wait_seconds"][0] > 0
        else:
            assert client["classifier_wait_seconds"][0] == 0
