"""pipeline/faults.py: armed points fire once, where armed; unarmed points do nothing."""

from __future__ import annotations

import multiprocessing
import os
import signal

from pipeline import faults


def _reach(name, where, fault_file):
    os.environ[faults.FAULT_FILE] = fault_file
    faults.kill_once(name, **where)


def _exit_code(name, where, fault_file) -> int:
    p = multiprocessing.get_context("fork").Process(target=_reach, args=(name, where, fault_file))
    p.start()
    p.join(30)
    return p.exitcode


def test_an_armed_point_kills_once_and_only_where_armed(tmp_path, monkeypatch):
    fault_file, marker = str(tmp_path / "armed"), tmp_path / "marker"
    monkeypatch.setenv(faults.FAULT_FILE, fault_file)
    assert _exit_code("train_step", {"epoch": 1}, fault_file) == 0  # nothing armed
    faults.arm("train_step", str(marker), epoch=1, step=2)
    assert _exit_code("train_step", {"epoch": 1, "step": 1}, fault_file) == 0  # elsewhere
    assert _exit_code("predictor_batch", {"batch": 2}, fault_file) == 0  # another point
    assert _exit_code("train_step", {"epoch": 1, "step": 2}, fault_file) == -signal.SIGKILL
    assert marker.exists()
    assert _exit_code("train_step", {"epoch": 1, "step": 2}, fault_file) == 0  # once only
    faults.disarm()
    assert not os.path.exists(fault_file)
