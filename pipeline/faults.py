"""Fault injection for the tests, in one place: nothing else in the pipeline knows about faults.

Two kinds of point, both inert unless a test arms them:

* ``point(name)``: with ``RESNET_PIPELINE_FAULT=<name>`` in the environment, the process ends
  there with exit status 17, as a crash would (no cleanup, no atexit). For a job's own process
  (the driver): the tests start it as a subprocess with that variable.
* ``hold(name)``: with ``RESNET_PIPELINE_HOLD=<name>:<path>``, or armed in the fault file
  (``arm_hold``, for the Ray workers of a cluster already running), the process creates
  ``<path>.reached`` there and waits until ``<path>`` exists: a test holds a job at a known
  point (a run holding its output's lease, Train workers after a checkpoint) while it starts
  another or kills something.
* ``storage_filesystem(fs)``: with ``RESNET_PIPELINE_STORAGE_FAULTS=rate=R,seed=S[,ops=A|B]
  [,after=N][,log=PATH]``, every object-store filesystem ``storage.resolve`` hands out fails a
  share R of its calls (of the methods named in ``ops``; all of them by default; only after
  the first N such calls of this process) with an OSError, as a flaky network or an
  overloaded store would; each injected fault is appended as a line to PATH. Ray's workers
  inherit the variable from the environment their cluster was started with.
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
    names ``name``, or ``arm_hold`` armed it: create ``<path>.reached``, then return once
    ``<path>`` exists."""
    spec = os.environ.get(HOLD, "")
    path = spec[len(name) + 1:] if spec.startswith(name + ":") else _armed_hold(name)
    if not path:
        return
    open(path + ".reached", "w").close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)


def _armed_hold(name: str) -> str:
    """The gate path ``arm_hold`` armed for ``name`` in the fault file, or ""."""
    path = os.environ.get(FAULT_FILE)
    if not path or not os.path.exists(path):
        return ""
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError):  # being rewritten by the test: not armed yet
        return ""
    return str(spec.get("gate", "")) if spec.get("hold") == name else ""


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


def arm_hold(name: str, gate: str) -> None:
    """(Tests) Arm ``hold(name)`` with gate ``gate`` for every process of the cluster whose
    environment names the fault file (instead of any ``kill_once`` fault)."""
    with open(os.environ[FAULT_FILE], "w") as f:
        json.dump({"hold": name, "gate": gate}, f)


def disarm() -> None:
    """(Tests) Disarm the armed ``kill_once`` fault, if any."""
    path = os.environ.get(FAULT_FILE)
    if path and os.path.exists(path):
        os.remove(path)


STORAGE_FAULTS = "RESNET_PIPELINE_STORAGE_FAULTS"
_FLAKY_STATE: dict = {}
_FLAKY_OPS = ("get_file_info", "get_file_info_selector", "create_dir", "delete_dir",
              "delete_dir_contents", "delete_file", "move", "copy_file", "open_input_stream",
              "open_input_file", "open_output_stream")


def storage_filesystem(fs):
    """``fs`` itself, or (with RESNET_PIPELINE_STORAGE_FAULTS set) a pyarrow filesystem that
    wraps it and fails a share of its calls with OSError (see the module doc)."""
    spec = os.environ.get(STORAGE_FAULTS)
    if not spec:
        return fs
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(_flaky_handler_class()(fs, spec))


def _flaky_handler_class():
    import random

    import pyarrow.fs as pafs

    class FlakyHandler(pafs.FileSystemHandler):
        def __init__(self, inner, spec: str):
            self.inner, self.spec = inner, spec
            conf = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
            self.rate, self.after = float(conf.get("rate", 0.1)), int(conf.get("after", 0))
            self.ops = set(conf["ops"].split("|")) if conf.get("ops") else set(_FLAKY_OPS)
            self.log = conf.get("log")
            # one draw sequence and call count per process, not per resolved filesystem
            key = (spec, os.getpid())
            if key not in _FLAKY_STATE:
                _FLAKY_STATE[key] = [random.Random(f"{conf.get('seed', 0)}-{os.getpid()}"), 0]
            self.state = _FLAKY_STATE[key]

        def __reduce__(self):
            return (type(self), (self.inner, self.spec))

        def _maybe_fail(self, op: str, path) -> None:
            if op not in self.ops:
                return
            self.state[1] += 1
            if self.state[1] > self.after and self.state[0].random() < self.rate:
                line = f"injected storage fault: {op} {path} (pid {os.getpid()})"
                if self.log:
                    fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    os.write(fd, (line + "\n").encode())
                    os.close(fd)
                raise OSError(f"{line}: connection reset by peer")

        def get_type_name(self):
            return "flaky+" + self.inner.type_name

        def normalize_path(self, path):
            return self.inner.normalize_path(path)

        def get_file_info(self, paths):
            self._maybe_fail("get_file_info", paths[0] if paths else "")
            return self.inner.get_file_info(paths)

        def get_file_info_selector(self, selector):
            self._maybe_fail("get_file_info_selector", selector.base_dir)
            return self.inner.get_file_info(selector)

        def create_dir(self, path, recursive):
            self._maybe_fail("create_dir", path)
            self.inner.create_dir(path, recursive=recursive)

        def delete_dir(self, path):
            self._maybe_fail("delete_dir", path)
            self.inner.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            self._maybe_fail("delete_dir_contents", path)
            self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            self.inner.delete_dir_contents("/", accept_root_dir=True)

        def delete_file(self, path):
            self._maybe_fail("delete_file", path)
            self.inner.delete_file(path)

        def move(self, src, dest):
            self._maybe_fail("move", src)
            self.inner.move(src, dest)

        def copy_file(self, src, dest):
            self._maybe_fail("copy_file", src)
            self.inner.copy_file(src, dest)

        def open_input_stream(self, path):
            self._maybe_fail("open_input_stream", path)
            return self.inner.open_input_stream(path)

        def open_input_file(self, path):
            self._maybe_fail("open_input_file", path)
            return self.inner.open_input_file(path)

        def open_output_stream(self, path, metadata):
            self._maybe_fail("open_output_stream", path)
            return self.inner.open_output_stream(path, metadata=metadata)

        def open_append_stream(self, path, metadata):
            return self.inner.open_append_stream(path, metadata=metadata)

    return FlakyHandler
