"""Publishing a prediction run exactly once (contract 3 in docs/DESIGN.md): the protocol alone.

A run writes everything into ``OUT/_staging-<run_id>``; ``publish`` switches it in, ``recover``
finishes or rolls back a switch a crash interrupted:

    OUT/predictions/part-*.parquet, OUT/failures.parquet, OUT/summary.json   the published set
    OUT/_SUCCESS                                                             written last

Publishing moves the old set to OUT/_previous (its _SUCCESS first), marks it whole there
(_previous/_MOVED), moves the new one in, writes _SUCCESS, then deletes _previous. A run that
dies before that leaves the previous set untouched; one that dies inside it is rolled back by
the next run's ``recover``. Moves are renames on a local disk and copies + deletes on an object
store; the protocol holds for both (see ``recover``). ``faults.point`` names the crash points
the tests use.
"""

from __future__ import annotations

import time
import uuid

from pipeline import faults, storage
from pipeline.errors import PipelineError

ITEMS = ("predictions", "failures.parquet", "summary.json")


def new_run_id() -> str:
    """The one run-id format of every job: UTC time, sortable, plus a random suffix that keeps
    two runs started in the same second apart (``20261129T020000Z-3fa9c1``)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

MOVED = "_MOVED"  # in OUT/_previous: the old set has left OUT whole


def _remove_stale_staging(out: str) -> None:
    """Staging folders of runs that died before publishing hold nothing anyone reads."""
    import pyarrow.fs as pafs

    fs, p = storage.resolve(out)
    if storage.is_local(fs) and not storage.is_dir(out):
        return
    for info in storage.retrying(fs, f"listing {p}", fs.get_file_info,
                                 pafs.FileSelector(p, allow_not_found=True)):
        if storage.basename(info.path).startswith("_staging-"):
            storage.delete_dir(storage.join(out, storage.basename(info.path)))


def recover(out: str) -> None:
    """Finish or roll back a publish that a crash interrupted.

    Three states, told apart by two markers (OUT/_SUCCESS and OUT/_previous/_MOVED):

    * OUT/_SUCCESS present: OUT holds a whole set (the new one, or the old one that had not
      started to leave); only the clean-up of _previous was left.
    * no _SUCCESS, _MOVED present: the old set was whole in _previous and whatever OUT holds
      is part of the new set: remove it, drop _MOVED, then move the old set back.
    * no _SUCCESS, no _MOVED: the old set was on its way out. On a local disk each item was
      renamed, so it is in one place or the other; on an object store an item can be partly
      in both (copy, then delete). OUT then holds nothing but old objects, so the items in
      _previous are merged back over OUT without deleting anything first.

    _SUCCESS goes back last and _previous is deleted after it, so a crash inside recover leaves
    one of the same three states and the next recover finishes the job.
    """
    _remove_stale_staging(out)
    prev = storage.join(out, "_previous")
    if not storage.exists(prev):
        return
    if storage.exists(storage.join(out, "_SUCCESS")):
        storage.delete_dir(prev)  # the set in OUT is complete: only the clean-up was left
        return
    if storage.exists(storage.join(prev, MOVED)):
        for item in ITEMS:
            _remove(storage.join(out, item))
        storage.delete_file(storage.join(prev, MOVED))
    for item in ITEMS + ("_SUCCESS",):
        src = storage.join(prev, item)
        if storage.exists(src):
            storage.move_tree(src, storage.join(out, item))
    storage.delete_dir(prev)


def _remove(path: str) -> None:
    if storage.is_dir(path):
        storage.delete_dir(path)
    else:
        storage.delete_file(path)


def publish(staging: str, out: str, run_id: str) -> None:
    """Old set to OUT/_previous (its _SUCCESS first), _MOVED, new set in, _SUCCESS, clean up.

    Each move is one rename on a local disk and a copy + delete of every object on an object
    store (``storage.move_tree``); the markers, not the moves, make the switch safe: readers
    trust OUT only while _SUCCESS is there, and ``recover`` rolls back any half-done state.
    """
    prev = storage.join(out, "_previous")
    storage.makedirs(prev)
    for item in ("_SUCCESS",) + ITEMS:  # _SUCCESS first: from here on OUT is not trusted
        if storage.exists(storage.join(out, item)):
            storage.move_tree(storage.join(out, item), storage.join(prev, item))
    storage.write_text_atomic(storage.join(prev, MOVED), run_id + "\n")
    faults.point("mid_publish")
    for item in ITEMS:
        storage.move_tree(storage.join(staging, item), storage.join(out, item))
    storage.write_text_atomic(storage.join(out, "_SUCCESS"), run_id + "\n")  # the switch
    storage.delete_dir(prev)
    storage.delete_dir(staging)


def published_run(out: str) -> str:
    """The run id OUT/_SUCCESS names: the run whose set OUT holds ('' when there is none)."""
    try:
        return storage.read_text(storage.join(out, "_SUCCESS")).strip()
    except FileNotFoundError:
        return ""


def publish_or_roll_back(staging: str, out: str, run_id: str) -> None:
    """``publish``, and when a storage error stops it part-way (after ``storage``'s retries),
    ``recover`` at once: the previous set goes back in place, or, when only the clean-up after
    the switch had failed, the new set stays. Raises PipelineError saying which, and, when the
    roll-back fails too, that OUT has no _SUCCESS (readers do not trust it) until the next run
    into OUT restores the previous set first."""
    try:
        publish(staging, out, run_id)
        return
    except OSError as e:
        error = e
    try:
        recover(out)
    except OSError as e:
        raise PipelineError(f"publishing into {out} failed ({error}), and rolling it back failed "
                            f"too ({e}): {out} has no _SUCCESS, so no reader trusts it; the next "
                            f"run into {out} restores the previous set first") from error
    if published_run(out) == run_id:
        return  # only the clean-up after the switch had failed; recover finished it
    raise PipelineError(f"publishing into {out} failed ({error}); rolled back: the previous set "
                        f"is whole in {out}, nothing of run {run_id} was published") from error
