"""Wall-time budgets for a job: ``--deadline`` (the whole run) and ``--max-wait`` (how long a
plan may wait for the resources it needs), as a scheduled job's runner expects them (a
Kubernetes Job's ``activeDeadlineSeconds``, KubeRay's RayJob, an Airflow task's timeout).

A budget is enforced in the job's own process, whatever it is blocked on: a watchdog thread
sends the main thread a signal when a budget runs out, and the signal handler interrupts it as
Ctrl-C does (a KeyboardInterrupt, the one exception Ray's blocking calls pass on from a signal
handler). ``ray.get``, Ray Data's iterators and Ray Train's ``fit`` all check for signals while
they wait, so a hung actor, a worker group that cannot start or a node that never comes cannot
hold the job past its budget. Where the job handles errors (``limit``, ``translated``), the
interrupt becomes the budget's exception (``DeadlineExceeded``, ``ResourcesUnavailable``). What the job was doing when it stopped (``doing``, and the
newest ``progress.Progress`` line) is in the message.

The exception unwinds the job like any other error: leases are released, the prediction's
staging folder is never published (the previous set stays whole), Ray Train's last checkpoint
stays, and the Ray work the job started ends with it (Ray Data shuts its executor down when its
iterator is closed; the job's actors and tasks end with its driver). A few steps must not be
cut in half even by a budget: the publish switch, a history row's write. They run inside
``deferred()``, and a budget that runs out there raises as soon as the step is done.

The budgets need the main thread (signals go there); elsewhere, e.g. a test calling a job's
``main`` from a thread, only ``check`` (called between batches) enforces them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time

from pipeline.errors import EXIT_DEADLINE, EXIT_RESOURCES, PipelineError, UsageError

log = logging.getLogger(__name__)

SIGNAL = signal.SIGUSR2  # not SIGALRM: pytest-timeout and others own that one


class DeadlineExceeded(PipelineError):
    """The job's --deadline ran out (exit 6): it stopped its work, publishing nothing new."""
    exit_code = EXIT_DEADLINE


class ResourcesUnavailable(PipelineError):
    """The cluster did not give the resources a plan needs within --max-wait (exit 7)."""
    exit_code = EXIT_RESOURCES


DEADLINE_HELP = ("wall-time budget for the whole job: seconds or 90m, 8h, 1d; 0: none. When it "
                 "runs out the job stops its Ray work, publishes nothing new (the previous "
                 "outputs stay whole) and exits 6 with a line saying what it was doing and how "
                 "far it got")
MAX_WAIT_HELP = ("how long the job waits for the CPUs/GPUs its plan needs on a cluster that "
                 "may grow (RAY_ADDRESS: nodes the autoscaler adds), and for its first batch "
                 "of results; it says what it waits for every minute, then exits 7 naming the "
                 "resources. Seconds or 15m, 1h; 0: no limit")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(flag: str, text: str) -> float:
    """Seconds of a duration flag: ``90`` or ``90s``, ``15m``, ``8h``, ``1d``; ``0`` or ``''``
    mean no limit (0.0). UsageError (exit 2) naming the flag for anything else."""
    if str(text).strip() in ("", "0", "none"):
        return 0.0
    m = _DURATION.match(str(text))
    if not m:
        raise UsageError(f"{flag} {text!r} is not a duration: give seconds or a number with s, "
                         f"m, h or d (e.g. 900, 15m, 8h); 0 for no limit")
    return float(m.group(1)) * _UNIT[m.group(2)]


def duration_text(seconds: float) -> str:
    """``seconds`` as a flag would say it: ``45s``, ``15m``, ``8h``, ``1h30m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v)


# --- what the job is doing, for the message ----------------------------------------------------

_doing: list[str] = []


@contextlib.contextmanager
def doing(text: str):
    """Name what the job is doing inside this block (innermost wins in ``activity``)."""
    _doing.append(text)
    try:
        yield
    finally:
        _doing.pop()


def activity() -> str:
    """What the job is doing now and how far it got: the innermost ``doing`` text and the
    newest running ``progress.Progress`` line; 'starting' before either."""
    from pipeline import progress

    parts = [_doing[-1]] if _doing else []
    line = progress.current_line()
    if line:
        parts.append(line)
    return ": ".join(parts) or "starting"


# --- budgets -------------------------------------------------------------------------------------


class Budget:
    """One wall-time budget: ``seconds`` from now (monotonic); when it runs out, the main thread
    gets ``exception(elapsed)`` raised (``arm``)."""

    def __init__(self, seconds: float, exception, clock=time.monotonic):
        self.seconds, self.exception, self.clock = float(seconds), exception, clock
        self.t0 = clock()
        self.due = self.t0 + self.seconds
        self.timer: threading.Timer | None = None

    def remaining(self) -> float:
        return max(0.0, self.due - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.due

    def elapsed(self) -> float:
        return self.clock() - self.t0


_budgets: list[Budget] = []
_defer = {"depth": 0, "pending": False}
_main = {"ident": None, "previous": None}
_fired: list = []  # the exception of the budget whose signal became a KeyboardInterrupt


def _due() -> Budget | None:
    """The budget that ran out first (taken off the list), or None."""
    due = [b for b in _budgets if b.expired()]
    if not due:
        return None
    first = min(due, key=lambda b: b.due)
    _budgets.remove(first)
    return first


def _raise_due() -> None:
    first = _due()
    if first is not None:
        raise first.exception(first.elapsed())


def _on_signal(signum, frame) -> None:
    """A budget ran out: raise KeyboardInterrupt in the main thread, as Ctrl-C would. Ray's
    blocking calls turn any other exception raised in a signal handler into an exit of the
    process (``SystemExit``), but a KeyboardInterrupt into one of their own; ``translate``
    makes it the budget's exception again."""
    if _defer["depth"]:
        _defer["pending"] = True
        return
    first = _due()
    if first is not None:  # the message now, while the job is where the budget found it
        _fired.append(first.exception(first.elapsed()))
        raise KeyboardInterrupt(f"stopped by a wall-time budget of {first.seconds:g} s")


