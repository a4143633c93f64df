"""Wall-time budgets (pipeline/deadline.py) and bounded waits for resources
(resources.await_resources): each raised in the main thread whatever it is blocked on."""

from __future__ import annotations

import re
import threading
import time

import pytest

from pipeline import deadline, progress, resources
from pipeline.errors import EXIT_DEADLINE, EXIT_RESOURCES, UsageError, exit_code_of


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("15m", 900), ("8h", 28800),
                                          ("1d", 86400), ("1.5h", 5400), ("0", 0), ("", 0)])
def test_durations(text, seconds):
    assert deadline.parse_duration("--deadline", text) == seconds


@pytest.mark.parametrize("text", ["8 hours", "-5", "h", "1h30m", "abc"])
def test_a_bad_duration_names_the_flag(text):
    with pytest.raises(UsageError, match="--max-wait"):
        deadline.parse_duration("--max-wait", text)


def test_duration_text():
    assert [deadline.duration_text(s) for s in (45, 900, 28800, 5400, 3661)] == [
        "45s", "15m", "8h", "1h30m", "1h1m1s"]


def test_a_deadline_stops_a_blocked_main_thread_and_says_how_far_it_got():
    t0 = time.monotonic()
    with pytest.raises(deadline.DeadlineExceeded) as e:
        with deadline.job_deadline(0.5):
            with deadline.doing("predicting set val"):
                with progress.Progress(100, "predict val", enabled=True, tty=False,
                                       emit=lambda line: None) as bar:
                    bar.update(30)
                    time.sleep(30)  # blocked in a system call: the signal wakes it
    assert time.monotonic() - t0 < 5
    text = str(e.value)
    assert re.match(r"deadline exceeded: --deadline [01]s ran out after [01]s while predicting "
                    r"set val: predict val: 30 of 100 images \(30%\)", text), text
    assert exit_code_of(e.value) == EXIT_DEADLINE == 6
    assert not deadline._budgets and progress.current_line() == ""


def test_a_deadline_waits_for_a_deferred_step_then_raises():
    steps = []
    with pytest.raises(deadline.DeadlineExceeded):
        with deadline.job_deadline(0.3):
            with deadline.deferred():
                time.sleep(1.0)  # the budget runs out in here: the step still ends
                steps.append("switched")
            steps.append("after")  # never: raised as the deferred step ended
    assert steps == ["switched"]


def test_a_deadline_during_the_last_writes_is_dropped_not_raised(caplog):
    with deadline.job_deadline(0.3):
        with deadline.deferred(drop=True):
            time.sleep(1.0)
        done = True
    assert done and "during the job's last writes" in caplog.text


def test_a_job_that_ends_in_time_is_not_stopped_and_leaves_no_timer():
    with deadline.job_deadline(5):
        pass
    time.sleep(0.1)
    assert not deadline._budgets and not any(
        t.name.startswith("Thread") and isinstance(t, threading.Timer)
        for t in threading.enumerate() if t.is_alive())


def test_a_budget_outside_the_main_thread_is_enforced_by_check():
    errors = []

    def work():
        try:
            with deadline.job_deadline(0.2):
                time.sleep(0.4)
                deadline.check()
        except deadline.DeadlineExceeded as e:
            errors.append(e)
    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    assert len(errors) == 1


def test_a_deadline_stops_a_blocking_ray_get(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    def forever():
        time.sleep(3600)

    ref = forever.remote()
    t0 = time.monotonic()
    with pytest.raises(deadline.DeadlineExceeded):
        with deadline.job_deadline(1.0):
            ray.get(ref)
    assert time.monotonic() - t0 < 10
    ray.cancel(ref, force=True)


# --- --max-wait: the cluster's resources -----------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_a_plan_the_cluster_cannot_hold_waits_at_most_max_wait_saying_so_every_minute():
    clock, lines = FakeClock(), []
    with pytest.raises(deadline.ResourcesUnavailable) as e:
        resources.await_resources(
            (2.0, 1.0), 180, what="the plan (1 predictor actor x (1 CPU, 1 GPU))",
            cluster_now=lambda: resources.Cluster(8, 0, can_grow=True), clock=clock,
            sleep=clock.sleep, emit=lines.append)
    assert clock.now == 180
    assert len(lines) == 3 and all("1 GPU short" in line for line in lines), lines
    assert lines[1].endswith("1m of --max-wait 3m")
    text = str(e.value)
    assert "needs 2 CPUs and 1 GPU, this Ray cluster has 8 CPUs and 0 GPUs after waiting 3m " \
           "(--max-wait 3m): 1 GPU short" in text and "nothing written" in text
    assert exit_code_of(e.value) == EXIT_RESOURCES == 7


def test_resources_that_come_end_the_wait():
    clock = FakeClock()
    states = iter([resources.Cluster(2, 0, True)] * 4 + [resources.Cluster(10, 2, True)])
    got = resources.await_resources((4.0, 2.0), 900, cluster_now=lambda: next(states),
                                    clock=clock, sleep=clock.sleep, emit=lambda line: None)
    assert got.gpus == 2 and clock.now == 4 * resources.WAIT_POLL_SECONDS


def test_a_plan_that_fits_does_not_wait():
    clock = FakeClock()
    resources.await_resources((1.5, 0.0), 0, cluster_now=lambda: resources.Cluster(2, 0),
                              clock=clock, sleep=clock.sleep, emit=lambda line: None)
    assert clock.now == 0


def test_plans_say_what_they_need():
    predict = resources.plan_prediction(resources.Cluster(8, 2, can_grow=True), 2, True)
    assert predict.needs() == (3.0, 2.0)  # 2 actors x 1 CPU + one decode task; 2 GPUs
    train = resources.plan_training(resources.Cluster(8, 4), 4, True)
    assert train.needs() == (5.0, 4.0)
