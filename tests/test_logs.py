"""splitmpi.logs in one process: the levels and streams of each rank, and what a progress
line says and when (a fake clock, so no test waits)."""
import logging
import re

import pytest

from splitmpi import logs

STAMP = r"\[\d\d:\d\d:\d\d rank {}\] "


@pytest.fixture
def restore():
    """Leave the "splitmpi" logger as a fresh process has it."""
    yield
    logger = logging.getLogger(logs.ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


@pytest.mark.parametrize("rank, verbosity, level", [
    (0, 0, logging.INFO), (3, 0, logging.WARNING), (0, -1, logging.WARNING),
    (3, -1, logging.WARNING), (0, 1, logging.DEBUG), (3, 1, logging.INFO),
    (None, 0, logging.INFO)])
def test_levels_by_rank_and_verbosity(restore, rank, verbosity, level):
    assert logs.setup(rank, verbosity).level == level


def test_info_goes_to_stdout_and_warnings_to_stderr_with_the_rank(restore, capsys):
    logs.setup(2, 1)
    log = logging.getLogger("splitmpi.server")
    log.debug("not shown")
    log.info("started\nsecond line")
    log.warning("careful")
    out, err = capsys.readouterr()
    assert re.fullmatch(STAMP.format(2) + "started\nsecond line\n", out), out
    assert re.fullmatch(STAMP.format(2) + "WARNING: careful\n", err), err


def test_a_one_process_tool_has_no_rank_and_setup_again_replaces(restore, capsys):
    logs.setup(0)
    logs.setup()
    logging.getLogger("splitmpi.attack").info("hello")
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] hello\n", capsys.readouterr().out)


def test_quiet_and_verbose_flags():
    import argparse
    p = argparse.ArgumentParser()
    logs.add_arguments(p)
    assert [p.parse_args(a).verbosity for a in ([], ["-q"], ["--verbose"])] == [0, -1, 1]
    with pytest.raises(SystemExit):
        p.parse_args(["-q", "-v"])


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(logs, "perf_counter", c)
    return c


def lines(caplog):
    return [r.getMessage() for r in caplog.records]


@pytest.fixture
def log(caplog):
    """A logger outside "splitmpi", whose records reach caplog whatever ``setup`` did."""
    caplog.set_level(logging.INFO, "test_logs")
    return logging.getLogger("test_logs.progress")


def test_a_line_every_n_steps_with_parts_rate_and_etas(clock, log, caplog):
    progress = logs.Progress(log, "epoch 2/4", 400, "samples",
                             logs.Pace(every=2), totals={"client 1": 300, "client 2": 100},
                             after=30.0, repeats=2)
    for part in ("client 1", "client 2", "client 1"):
        clock.now += 10
        progress.update(50, part)
    assert lines(caplog) == [
        # 100 of 400 samples in 20 s: 60 s to go, then 30 s after the train phase; two more
        # epochs of 80 + 30 s
        "epoch 2/4: 100/400 samples (client 1 50/300, client 2 50/100), 5.0 samples/s, "
        "elapsed 0:00:20, ETA 0:01:30, run ETA 0:05:10"]


def test_a_line_every_so_many_seconds_and_none_when_both_are_off(clock, log, caplog):
    timed = logs.Progress(log, "rMLE", 1000, "steps", logs.Pace(seconds=60))
    silent = logs.Progress(log, "never", 1000, "steps", logs.Pace())
    for _ in range(100):
        clock.now += 1.5
        timed.update(1)
        silent.update(1)
    assert len(lines(caplog)) == 2  # at 60 s and at 120 s
    assert lines(caplog)[0] == ("rMLE: 40/1000 steps, 0.7 steps/s, elapsed 0:01:00, "
                                "ETA 0:24:00")


def test_pace_of_a_train_config():
    from splitmpi import config
    cfg = config.load(None, ["train.log_every=7", "train.log_seconds=2.5"])
    assert logs.Pace.of(cfg.train) == logs.Pace(7, 2.5)
    assert logs.Pace.of(config.Config().train) == logs.Pace(0, 60.0)
