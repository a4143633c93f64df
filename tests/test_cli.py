"""What every job's command line does with errors (jobs/_cli.py, pipeline/errors.py): the
project's own errors and OSError get one line (exit 1, a UsageError exit 2); bugs keep their
traceback."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import UsageError


def test_programming_errors_keep_their_traceback_user_errors_get_one_line(capsys):
    """RuntimeError (a torch shape or device bug) used to print one line and exit 1, and so did
    any ValueError, numpy's and torch's included: user errors are the project's own types."""
    from jobs import _cli
    from pipeline.errors import InputError, PipelineError

    def job(exc):
        @_cli.reports_errors
        def main(argv=None):
            raise exc
        return main

    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        job(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))()
    assert job(PipelineError("run r stopped"))() == 1
    assert job(UsageError("--actors 3 x ..."))() == 2
    assert job(FileNotFoundError("manifest m does not exist"))() == 1
    assert job(InputError("manifest m is not valid JSON"))() == 1
    try:
        np.zeros(3).reshape(2, 2)  # a numpy bug in the project's code: a ValueError
    except ValueError as numpy_bug:
        with pytest.raises(ValueError, match="cannot reshape"):
            job(numpy_bug)()
    assert capsys.readouterr().err.splitlines() == [
        "error: run r stopped", "error: --actors 3 x ...", "error: manifest m does not exist",
        "error: manifest m is not valid JSON"]
