"""Fault injection for the tests, in one place: nothing else in the pipeline knows about faults.

Two kinds of point, both inert unless a test arms them:

* ``point(name)``: with ``RESNET_PIPELINE_FAULT=<name>`` in the environment, the process ends
  there with exit status 17, as a crash would (no cleanup, no atexit). For a job's own process
  (the driver): the tests start it as a subprocess with that variable.
* ``hold(name)``: with ``RESNET_PIPELINE_HOLD=<name>:<path>``, the process creates
  ``<path>.reached`` there and waits until ``<path>`` exists: a test holds a job at a known
  point (a run holding its output's lease) while it starts another.
* ``kill_once(name, **where)``: SIGKILLs the calling process (a Ray Train worker, a predictor
  actor) the first time it reaches point ``name`` at ``where``, as armed in the JSON file that
  ``RESNET_PIPELINE_FAULT_FILE`` names. Ray's worker processes inherit the environment of the
  local cluster's start, so the tests set that variable before ``ray.init`` and arm or disarm
  faults by writing the file (``arm``, ``disarm``). A marker file makes it fire once, so Ray's
  restarted worker or actor goes on. Without the variable it costs one dictionary lookup.
"""

from __future__ import annotations

import json
import os
import signal
import time

EXIT_STATUS = 17
FAULT_FILE = "RESNET_PIPELINE_FAULT_FILE"


def point(name: str) -> None:
    """End this process with EXIT_STATUS here when RESNET_PIPELINE_FAULT names ``name``."""
    if os.environ.get("RESNET_PIPELINE_FAULT") == name:
        os._exit(EXIT_STATUS)


HOLD = "RESNET_PIPELINE_HOLD"


def hold(name: str, timeout: float = 600.0) -> None:
    """Wait here (polling every 0.1 s, at most ``timeout`` seconds) while RESNET_PIPELINE_HOLD
    names ``name``: create ``<path>.reached``, then return once ``<path>`` exists."""
    spec = os.environ.get(HOLD, "")
    if not spec.startswith(name + ":"):
        return
    path = spec[len(name) + 1:]
    open(path + ".reached", "w").close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)


def kill_once(name: str, **where) -> None:
    """SIGKILL this process once when the armed fault is ``name`` at exactly ``where`` (e.g.
    ``epoch=1, step=1, rank=1``, or ``batch=2``)."""
    path = os.environ.get(FAULT_FILE)
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        spec = json.load(f)
    if spec.get("point") != name or any(spec.get(k) != v for k, v in where.items()):
        return
    if not os.path.exists(spec["marker"]):
        open(spec["marker"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def arm(name: str, marker: str, **where) -> None:
    """(Tests) Arm ``kill_once(name, **where)``; ``marker`` is created when it fires."""
    with open(os.environ[FAULT_FILE], "w") as f:
        json.dump({"point": name, "marker": marker, **where}, f)


def disarm() -> None:
    """(Tests) Disarm the armed ``kill_once`` fault, if any."""
    path = os.environ.get(FAULT_FILE)
    if path and os.path.exists(path):
        os.remove(path)
