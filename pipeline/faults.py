"""Fault injection for the tests: ``RESNET_PIPELINE_FAULT=<point>`` ends the process at that
point with exit status 17, as a crash (no cleanup, no atexit) would."""

from __future__ import annotations

import os

EXIT_STATUS = 17


def point(name: str) -> None:
    if os.environ.get("RESNET_PIPELINE_FAULT") == name:
        os._exit(EXIT_STATUS)
