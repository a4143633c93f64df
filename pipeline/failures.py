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


def write(path: str, failures: list[dict]) -> None:
    """Write ``failures`` (dicts with COLUMNS) to ``path`` as Parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: pa.array([str(f[c]) for f in failures], pa.string()) for c in COLUMNS})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(path, buf.getvalue().to_pybytes())


def over_limit(bad: int, total: int, fraction: float) -> bool:
    """True when ``bad`` of ``total`` items is more than ``fraction`` (0..1) of them: the one rule
    behind every --max-*-fraction flag (0 allows none)."""
    return bad > fraction * total
