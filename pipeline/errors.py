"""The project's own exception types: what a job reports as one line, and what keeps its traceback.

A job (``jobs/_cli.reports_errors``) prints ``error: <message>`` and exits 1 for a
``PipelineError`` (and for ``ValueError``/``OSError``: bad input, missing files), and exits 2 for
a ``UsageError`` (settings that cannot work). Anything else, a torch shape or device bug
(``RuntimeError``), a ``TypeError``, keeps its traceback: it is a bug to report, not a line to
read.
"""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A run that cannot go on, or did not do all its work (exit 1). Subclasses RuntimeError so
    callers that caught the RuntimeErrors raised before this type existed still catch it."""


class UsageError(PipelineError):
    """Settings that cannot work on this data or this cluster (exit 2), found before any work
    starts and before any output is touched."""
