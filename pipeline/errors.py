"""The project's own exception types: what a job reports as one line, and what keeps its traceback.

A job (``jobs/_cli.reports_errors``) prints ``error: <message>`` and exits 1 for the
``USER_ERRORS``: a ``PipelineError`` (its ``InputError``: bad input the project checked) and an
``OSError`` (a missing or unreadable file, a store that does not answer); it exits 2 for a
``UsageError`` (settings that cannot work). Anything else keeps its traceback: a torch shape or
device bug (``RuntimeError``), a ``TypeError``, and a ``ValueError`` from numpy, torch or Python
itself is a bug to report, not a line to read.
"""

from __future__ import annotations


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
