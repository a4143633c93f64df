"""Progress of long work, for a person at a terminal and for a cron log alike.

On a terminal (stderr is a TTY), tqdm's bar, as before. Without one (cron, ``ray job logs``, a
pipe, a Ray Train worker), a plain log line each time about another 10% is done, at most one
every ``MIN_SECONDS`` and at least one every ``MAX_SECONDS`` while work goes on:

    predict val: 12,800 of 50,000 images (26%), 121 images/s, ETA 5:07

The rate is the steady one, from the first update on (start-up excluded), and the ETA is the
rest at that rate. A bar redrawn with carriage returns is one unreadable line in a log file;
no output at all left a 50,000-image nightly silent for 7 minutes (issue 33).
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)

EVERY_FRACTION = 0.1  # a line each time about this share more of the total is done
# ... but not more often than this: short work (a demo epoch) says nothing.
# RESNET_PIPELINE_PROGRESS_MIN_SECONDS sets it (0: a line at every 10%, however fast)
MIN_SECONDS = float(os.environ.get("RESNET_PIPELINE_PROGRESS_MIN_SECONDS", "20"))
MAX_SECONDS = 60.0  # ... and at least this often while anything moves


_running: list = []  # the Progress objects not yet closed, oldest first


def current_line() -> str:
    """The plain line of the newest running Progress ('' when none): how far the job got, for a
    deadline's message (``pipeline.deadline.activity``)."""
    return _running[-1].line() if _running else ""


def eta_text(seconds: float) -> str:
    """``seconds`` as ``m:ss`` or ``h:mm:ss``."""
    s = int(round(max(seconds, 0)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of ``total`` units (``unit``, plural) of work called ``name``: ``update(n)`` as
    they are done, ``close()`` (or a ``with`` block) at the end. ``enabled=False``: silent.
    ``tty``: whether to draw tqdm's bar (default: whether stderr is a terminal). ``clock`` and
    ``emit`` (a function taking each line) are for tests; lines go to this module's logger
    at INFO by default."""

    def __init__(self, total: int, name: str, unit: str = "images", *, enabled: bool = True,
                 tty: bool | None = None, clock=time.monotonic, emit=None):
        self.total, self.name, self.unit, self.enabled = int(total), name, unit, enabled
        self.done = 0
        self.clock, self.emit = clock, emit or log.info
        self.bar = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit=unit[:3], desc=name)
        self.t_first = self.n_first = None  # the first update: where the steady rate starts
        self.t_line, self.n_line = clock(), 0  # the last line written
        _running.append(self)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int) -> None:
        """``n`` more units done."""
        if not self.enabled:
            return
        self.done += int(n)
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if self.t_first is None:
            self.t_first, self.n_first = now, self.done
            return
        since = now - self.t_line
        step = EVERY_FRACTION * self.total
        if self.done < self.total and (since >= MAX_SECONDS or (
                since >= MIN_SECONDS and self.done - self.n_line >= step)):
            self.emit(self.line(now))
            self.t_line, self.n_line = now, self.done

    def rate(self, now: float | None = None) -> float | None:
        """Units a second since the first update; None before two updates."""
        now = self.clock() if now is None else now
        if self.t_first is None or now <= self.t_first or self.done <= self.n_first:
            return None
        return (self.done - self.n_first) / (now - self.t_first)

    def line(self, now: float | None = None) -> str:
        """The plain progress line now."""
        rate = self.rate(now)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.name}: {self.done:,} of {self.total:,} {self.unit} ({pct:.0f}%)"
        if rate:
            text += f", {rate:,.0f} {self.unit}/s, ETA {eta_text((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        if self in _running:
            _running.remove(self)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
