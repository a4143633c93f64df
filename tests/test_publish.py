"""The exactly-once publish protocol (pipeline/publish.py) crashed at every step of publish
and of recover: OUT always holds exactly the old set or exactly the new one. Fast, on the
local disk; tests/test_s3.py runs the same crash walk against a local S3 server."""

from __future__ import annotations

import pyarrow.fs as pafs

from pipeline import publish, storage


class Crash(Exception):
    pass


class CrashingFS:
    """Delegates to a real filesystem; raises Crash at the N-th state change. A folder delete
    is done object by object, so a crash can land in the middle of it (as a batched delete on
    S3 can stop part-way)."""

    MUTATING = {"copy_file", "delete_file", "create_dir", "open_output_stream", "move"}

    def __init__(self, fs, budget):
        self._fs, self._budget = fs, budget

    def _tick(self):
        self._budget[0] -= 1
        if self._budget[0] < 0:
            raise Crash()

    def delete_dir(self, path):
        for info in self._fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if info.type == pafs.FileType.File:
                self._tick()
                self._fs.delete_file(info.path)
        self._tick()
        self._fs.delete_dir(path)

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in self.MUTATING:
            return attr

        def call(*a, **k):
            self._tick()
            return attr(*a, **k)
        return call


OLD = {"predictions/part-00000.parquet": b"old-0", "failures.parquet": b"old-f",
       "summary.json": b"old-s", "_SUCCESS": b"old\n"}
NEW = {"predictions/part-00000.parquet": b"new-0", "predictions/part-00001.parquet": b"new-1",
       "failures.parquet": b"new-f", "summary.json": b"new-s"}


def _crash_every_step(base: str, monkeypatch, local: bool,
                      nested) -> tuple[int, int]:
    """Publish NEW over OLD, crashing at step n = 0, 1, ... until it completes; after each crash
    recover (itself crashed at step m for some n, then recovered again) and check that OUT holds
    exactly the old set or exactly the new set, with its _SUCCESS, and no _previous."""
    out, staging = storage.join(base, "out"), storage.join(base, "out", "_staging-new")
    real_resolve, real_move_local = storage.resolve, storage._move_local
    budget = [10 ** 9]

    def crashing_resolve(path):
        fs, p = real_resolve(path)
        return CrashingFS(fs, budget), p

    def crashing_move_local(src, dst):
        budget[0] -= 1
        if budget[0] < 0:
            raise Crash()
        real_move_local(src, dst)

    def reset():
        budget[0] = 10 ** 9
        storage.delete_dir(base)
        for rel, data in OLD.items():
            storage.write_bytes_atomic(storage.join(out, rel), data)
        for rel, data in NEW.items():
            storage.write_bytes_atomic(storage.join(staging, rel), data)

    def published() -> dict:
        files = {rel: storage.read_bytes(storage.join(out, rel))
                 for rel, _ in storage.list_files(out)
                 if not rel.startswith("_staging-") and not rel.startswith(".")}
        assert not storage.exists(storage.join(out, "_previous"))
        return files

    def crashed_publish(n: int) -> bool:
        reset()
        budget[0] = n
        try:
            publish.publish(staging, out, "new")
            return True
        except Crash:
            return False
        finally:
            budget[0] = 10 ** 9

    expect_new = {**NEW, "_SUCCESS": b"new\n"}
    outcomes = {"old": 0, "new": 0}

    def recover_and_check(n: int, m: int | None) -> bool:
        """Recover (crashed at its step m, then again in full); True if m did not crash."""
        finished = True
        if m is not None:
            budget[0] = m
            try:
                publish.recover(out)
            except Crash:
                finished = False
            budget[0] = 10 ** 9
        publish.recover(out)
        files = published()
        assert files in (OLD, expect_new), f"crash at publish step {n}, recover step {m}: " \
                                           f"{sorted(files)}"
        outcomes["new" if files == expect_new else "old"] += 1
        return finished

    monkeypatch.setattr(storage, "resolve", crashing_resolve)
    if local:
        monkeypatch.setattr(storage, "is_local", lambda fs: True)
        monkeypatch.setattr(storage, "_move_local", crashing_move_local)
    n = 0
    while True:
        completed = crashed_publish(n)
        if completed:
            recover_and_check(n, None)
            assert published() == expect_new and not storage.exists(staging)
            return outcomes["old"], outcomes["new"]
        if nested(n):  # crash the recovery too, at each of its steps, from this state
            m = 0
            while not recover_and_check(n, m):
                m += 1
                crashed_publish(n)
        else:
            recover_and_check(n, None)
        n += 1


