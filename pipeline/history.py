"""The nightly's history store: one row per set per model per run, each in a file of its own, never
rewritten (``pipeline.nightly`` runs the suite; ``pipeline.regression`` judges the rows).

    HISTORY/history/<run_id>--<set>--<model>.parquet   one ``HistoryRow`` (schema
                                                       ``HISTORY_SCHEMA``)

Read the folder as one table: ``read_history``, pandas ``read_parquet("HISTORY/history")``,
DuckDB ``read_parquet('HISTORY/history/*.parquet', union_by_name=true)``. Two runs at once both
land. A history.parquet from before (one rewritten table) is moved into HISTORY/history/ on
first use, rows unchanged (``migrate_history``).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError, UsageError
from pipeline.regression import NO_METRICS, Comparison, RegressionRule, same_data

if TYPE_CHECKING:
    from pipeline.predictions import Summary


def _column(arrow_type: pa.DataType, doc: str = ""):
    return field(default=None, metadata={"arrow": arrow_type, "doc": doc})


@dataclass(frozen=True)
class HistoryRow:
    """One set of one nightly run, as its history file holds it: the one definition of the
    columns (``HISTORY_SCHEMA`` is derived from it; a field's metadata gives its Arrow type and
    what it means). Every field may be None (null), as in rows written before it existed."""
    date: object = _column(pa.timestamp("ms", tz="UTC"),
                           "when the set's prediction started (Parquet has no seconds unit)")
    run_id: object = _column(pa.string(), 'the nightly run')
    dataset: object = _column(pa.string(), "the set's NAME (--data NAME=MANIFEST)")
    model: object = _column(pa.string(), "the model's NAME (--weights NAME=SPEC; unnamed: its "
                                         "torchvision architecture, e.g. resnet18); null in rows "
                                         "from before several models a night, which count as "
                                         "the night's first model")
    dataset_kind: object = _column(pa.string(), "imagenet-val, imagenet-v2, -r, -a, -sketch or ''")
    scored_over: object = _column(pa.string(), '"model classes", or "data classes" for a subset set')
    model_id: object = _column(pa.string())
    arch: object = _column(pa.string(), "the torchvision architecture, e.g. resnet50")
    params: object = _column(pa.int64(), "the model's parameter count")
    weights_sha256: object = _column(pa.string())
    data_manifest: object = _column(pa.string())
    data_manifest_sha256: object = _column(pa.string())
    data_fingerprint: object = _column(pa.string(), 'shards.data_fingerprint: the data, wherever it lives')
    code_version: object = _column(pa.string())
    samples: object = _column(pa.int64())
    failures: object = _column(pa.int64())
    top1: object = _column(pa.float64())
    top1_ci95_lo: object = _column(pa.float64())
    top1_ci95_hi: object = _column(pa.float64())
    top5: object = _column(pa.float64())
    top5_ci95_lo: object = _column(pa.float64())
    top5_ci95_hi: object = _column(pa.float64())
    real_samples: object = _column(pa.int64(), 'ImageNet-ReaL: images with a non-empty label list')
    real_top1: object = _column(pa.float64())
    real_top1_ci95_lo: object = _column(pa.float64())
    real_top1_ci95_hi: object = _column(pa.float64())
    real_top5: object = _column(pa.float64())
    published_top1: object = _column(pa.float64(), 'the published figures checked (fidelity)')
    published_real_top1: object = _column(pa.float64())
    published_source: object = _column(pa.string())
    fidelity: object = _column(pa.string(), '"ok", "failed", "not applicable" (no published figure applied: nightly.json says why), or null (a set without metrics, or a row from before)')
    precision: object = _column(pa.string())
    wall_seconds: object = _column(pa.float64())
    images_per_s: object = _column(pa.float64())
    predictions_dir: object = _column(pa.string())
    previous_run_id: object = _column(pa.string())
    top1_delta_vs_previous: object = _column(pa.float64())
    p_vs_previous: object = _column(pa.float64())
    baseline_run_id: object = _column(pa.string())
    top1_delta_vs_baseline: object = _column(pa.float64())
    p_vs_baseline: object = _column(pa.float64())
    first_model: object = _column(pa.string(), "in a night of several models, the first one "
                                               "(--weights given first): this row's model is "
                                               "compared with it on the same images; null for "
                                               "the first model itself")
    top1_delta_vs_first_model: object = _column(pa.float64(), "top-1 pp, this model minus the "
                                                              "first, over the paired images")
    p_vs_first_model: object = _column(pa.float64(), "McNemar exact p against the first model")
    alpha: object = _column(pa.float64())
    min_effect: object = _column(pa.float64())
    verdict: object = _column(pa.string())
    error: object = _column(pa.string(), 'why a set has no metrics (verdict "failed", "deadline '
                                         'exceeded" or "did not finish"); null otherwise')


@dataclass(frozen=True)
class SetResult:
    """One set of a nightly run, for one model: its name and dataset kind, the prediction
    folder, the prediction summary (summary.json; None when the set failed), the comparisons,
    the fidelity checks
    (``published.Fidelity``), the set's verdict, for a failed set the error, and why a
    published figure did not apply (``published.NotApplicable``)."""
    name: str
    kind: str
    run_dir: str
    summary: Summary | None
    comparisons: list[Comparison]
    fidelity: list
    verdict: str
    error: str = ""
    notes: list = field(default_factory=list)  # lines for the terminal and the report
    not_applicable: list = field(default_factory=list)
    model: str = ""  # the model's name (``nightly.EvalModel``)
    # in a night of several models: this model against the night's first on the same images
    # (McNemar; informative, never part of the verdict); None for the first model itself
    versus_first: Comparison | None = None


HISTORY_SCHEMA = pa.schema([(f.name, f.metadata["arrow"]) for f in fields(HistoryRow)])


class BaselineNotFound(UsageError):
    """--baseline names a run id that the history table does not hold (exit 2)."""


LEGACY_HISTORY = "history.parquet"  # the single rewritten table of earlier versions


def history_dir(history: str) -> str:
    """Where the history rows live: ``HISTORY/history/`` (a local path or a URI)."""
    return storage.join(history, "history")


def migrate_history(history: str) -> bool:
    """Move an earlier version's ``HISTORY/history.parquet`` into ``HISTORY/history/`` as one file
    (``legacy-history.parquet``; each row gets ``dataset`` = its manifest's file stem, as a bare
    ``--data MANIFEST`` is named now) and rename the old file to ``history.parquet.migrated``.
    Safe to run by two jobs at once: both write the same bytes. Returns whether it migrated."""
    legacy = storage.join(history, LEGACY_HISTORY)
    if not storage.exists(legacy):
        return False
    old = pq.read_table(io.BytesIO(storage.read_bytes(legacy))).to_pandas()
    if "dataset" not in old.columns:
        old["dataset"] = [storage.basename(m).rsplit(".", 1)[0] for m in old["data_manifest"]]
    rows = old.reindex(columns=HISTORY_SCHEMA.names).to_dict("records")
    rows = [{k: (None if v is pd.NaT or (isinstance(v, float) and v != v) else v)
             for k, v in r.items()} for r in rows]
    table = pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)
    storage.write_parquet_atomic(storage.join(history_dir(history), "legacy-history.parquet"),
                                 table)
    try:
        storage.write_bytes_atomic(legacy + ".migrated", storage.read_bytes(legacy))
        storage.delete_file(legacy)
    except FileNotFoundError:
        pass  # another run migrated it at the same time
    return True


def read_history(history: str) -> pd.DataFrame:
    """Every history row, oldest first (by date, then run id and set name); empty, with the
    schema's columns, before the first run. Migrates a legacy history.parquet first."""
    import pyarrow.dataset as pads

    migrate_history(history)
    folder = history_dir(history)
    if not storage.exists(folder):
        return HISTORY_SCHEMA.empty_table().to_pandas()
    fs, p = storage.resolve(folder)
    # the schema is given: files written before a column was added read it as null
    table = pads.dataset(p, filesystem=fs, format="parquet", schema=HISTORY_SCHEMA).to_table()
    df = table.to_pandas()
    return df.sort_values(["date", "run_id", "dataset", "model"], kind="stable",
                          na_position="first").reset_index(drop=True)


