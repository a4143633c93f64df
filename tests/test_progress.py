"""Progress lines without a terminal (pipeline/progress.py): about every 10% or minute, with
the steady rate and an ETA; nothing for short work; a bar only on a TTY."""

from __future__ import annotations

import pytest

from pipeline import progress


def _run(total, per_update, seconds_each, updates):
    t, lines = [0.0], []
    p = progress.Progress(total, "predict val", tty=False, clock=lambda: t[0], emit=lines.append)
    for _ in range(updates):
        t[0] += seconds_each
        p.update(per_update)
    p.close()
    return lines


def test_a_long_run_gets_a_line_about_every_tenth_with_rate_and_eta():
    # the 50,000-image nightly at 121 images/s: ~7 minutes, where it printed nothing
    lines = _run(50_000, 64, 64 / 121, 782)
    assert 8 <= len(lines) <= 10, lines
    assert lines[0] == "predict val: 5,056 of 50,000 images (10%), 121 images/s, ETA 6:11"
    assert lines[-1].startswith("predict val: 45,504 of 50,000 images (91%)")


def test_a_slow_run_still_gets_a_line_every_minute():
    lines = _run(50_000, 64, 10.0, 30)  # 6.4 images/s: 10% takes 13 minutes; 5 minutes here
    assert len(lines) == 5 and all("6 images/s" in ln for ln in lines), lines


def test_short_work_prints_no_line():
    assert _run(300, 64, 0.5, 5) == []  # the demo's val set: done in seconds


def test_disabled_progress_is_silent():
    lines = []
    p = progress.Progress(100, "x", enabled=False, tty=False, emit=lines.append)
    p.update(100)
    assert lines == [] and p.done == 0


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (59.6, "1:00"), (372, "6:12"),
                                          (3600 * 2 + 61, "2:01:01")])
def test_eta_text(seconds, text):
    assert progress.eta_text(seconds) == text
