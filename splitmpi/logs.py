"""One logging path for the training run and the tools: the standard ``logging`` module.

Every module logs to its own ``logging.getLogger(__name__)``, a child of ``"splitmpi"``;
only the entry points (``python -m splitmpi``, ``.attack``, ``.bench``, the ``jobs/``
scripts) call ``setup``, once, after parsing their arguments. A line reads
``[12:00:01 rank 0] message`` (``[12:00:01] message`` in a one-process tool): INFO and
DEBUG go to stdout, warnings and errors to stderr with their level named. Rank 0 logs at
INFO and the other ranks at WARNING, so a job of many ranks prints one story; ``--quiet``
keeps rank 0 to warnings too, ``-v`` shows rank 0's DEBUG lines and every rank's INFO.

What a command is for (the report's tables, a benchmark's table and ratio line, an
attack's scores, ``--print-config``) is printed, not logged: it is the command's output,
not news about its progress. Error exits keep their one ``PROG: error: ...`` line on
stderr (``cli.agree``), as argparse writes usage errors.

``Progress`` is the progress line of long loops (an ImageNet epoch lasts hours), in the
manner of torchvision's MetricLogger: what is done, the rate, the time spent and left.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
from dataclasses import dataclass
from time import perf_counter

ROOT = "splitmpi"
LEVELS = {  # verbosity -> (rank 0 or a one-process tool, any other rank)
    -1: (logging.WARNING, logging.WARNING),
    0: (logging.INFO, logging.WARNING),
    1: (logging.DEBUG, logging.INFO),
}


class _Console(logging.StreamHandler):
    """A handler on ``sys.stdout`` or ``sys.stderr`` as they are when a line is written,
    not when it was made: tests capture them, and callers may redirect them."""

    def __init__(self, name: str, formatter: logging.Formatter):
        logging.Handler.__init__(self)
        self._name = name
        self.setFormatter(formatter)

    @property
    def stream(self):
        return getattr(sys, self._name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` into ``verbosity`` (-1, 0 or 1)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                       default=0, help="log warnings and errors only")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                       help="log rank 0's DEBUG lines and every rank's INFO lines")


def setup(rank: int | None = None, verbosity: int = 0) -> logging.Logger:
    """Configure the ``splitmpi`` logger of this process (again: the last call wins).
    ``rank``: this MPI rank, None for a one-process tool."""
    first, others = LEVELS[verbosity]
    where = "" if rank is None else f" rank {rank}"
    stamp = f"[%(asctime)s{where}]"
    out = _Console("stdout", logging.Formatter(f"{stamp} %(message)s", "%H:%M:%S"))
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = _Console("stderr", logging.Formatter(f"{stamp} %(levelname)s: %(message)s",
                                               "%H:%M:%S"))
    err.setLevel(logging.WARNING)
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(out)
    logger.addHandler(err)
    logger.setLevel(first if rank in (None, 0) else others)
    logger.propagate = False  # an embedding program's root handlers would print it twice
    return logger


def duration(seconds: float) -> str:
    """``0:04:10``, ``2 days, 3:00:00``: whole seconds, as MetricLogger writes them."""
    return str(datetime.timedelta(seconds=int(seconds)))


@dataclass
class Pace:
    """When a progress line is due: after ``every`` more steps or ``seconds`` more seconds,
    whichever comes first; 0 turns that trigger off (both 0: no progress lines)."""
    every: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, train) -> Pace:
        """The pace a run's ``train.log_every`` and ``train.log_seconds`` set."""
        return cls(train.log_every, train.log_seconds)


class Progress:
    """Progress lines of one long loop of ``total`` units (samples, steps, ...):

        epoch 2/90: 9600/1281167 samples (client 1 3200/427056, ...), 530.4 samples/s,
        elapsed 0:00:18, ETA 0:40:57, run ETA 2 days, 13:11:44

    ``totals`` splits the total into named parts (one per client) that are counted each.
    The ETA is the time left at the rate so far, plus ``after`` seconds known to follow
    the loop (the rest of an epoch); with ``repeats`` (loops like this one still to come,
    epochs after this one) the run's ETA adds that many loops of the projected length."""

    def __init__(self, log: logging.Logger, title: str, total: int, unit: str, pace: Pace,
                 totals: dict[str, int] | None = None, after: float = 0.0,
                 repeats: int | None = None):
        self.log, self.title, self.total, self.unit, self.pace = log, title, total, unit, pace
        self.totals, self.after, self.repeats = totals or {}, after, repeats
        self.parts = dict.fromkeys(self.totals, 0)
        self.done = self.steps = self._steps_then = 0
        self.start = self._then = perf_counter()

    def update(self, n: int, part: str | None = None) -> None:
        """``n`` more units done (of ``part``); logs a line when the pace says so."""
        self.done += n
        self.steps += 1
        if part is not None:
            self.parts[part] += n
        now = perf_counter()
        every, seconds = self.pace.every, self.pace.seconds
        if ((every and self.steps - self._steps_then >= every)
                or (seconds and now - self._then >= seconds)):
            self._steps_then, self._then = self.steps, now
            self.log.info(self.line(now - self.start))

    def line(self, elapsed: float) -> str:
        """The progress line ``elapsed`` seconds into the loop."""
        text = f"{self.title}: {self.done}/{self.total} {self.unit}"
        if self.parts:
            text += " (" + ", ".join(f"{part} {n}/{self.totals[part]}"
                                     for part, n in self.parts.items()) + ")"
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text += f", {rate:.1f} {self.unit}/s, elapsed {duration(elapsed)}"
        if not self.done:  # no rate to project from
            return text
        projected = elapsed * self.total / self.done
        left = max(projected - elapsed, 0.0) + self.after
        text += f", ETA {duration(left)}"
        if self.repeats is not None:
            text += f", run ETA {duration(left + self.repeats * (projected + self.after))}"
        return text
