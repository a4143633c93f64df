"""The output lease (pipeline/lease.py) on the local disk: one holder, a clear refusal naming it,
takeover of an expired or dead lease, renewal, loss detected, and races between many takers.
Fast; tests/test_s3.py runs the same races against S3's conditional writes, and
tests/test_faults.py runs two real prediction jobs into one --out."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline import lease as leaselib
from pipeline.lease import Lease, LeaseHeld, LeaseLost


def _race(out: str, n: int = 8) -> list:
    """n threads start together and each tries to take the lease on ``out``: the winners."""
    barrier, won, errors = threading.Barrier(n), [], []

    def take(i):
        lease = Lease(out, f"run-{i}", seconds=30)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as e:
            errors.append(str(e))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) + len(errors) == n
    return won


def _write_lease(out, **fields) -> None:
    base = dict(run_id="old-run", host="elsewhere", pid=1, process="", started=0.0,
                expires=time.time() + 3600)
    base.update(fields)
    os.makedirs(out, exist_ok=True)
    name = os.path.join(out, leaselib.LEASE_FILE + ".0")
    if os.path.exists(name):
        name = os.path.join(out, leaselib.LEASE_FILE + ".9")  # a newer generation
    with open(name, "w") as f:
        json.dump(base, f)


def test_a_second_run_is_refused_with_a_line_naming_the_holder(tmp_path):
    out = str(tmp_path / "out")
    with Lease(out, "20261129T170000Z-aaaaaa", seconds=30) as first:
        holder = leaselib.read_holder(out)
        assert holder.run_id == "20261129T170000Z-aaaaaa" and holder.pid == os.getpid()
        assert holder.host == socket.gethostname() and holder.expires > time.time() + 20
        with pytest.raises(LeaseHeld) as refused:
            Lease(out, "20261129T170001Z-bbbbbb", seconds=30).acquire()
        message = str(refused.value)
        for part in ("run 20261129T170000Z-aaaaaa", f"host {socket.gethostname()}",
                     f"pid {os.getpid()}", "started 20", "lease expires 20", "nothing done"):
            assert part in message, message
        assert leaselib.read_holder(out).run_id == first.run_id  # the refusal changed nothing
    assert leaselib.read_holder(out) is None  # released at the end
    assert os.listdir(out) == []  # no temporary files left
    Lease(out, "third", seconds=30).acquire()  # free again


def test_the_lease_is_released_when_the_run_fails(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ZeroDivisionError):
        with Lease(out, "failing", seconds=30):
            1 / 0
    assert leaselib.read_holder(out) is None


def test_an_expired_lease_is_taken_over_with_a_log_line(tmp_path, caplog):
    out = str(tmp_path / "out")
    _write_lease(out, run_id="crashed-run", host="node-7", expires=time.time() - 1)
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        with Lease(out, "new-run", seconds=30):
            assert leaselib.read_holder(out).run_id == "new-run"
    assert "took over the lease" in caplog.text and "crashed-run on host node-7" in caplog.text
    assert "expired at" in caplog.text


def test_a_live_lease_of_another_host_is_not_taken_over(tmp_path):
    out = str(tmp_path / "out")
    _write_lease(out, run_id="busy-run", host="node-7", pid=os.getpid(), expires=time.time() + 60)
    with pytest.raises(LeaseHeld, match="busy-run on host node-7"):
        Lease(out, "new-run", seconds=30).acquire()


def test_a_lease_whose_process_on_this_machine_ended_is_taken_over_at_once(tmp_path, caplog):
    """A job killed on this machine (os._exit, SIGKILL) is rerun at once, not after the expiry."""
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("needs /proc")
    out = str(tmp_path / "out")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    pid = int(child.stdout)
    me = leaselib._process_identity(os.getpid())
    gone = me.rsplit("/", 1)[0] + "/12345"  # same machine and pid namespace, a process gone
    _write_lease(out, run_id="killed-run", host=socket.gethostname(), pid=pid, process=gone,
                 expires=time.time() + 3600)
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        Lease(out, "rerun", seconds=30).acquire()
    assert f"its process {pid} on this machine has ended" in caplog.text
    # while the process lives (its real identity), the same lease is respected
    _write_lease(tmp_path / "o2", run_id="alive-run", host=socket.gethostname(),
                 pid=os.getpid(), process=me, expires=time.time() + 3600)
    with pytest.raises(LeaseHeld, match="alive-run"):
        Lease(str(tmp_path / "o2"), "rerun", seconds=30).acquire()


def test_an_unreadable_lease_counts_as_expired(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / (leaselib.LEASE_FILE + ".0")).write_text("{torn")
    Lease(str(out), "new-run", seconds=30).acquire()
    assert leaselib.read_holder(str(out)).run_id == "new-run"


def test_the_holder_renews_its_lease_while_it_lives(tmp_path):
    out = str(tmp_path / "out")
    # a 2 s lease renewed every 0.67 s: a renewal thread starved for a second on a loaded
    # 2-core machine still renews in time (a 0.9 s lease left it 0.6 s)
    with Lease(out, "long-run", seconds=2):
        first = leaselib.read_holder(out).expires
        time.sleep(2.5)  # ~3 renewals, past the first expiry
        later = leaselib.read_holder(out)
        assert later.run_id == "long-run" and later.expires > first + 1
        # never expired in between: a second run is still refused
        with pytest.raises(LeaseHeld):
            Lease(out, "other", seconds=2).acquire()


def test_a_lease_taken_over_is_noticed_and_left_alone(tmp_path):
    out = str(tmp_path / "out")
    lease = Lease(out, "slow-run", seconds=30).acquire()
    _write_lease(out, run_id="thief", expires=time.time() + 60)  # e.g. after a long pause
    with pytest.raises(LeaseLost, match=r"slow-run lost its lease .* \(now held by run thief"):
        lease.check()
    lease.release()  # must not delete the new holder's lease
    assert leaselib.read_holder(out).run_id == "thief"
    assert sorted(os.listdir(out)) == [leaselib.LEASE_FILE + ".9"]  # its own generation gone


@pytest.mark.parametrize("state", ["empty", "expired"])
def test_of_many_runs_racing_for_one_lease_exactly_one_wins(tmp_path, state):
    for round_ in range(30):
        out = str(tmp_path / f"r{round_}")
        if state == "expired":
            _write_lease(out, run_id="crashed", expires=time.time() - 5)
        winners = _race(out)
        assert len(winners) == 1, f"round {round_}: {[w.run_id for w in winners]}"
        assert leaselib.read_holder(out).run_id == winners[0].run_id
        names = os.listdir(out)  # one generation left, no stray temporary files
        assert len(names) == 1 and names[0].startswith(leaselib.LEASE_FILE + "."), names


def test_a_lease_period_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        Lease(str(tmp_path), "x", seconds=0)


def test_the_best_effort_lease_of_stores_without_conditional_writes(tmp_path, monkeypatch):
    """The read-back fallback (GCS, S3 stores without conditional writes): one holder when runs
    do not start within the settle time; a refusal naming it; takeover once expired."""
    monkeypatch.setattr(leaselib, "SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(leaselib, "_backend",
                        lambda out: leaselib._ReadBackBackend(os.path.join(out, "_LEASE")))
    out = str(tmp_path / "out")
    with Lease(out, "first", seconds=30) as first:
        with pytest.raises(LeaseHeld, match="run first on host"):
            Lease(out, "second", seconds=30).acquire()
        first.check()
    assert leaselib.read_holder(out) is None
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "_LEASE"), "w") as f:
        json.dump(dict(run_id="old", host="h", pid=1, process="", started=0.0,
                       expires=time.time() - 1), f)
    with Lease(out, "taker", seconds=30):
        assert leaselib.read_holder(out).run_id == "taker"