def translate(e: BaseException) -> BaseException:
    """For a KeyboardInterrupt that a budget caused (``_on_signal``), the budget's exception
    (``DeadlineExceeded``, ``ResourcesUnavailable``); else ``e`` itself."""
    if isinstance(e, KeyboardInterrupt) and _fired:
        exception = _fired.pop()
        _fired.clear()
        return exception
    return e


@contextlib.contextmanager
def translated():
    """Inside: a KeyboardInterrupt a budget caused comes out as the budget's exception."""
    try:
        yield
    except KeyboardInterrupt as e:
        raise translate(e) from None


def _fire() -> None:
    ident = _main["ident"]
    if ident is not None:
        signal.pthread_kill(ident, SIGNAL)


def arm(budget: Budget) -> Budget:
    """Start enforcing ``budget``: its exception is raised in the main thread when it runs out
    (outside the main thread: at the next ``check``)."""
    _budgets.append(budget)
    if threading.current_thread() is not threading.main_thread():
        return budget
    if _main["ident"] is None:
        _main["ident"] = threading.main_thread().ident
        _main["previous"] = signal.signal(SIGNAL, _on_signal)
    budget.timer = threading.Timer(budget.remaining(), _fire)
    budget.timer.daemon = True
    budget.timer.start()
    return budget


def disarm(budget: Budget | None) -> None:
    """Stop enforcing ``budget`` (it ended in time, or its exception was raised); None: no-op."""
    if budget is None:
        return
    if budget.timer is not None:
        budget.timer.cancel()
    if budget in _budgets:
        _budgets.remove(budget)
    if not any(b.timer for b in _budgets) and _main["ident"] is not None:
        signal.signal(SIGNAL, _main["previous"] or signal.SIG_DFL)
        _main["ident"] = _main["previous"] = None


@contextlib.contextmanager
def limit(seconds: float, exception):
    """Enforce a budget of ``seconds`` (0: none) over this block; ``exception(elapsed)`` builds
    what is raised when it runs out."""
    if not seconds or seconds <= 0:
        yield None
        return
    budget = arm(Budget(seconds, exception))
    try:
        with translated():
            yield budget
    finally:
        disarm(budget)


def job_deadline(seconds: float, flag: str = "--deadline"):
    """``limit`` for a whole job: DeadlineExceeded naming ``flag``, the budget, the time spent
    and ``activity()``."""
    def exceeded(elapsed: float) -> DeadlineExceeded:
        return DeadlineExceeded(f"deadline exceeded: {flag} {duration_text(seconds)} ran out "
                                f"after {duration_text(elapsed)} while {activity()}")
    return limit(seconds, exceeded)


@contextlib.contextmanager
def deferred(drop: bool = False):
    """A step that a budget must not cut in half (the publish switch, a history row): a budget
    that runs out inside raises once the block is done. ``drop``: the last step of a job (its
    record and report), after which there is nothing left to stop: a budget that ran out
    inside is logged, not raised."""
    _defer["depth"] += 1
    try:
        yield
    finally:
        _defer["depth"] -= 1
    if not _defer["depth"] and _defer["pending"]:
        _defer["pending"] = False
        if drop:
            for b in [b for b in _budgets if b.expired()]:
                _budgets.remove(b)
                log.warning("%s (during the job's last writes, which were finished)",
                            b.exception(b.elapsed()))
            return
        _raise_due()


def check() -> None:
    """Raise a budget that has run out now (for code outside the main thread, and for loops
    that want to stop at a clean point)."""
    if not _defer["depth"]:
        _raise_due()
