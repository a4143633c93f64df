"""Samples that failed to decode: one Parquet layout for every job, and one limit rule.

``failures.parquet`` (written by jobs.predict into OUT/ and by jobs.finetune into STORAGE/NAME/)
has one row per failed sample: ``key``, ``shard``, ``split`` and ``error`` (all strings), and
zero rows when none failed, so a reader never has to guess. The same limit decides when too
many bad items stop a job: decode failures (``--max-failed-fraction``) and skipped source files
(``jobs.shard --max-skipped-fraction``).
"""

from __future__ import annotations

from pipeline import storage

COLUMNS = ("key", "shard", "split", "error")


def rows(batch: dict, split: str) -> list[dict]:
    """The failed samples of a decoded batch (contract 2: ``key``, ``shard`` and ``error``
    arrays; "" where the sample decoded) as failures rows of ``split``."""
    import numpy as np

    bad = np.flatnonzero(np.asarray(batch["error"]) != "")
    return [{"key": str(batch["key"][i]), "shard": str(batch["shard"][i]), "split": split,
             "error": str(batch["error"][i])} for i in bad]


def write(path: str, failures: list[dict]) -> None:
    """Write ``failures`` (dicts with COLUMNS) to ``path`` as Parquet, atomically."""
    import pyarrow as pa

    storage.write_parquet_atomic(path, pa.table(
        {c: pa.array([str(f[c]) for f in failures], pa.string()) for c in COLUMNS}))


def over_limit(bad: int, total: int, fraction: float) -> bool:
    """True when ``bad`` of ``total`` items is more than ``fraction`` (0..1) of them: the one rule
    behind every --max-*-fraction flag (0 allows none)."""
    return bad > fraction * total