def append_history(history: str, row: dict) -> str:
    """Record one row as its own file, ``HISTORY/history/<run_id>--<dataset>--<model>.parquet``
    (``<run_id>--<dataset>.parquet`` for a row without a model), written once (no
    read-modify-write: concurrent runs cannot lose each other's rows). Returns the path.
    InputError when that file exists already (a run id, set and model recorded twice)."""
    name = f"{row['run_id']}--{row['dataset']}" + (f"--{row['model']}" if row.get("model")
                                                    else "")
    path = storage.join(history_dir(history), name + ".parquet")
    if storage.exists(path):
        raise InputError(f"{path} exists: run {row['run_id']} already recorded set "
                         f"{row['dataset']}" + (f" for model {row['model']}"
                                                if row.get("model") else ""))
    storage.write_parquet_atomic(path, pa.Table.from_pylist([row], schema=HISTORY_SCHEMA))
    return path


def history_row(run_id: str, result: SetResult, rule: RegressionRule) -> dict:
    """One history row (``HistoryRow`` as a dict) of a set that has metrics: its summary.json,
    comparisons and fidelity checks (``published.Fidelity``; "not applicable" when a published
    figure was looked for and none applied)."""
    summary, fidelity = result.summary, result.fidelity
    by_role = {c.role: c for c in result.comparisons}
    prev, base = by_role.get("previous"), by_role.get("baseline")
    first = result.versus_first
    real = summary.real_top1_ci95 or [None, None]
    checked = {f.metric: f for f in fidelity}
    return asdict(HistoryRow(
        date=pd.Timestamp(summary.started_at).to_pydatetime(), run_id=run_id,
        dataset=result.name, model=result.model or None, dataset_kind=result.kind,
        scored_over=summary.scored_over, model_id=summary.model_id, arch=summary.arch,
        params=summary.params, weights_sha256=summary.weights_sha256,
        data_manifest=summary.data_manifest,
        data_manifest_sha256=summary.data_manifest_sha256,
        data_fingerprint=summary.data_fingerprint,
        code_version=summary.code_version, samples=summary.samples,
        failures=summary.failures, top1=summary.top1,
        top1_ci95_lo=summary.top1_ci95[0], top1_ci95_hi=summary.top1_ci95[1],
        top5=summary.top5,
        top5_ci95_lo=summary.top5_ci95[0], top5_ci95_hi=summary.top5_ci95[1],
        real_samples=summary.real_samples,
        real_top1=_finite(summary.real_top1),
        real_top1_ci95_lo=_finite(real[0]), real_top1_ci95_hi=_finite(real[1]),
        real_top5=_finite(summary.real_top5),
        published_top1=checked["top1"].published if "top1" in checked else None,
        published_real_top1=(checked["real_top1"].published if "real_top1" in checked
                             else None),
        published_source="; ".join(dict.fromkeys(f.source for f in fidelity)) or None,
        fidelity=(("ok" if all(f.ok for f in fidelity) else "failed") if fidelity
                  else "not applicable" if result.not_applicable else None),
        precision=summary.precision, wall_seconds=summary.wall_seconds,
        images_per_s=summary.images_per_s, predictions_dir=result.run_dir,
        previous_run_id=prev.reference_run_id if prev else None,
        top1_delta_vs_previous=_finite(prev.delta_pp) if prev else None,
        p_vs_previous=_finite(prev.p_value) if prev else None,
        baseline_run_id=base.reference_run_id if base else None,
        top1_delta_vs_baseline=_finite(base.delta_pp) if base else None,
        p_vs_baseline=_finite(base.p_value) if base else None,
        first_model=first.reference_run_id if first else None,
        top1_delta_vs_first_model=_finite(first.delta_pp) if first else None,
        p_vs_first_model=_finite(first.p_value) if first else None,
        alpha=rule.alpha, min_effect=rule.min_effect, verdict=result.verdict))


