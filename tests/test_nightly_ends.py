"""A nightly that always ends (issue 37): --deadline, one night at a time per history folder,
a night whose driver died named by the next, a history row and a report for every outcome, and
--notify-command. Hangs are made with faults.hold; every test ends in well under a minute."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jobs import nightly_eval, predict as predict_job
from pipeline import faults, history as historylib, lease as leaselib, metrics, regression
from tests.raycluster import ROOT

SMALL = ["--precision", "fp32", "--batch-size", "8", "--resize-size", "73", "--crop-size", "64",
         "--no-progress"]


def _run(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def held(name: str, gate):
    """faults.hold(name) in this process (the driver) until the test ends: never released, so
    only a deadline (or a kill) gets the job past it."""
    os.environ[faults.HOLD] = f"{name}:{gate}"
    try:
        yield
    finally:
        os.environ.pop(faults.HOLD, None)


def test_a_deadline_stops_the_night_records_every_set_and_publishes_nothing(shard_set, tmp_path):
    history, val = tmp_path / "history", str(shard_set / "val.json")
    notified = tmp_path / "notified.json"
    t0 = time.monotonic()
    with held("before_publish", tmp_path / "never"):
        code, out, err = _run(nightly_eval.main, [
            "--data", f"a={val}", "--data", f"b={val}", "--weights", "none",
            "--history", str(history), "--deadline", "25s",
            "--notify-command", f"cat > {notified}", *SMALL])
    assert code == 6, err
    assert time.monotonic() - t0 < 60
    assert "--deadline 25s ran out" in err and "predicting set a" in err, err
    run_id = historylib.read_history(str(history))["run_id"].iloc[0]
    record = json.loads((history / "runs" / run_id / "nightly.json").read_text())
    assert record["verdict"] == regression.DEADLINE and record["exit_code"] == 6
    assert [s["verdict"] for s in record["sets"]] == [regression.DEADLINE] * 2
    assert record["sets"][1]["error"].startswith("not started: deadline exceeded")
    rows = historylib.read_history(str(history))
    assert list(rows["dataset"]) == ["a", "b"] and set(rows["verdict"]) == {regression.DEADLINE}
    assert rows["top1"].isna().all() and rows["error"].str.contains("--deadline 25s").all()
    # nothing published: the held set has no _SUCCESS, its staging is left for recover
    assert not (history / "runs" / run_id / "a" / "_SUCCESS").exists()
    page = (history / "latest.html").read_text()
    assert "deadline exceeded" in page and run_id in page
    sent = json.loads(notified.read_text())
    assert sent["verdict"] == regression.DEADLINE and sent["exit_code"] == 6
    # the night's lease is released: the next night runs, and does not compare with this one
    code, out, err = _run(nightly_eval.main, ["--data", f"a={val}", "--weights", "none",
                                              "--history", str(history), *SMALL])
    assert code == 0, err
    assert "a: first run" in out.replace("== set ", "")


def test_a_predict_past_its_deadline_leaves_the_published_set_whole(shard_set, tmp_path):
    out_dir, val = tmp_path / "eval", str(shard_set / "val.json")
    base = ["--data", val, "--weights", "none", "--out", str(out_dir), *SMALL]
    assert _run(predict_job.main, base)[0] == 0
    before = (out_dir / "_SUCCESS").read_text()
    rows = metrics.read_predictions(str(out_dir))
    with held("before_publish", tmp_path / "never"):
        code, _, err = _run(predict_job.main, base + ["--deadline", "20s"])
    assert code == 6 and "Nothing published to" in err and "stays whole" in err, err
    assert (out_dir / "_SUCCESS").read_text() == before
    assert metrics.read_predictions(str(out_dir)).equals(rows)
    assert leaselib.read_holder(str(out_dir)) is None  # the lease was released


def test_a_second_night_on_the_same_history_is_refused(shard_set, tmp_path):
    history = tmp_path / "history"
    other = leaselib.Lease(str(history), "20261206T010000Z-other").__enter__()
    try:
        code, out, err = _run(nightly_eval.main, [
            "--data", str(shard_set / "val.json"), "--weights", "none",
            "--history", str(history), *SMALL])
    finally:
        other.__exit__(None, None, None)
    assert code == 8, err
    assert "previous night still running: run 20261206T010000Z-other" in err
    assert not (history / "runs").exists() and not (history / "history").exists()


def test_a_failed_night_leaves_a_history_row_a_report_and_a_notification(shard_set, tmp_path):
    history, bad = tmp_path / "history", tmp_path / "weights.pt"
    bad.write_bytes(b"not weights")
    notified = tmp_path / "notified.json"
    code, out, err = _run(nightly_eval.main, [
        "--data", str(shard_set / "val.json"), "--weights", str(bad),
        "--history", str(history), "--notify-command", f"cat > {notified}", *SMALL])
    assert code == 1, err
    rows = historylib.read_history(str(history))
    assert list(rows["verdict"]) == [regression.FAILED] and rows["error"].iloc[0]
    assert "failed" in (history / "latest.html").read_text()
    assert json.loads(notified.read_text())["verdict"] == regression.FAILED


def test_a_notify_command_that_fails_is_a_warning_and_the_exit_code_stands(shard_set, tmp_path):
    code, _, err = _run(nightly_eval.main, [
        "--data", str(tmp_path / "missing.json"), "--weights", "none",
        "--history", str(tmp_path / "h"), "--notify-command", "echo no pager >&2; exit 3"])
    assert code == 2 and "no such manifest" in err
    assert "warning: --notify-command exited 3: no pager" in err


def test_a_killed_nights_lease_lapses_and_the_next_night_names_it(shard_set, tmp_path, ray_local):
    """The first night runs as cron runs it (its own process, joined to this session's Ray
    cluster), is held before it publishes, and is SIGKILLed: its lease stays behind. The next
    night finds the lease's process gone, takes it over, and records the dead night."""
    history, val, gate = tmp_path / "history", str(shard_set / "val.json"), tmp_path / "never"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           faults.HOLD: f"before_publish:{gate}"}
    first = subprocess.Popen([sys.executable, "-m", "jobs.nightly_eval", "--data", f"val={val}",
                              "--weights", "none", "--history", str(history), *SMALL],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while not (tmp_path / "never.reached").exists():
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() - t0 < 120
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    dead = leaselib.read_holder(str(history))
    assert dead is not None and dead.pid == first.pid  # left behind, not yet expired
    code, out, err = _run(nightly_eval.main, ["--data", f"val={val}", "--weights", "none",
                                              "--history", str(history), *SMALL])
    assert code == 0, err
    assert f"previous night {dead.run_id} did not finish" in out
    rows = historylib.read_history(str(history)).set_index("run_id")
    assert rows.loc[dead.run_id, "verdict"] == regression.DID_NOT_FINISH
    assert "ended without finishing" in rows.loc[dead.run_id, "error"]
    record = json.loads((history / "runs" / dead.run_id / "nightly.json").read_text())
    assert record["verdict"] == regression.DID_NOT_FINISH
    assert f"previous night {dead.run_id} did not finish" in (history / "latest.html").read_text()
    # the dead night is no reference: the new one is the set's first run with metrics
    assert len(rows) == 2 and out.count("first run") >= 1


def test_real_labels_on_classes_that_are_not_imagenet_exit_2_before_ray_starts(shard_set,
                                                                               tmp_path):
    """Issue 38: the arguments contradict each other from the start: exit 2 at once, nothing
    written, no Ray cluster started for it (it used to predict for 17 s, then exit 1)."""
    history = tmp_path / "history"
    t0 = time.monotonic()
    code, out, err = _run(nightly_eval.main, [
        "--data", f"val={shard_set / 'val.json'}", "--real-labels", "val=builtin",
        "--weights", "none", "--history", str(history), *SMALL])
    assert code == 2, err
    assert "ReaL labels are ImageNet classes" in err and "drop --real-labels" in err, err
    assert time.monotonic() - t0 < 10 and not history.exists()


def test_bad_flags_are_notified_too(tmp_path):
    """A typo in the cron line exits 2 in argparse, before the night's config exists: the
    --notify-command it names still hears of it."""
    notified = tmp_path / "n.json"
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        nightly_eval.main(["--data", "x.json", "--weights", "none", "--history", "h",
                           "--alpha", "often", "--notify-command", f"cat > {notified}"])
    assert e.value.code == 2
    sent = json.loads(notified.read_text())
    assert sent["exit_code"] == 2 and sent["verdict"] == "error"


@pytest.mark.slow
def test_a_finetune_past_its_deadline_keeps_its_checkpoint_and_the_same_command_resumes(
        shard_set, tmp_path, ray_local):
    """Epoch 1 of 2 is held in the Train workers (faults.hold, armed through the fault file
    this session's Ray workers read): --deadline stops the job with exit 6, saying that 1 of 2
    epochs were done; the same command, unheld, resumes at epoch 2 and ends with model.pt."""
    cmd = [sys.executable, "-m", "jobs.finetune", "--train", str(shard_set / "train.json"),
           "--val", str(shard_set / "val.json"), "--weights", "none", "--epochs", "2",
           "--num-workers", "1", "--cpus-per-worker", "1", "--threads", "1", "--batch-size", "8",
           "--crop-size", "32", "--precision", "fp32", "--storage-path", str(tmp_path / "runs"),
           "--name", "t"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    faults.arm_hold("train_epoch_1", str(tmp_path / "never"))
    try:
        held = subprocess.run(cmd + ["--deadline", "90s"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=400)
    finally:
        faults.disarm()
    assert held.returncode == 6, held.stdout[-2000:] + held.stderr[-3000:]
    assert "--deadline 1m30s ran out" in held.stderr and "fine-tuning run t" in held.stderr
    assert "1 of 2 epochs were done" in held.stderr and "the same command resumes" in held.stderr
    assert not (tmp_path / "runs" / "t" / "model.pt").exists()
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "resuming run t at epoch 2 of 2" in again.stdout
    assert (tmp_path / "runs" / "t" / "model.pt").exists()
