"""The project's own exception types: what a job reports as one line, and what keeps its traceback.

A job (``jobs/_cli.reports_errors``) prints ``error: <message>`` and exits 1 for the
``USER_ERRORS``: a ``PipelineError`` (its ``InputError``: bad input the project checked) and an
``OSError`` (a missing or unreadable file, a store that does not answer); it exits 2 for a
``UsageError`` (settings that cannot work), and an error with an ``exit_code`` of its own
(``pipeline.deadline``'s, the nightly's overlap) exits with that. Anything else keeps its traceback: a torch shape or
device bug (``RuntimeError``), a ``TypeError``, and a ``ValueError`` from numpy, torch or Python
itself is a bug to report, not a line to read.
"""

from __future__ import annotations

# Exit codes every job shares (jobs.nightly_eval adds 3-5 for its verdicts: pipeline.regression).
# A PipelineError subclass with an ``exit_code`` attribute exits with it.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_DEADLINE = 6  # --deadline ran out: the work stopped, nothing new published (pipeline.deadline)
EXIT_RESOURCES = 7  # the cluster did not give the plan's resources within --max-wait
EXIT_OVERLAP = 8  # the previous nightly on the same history still runs (its lease is live)


class PipelineError(RuntimeError):
    """A run that cannot go on, or did not do all its work (exit 1). Subclasses RuntimeError so
    callers that caught the RuntimeErrors raised before this type existed still catch it."""


class UsageError(PipelineError):
    """Settings that cannot work on this data or this cluster (exit 2), found before any work
    starts and before any output is touched."""


class InputError(PipelineError, ValueError):
    """Bad input the project checked and refused (exit 1): a manifest, shard, weights file,
    source folder or value that cannot be used, named with what is wrong. A ValueError too, so
    code that caught the ValueErrors raised before this type existed still catches it."""


# What a job reports as one line (exit 1; a UsageError exit 2). A bare ValueError is not here:
# raised by numpy, torch or Python it is a bug, and keeps its traceback.
USER_ERRORS = (PipelineError, OSError)


def exit_code_of(e: BaseException) -> int:
    """The exit code a job ends with for error ``e``: its own ``exit_code`` (a deadline,
    --max-wait, an overlapping night), 2 for a UsageError, else 1."""
    return getattr(e, "exit_code", None) or (EXIT_USAGE if isinstance(e, UsageError)
                                             else EXIT_FAILED)
