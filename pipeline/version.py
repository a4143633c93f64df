"""The code version recorded with every output: git commit (and -dirty) or package version."""

from __future__ import annotations

import functools
import os
import subprocess

from pipeline import __version__


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+g<12-hex commit>``, with ``-dirty`` when tracked files differ from it, of
    the git checkout holding pipeline/; the bare package version when git or a checkout is
    missing (or git takes over 5 s). Computed once per process."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{__version__}+g{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__