def unfinished_row(run_id: str, started: str, dataset: str, kind: str, manifest: str,
                   verdict: str, error: str, rule: RegressionRule, model: str = "") -> dict:
    """The history row of a set that has no metrics: it failed, the deadline stopped it (or
    came before it), or its night's driver ended mid-run (``regression.NO_METRICS``). ``error``
    says why; the metric columns are null, so the trend shows the night as a gap with its
    verdict, and ``references`` never compares with it."""
    return asdict(HistoryRow(
        date=pd.Timestamp(started).to_pydatetime(), run_id=run_id, dataset=dataset,
        model=model or None, dataset_kind=kind, data_manifest=manifest, alpha=rule.alpha,
        min_effect=rule.min_effect, verdict=verdict, error=error))


def _finite(x: float | None) -> float | None:
    return None if x is None or x != x else x  # NaN (a refused comparison) is stored as null


def check_baseline(history: pd.DataFrame, baseline: str) -> None:
    """BaselineNotFound when ``baseline`` is set and no history row has that run id."""
    if baseline and not (history["run_id"] == baseline).any():
        known = ", ".join(dict.fromkeys(history["run_id"].tail(10))) or "none yet"
        raise BaselineNotFound(f"--baseline {baseline} is not in the history table "
                               f"(latest run ids: {known})")