def test_publish_crashed_at_every_step_on_local_disk_is_rolled_back(tmp_path, monkeypatch):
    old, new = _crash_every_step(str(tmp_path / "crash"), monkeypatch, local=True,
                                 nested=lambda n: True)
    assert old > 5 and new >= 2


class FailingFS(CrashingFS):
    """CrashingFS that fails the state changes numbered in ``window`` with an OSError (a store
    that answers 500s for a while), not a crash: the same process goes on."""

    def __init__(self, fs, counter, window):
        super().__init__(fs, counter)
        self._window = window

    def _tick(self):
        self._budget[0] += 1
        if self._budget[0] - 1 in self._window:
            raise OSError("injected: connection reset by peer")


def _publish_with_failures(tmp_path, monkeypatch, window) -> tuple[str, dict]:
    """publish_or_roll_back NEW over OLD on an object-store code path (local disk underneath)
    whose state changes numbered in ``window`` fail; return ("ok" or the error, OUT's files
    after a later recover with no failures)."""
    from pipeline.errors import PipelineError

    base = tmp_path / f"w{window.start}-{window.stop}"
    out, staging = str(base / "out"), str(base / "out" / "_staging-new")
    for rel, data in OLD.items():
        storage.write_bytes_atomic(storage.join(out, rel), data)
    for rel, data in NEW.items():
        storage.write_bytes_atomic(storage.join(staging, rel), data)
    counter, real_resolve = [0], storage.resolve
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 5)  # 6 attempts, no waiting
    monkeypatch.setattr(storage, "is_local", lambda fs: False)  # copies + deletes, retried
    monkeypatch.setattr(storage, "resolve",
                        lambda path: (FailingFS(real_resolve(path)[0], counter, window),
                                      real_resolve(path)[1]))
    try:
        publish.publish_or_roll_back(staging, out, "new")
        outcome = "ok"
    except PipelineError as e:
        outcome = str(e)
    monkeypatch.undo()
    publish.recover(out)  # what the next run does first
    files = {rel: storage.read_bytes(storage.join(out, rel)) for rel, _ in storage.list_files(out)
             if not rel.startswith("_staging-")}
    return outcome, files


def test_a_failing_store_during_publish_is_retried_or_leaves_a_whole_set(tmp_path, monkeypatch):
    expect_new = {**NEW, "_SUCCESS": b"new\n"}
    steps = 0
    while True:  # a state change that fails once is retried: the publish completes
        outcome, files = _publish_with_failures(tmp_path, monkeypatch, range(steps, steps + 1))
        assert outcome == "ok" and files == expect_new, (steps, outcome)
        if steps > 40:
            break
        steps += 1
    kinds = set()
    for n in range(0, 30):  # fails 6 times in a row (past the retries) at step n, or forever
        for window in (range(n, n + 6), range(n, 10 ** 9)):
            outcome, files = _publish_with_failures(tmp_path, monkeypatch, window)
            assert files in (OLD, expect_new), (window, outcome, sorted(files))
            if outcome == "ok":  # only the clean-up after the switch had failed
                assert files == expect_new, window
                kinds.add("published")
            elif "rolled back" in outcome:
                assert files == OLD and "the previous set is whole" in outcome, outcome
                kinds.add("rolled back")
            else:
                assert "rolling it back failed too" in outcome and "no _SUCCESS" in outcome
                kinds.add("left for the next run's recover")
    assert len(kinds) == 3, kinds  # all three outcomes happened