def own_rows(history: pd.DataFrame, dataset: str, model: str = "",
             first: bool = True) -> pd.Series:
    """The mask of ``history``'s rows of set ``dataset`` for model ``model`` (every model's
    when ''). Rows without a model (written before several models a night) belong to one model
    for good, so a history carries on unbroken: the first model of the first night that named
    its models on this set, or, before any such night, this night's first model (``first``)."""
    mask = history["dataset"] == dataset
    if not model or "model" not in history.columns:
        return mask
    named = history["model"] == model
    unnamed = history["model"].isna()
    if not unnamed[mask].any():
        return mask & named
    rows = history[mask & ~unnamed]
    if len(rows):
        leaders = rows[rows["first_model"].isna()] if "first_model" in rows.columns else rows
        heir = (leaders if len(leaders) else rows)["model"].iloc[0]  # oldest first
        return mask & (named | unnamed) if heir == model else mask & named
    return mask & (named | unnamed) if first else mask & named


def references(history: pd.DataFrame, baseline: str, dataset: str,
               current: dict | None = None, model: str = "",
               first: bool = True) -> list[tuple[str, dict | None]]:
    """(role, history row) of set ``dataset``'s previous run for model ``model`` (``own_rows``;
    ``first``: this is the night's first model) and of the pinned baseline run, if
    any (``check_baseline`` has vetted its id); the baseline's row is None when that run did not
    evaluate this set. With ``current`` (this run's summary), the previous run is the latest one
    over the same data (``same_data``), so one night on other data does not make the next night
    not comparable too; when no earlier run used this data, it is the latest run (and the
    comparison says why it cannot be made). Rows without metrics (a failed set, a deadline, a
    night that did not finish) are never a reference."""
    own = own_rows(history, dataset, model, first)
    if "verdict" in history.columns:
        own &= ~history["verdict"].isin(NO_METRICS)
    rows = history[own].to_dict("records")
    refs: list[tuple[str, dict | None]] = []
    if rows:
        same = [r for r in rows if current is not None and same_data(current, r)]
        refs.append(("previous", (same or rows)[-1]))
    if baseline:
        pinned = [r for r in rows if r["run_id"] == baseline]
        refs.append(("baseline", pinned[-1] if pinned else None))
    return refs
