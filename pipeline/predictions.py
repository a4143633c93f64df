"""Contract 3 on disk (docs/DESIGN.md): what a prediction run writes into its staging folder
before ``pipeline.publish`` makes it appear. The part files of predictions/ (``PartWriter``, with
``prediction_table`` or ``embedding_table`` rows), the driver's ``Tally`` of the batches as they
stream in, the coverage check (rows + failures = the manifest's samples, shard by shard), and
summary.json: one type, ``Summary``, that writes it and reads it back."""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from pipeline import failures as failurelib, model as modellib, shards, storage, timeshare
from pipeline.errors import PipelineError
from pipeline.predictor import NON_FINITE, TIMING_COLUMNS, Rows

ROWS_PER_FILE = 100_000
EMBEDDING_ROWS_PER_FILE = 20_000


def embedding_info(dtype: str, dim: int = modellib.EMBEDDING_DIM, head: str = "fc") -> dict:
    """What the ``embedding`` column holds, for summary.json and the Parquet metadata: ``dim``
    values a row, the input of the model's head (its module name ``head``: ResNet's ``fc``,
    ``classifier.3``, ``heads.head``), raw."""
    layer = ("avgpool, flattened (the input of fc)" if head == "fc"
             else f"the input of the head ({head})")
    return {"column": "embedding", "dim": dim, "dtype": dtype, "layer": layer,
            "normalized": False}


class PartWriter:
    """Collects prediction rows into part-NNNNN.parquet files with run metadata. Each part is
    built in memory (at most ~ROWS_PER_FILE rows, tens of MB) and stored in one whole-file
    write, which ``storage`` retries on an object store: a dropped connection costs a retry,
    not a half-uploaded stream."""

    def __init__(self, folder: str, metadata: dict[str, str], rows_per_file: int = ROWS_PER_FILE):
        self.folder, self.metadata, self.rows_per_file = folder, metadata, rows_per_file
        self.tables: list[pa.Table] = []  # the open part's
        self.rows, self.index = 0, 0
        storage.makedirs(folder)

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (``prediction_table``'s or ``embedding_table``'s columns) to the open
        part. A part is stored once it holds ``rows_per_file`` rows or more, so it may exceed
        that by up to one table."""
        self.tables.append(table)
        self.rows += len(table)
        if self.rows >= self.rows_per_file:
            self.close()

    def close(self) -> None:
        """Store the open part, if any, as ``part-NNNNN.parquet`` with the run metadata in its
        schema (OSError when the store keeps failing); the next ``write`` opens a new part."""
        if self.tables:
            storage.write_parquet_atomic(
                storage.join(self.folder, f"part-{self.index:05d}.parquet"), self.tables,
                self.metadata)
            self.tables, self.rows, self.index = [], 0, self.index + 1


def prediction_table(batch: dict[str, np.ndarray], k: int) -> pa.Table:
    """The Parquet columns of a batch of predictor output: key, label, pred, pred_name,
    topk_index, topk_prob, top1_correct, top5_correct and, when the batch has one, ``embedding``
    (fixed_size_list<float16 or float32>[D], as the predictor returned it)."""
    def lists(arr, typ):
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), typ), k).cast(
            pa.list_(typ))
    extra = {"embedding": embedding_column(batch["embedding"])} if "embedding" in batch else {}
    return pa.table({
        "key": pa.array(batch["key"].astype(str), pa.string()),
        "label": pa.array(batch["label"], pa.int64()),
        "pred": pa.array(batch["pred"], pa.int64()),
        "pred_name": pa.array(batch["pred_name"].astype(str), pa.string()),
        "topk_index": lists(np.asarray(batch["topk_index"]), pa.int64()),
        "topk_prob": lists(np.asarray(batch["topk_prob"]), pa.float32()),
        "top1_correct": pa.array(batch["top1_correct"], pa.bool_()),
        "top5_correct": pa.array(batch["top5_correct"], pa.bool_()),
        **extra,
    })


def embedding_table(batch: dict[str, np.ndarray], class_ids: np.ndarray) -> pa.Table:
    """The Parquet columns of a batch of ``Rows.EMBEDDINGS`` rows: key, label (the data's class
    index), class_id (the manifest's id of that class) and embedding."""
    return pa.table({
        "key": pa.array(batch["key"].astype(str), pa.string()),
        "label": pa.array(batch["label"], pa.int64()),
        "class_id": pa.array(np.where(batch["label"] >= 0,
                                      class_ids[np.maximum(batch["label"], 0)], "").astype(str),
                             pa.string()),
        "embedding": embedding_column(batch["embedding"]),
    })


def embedding_column(emb: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] vectors as fixed_size_list<their dtype>[D] (float16 stays halffloat)."""
    emb = np.ascontiguousarray(emb)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def rows_table(rows: Rows, batch: dict[str, np.ndarray], k: int,
               class_ids: np.ndarray) -> pa.Table:
    """The Parquet table of a batch's decoded rows, as ``rows`` says: ``prediction_table``
    (``k`` kept per image) or ``embedding_table`` (``class_ids``: the manifest's class ids)."""
    return prediction_table(batch, k) if rows.head else embedding_table(batch, class_ids)


class Tally:
    """What the driver counts of a run's output batches as they stream in: every key (the
    coverage check's duplicates), the failed samples (``failures.rows``), rows per shard file,
    the precisions the actors ran, the predictor actors' busy share (``timeshare.BusyShare``)
    and the steady rate from the first batch on (``timeshare.SteadyClock`` from ``start``, the
    run's ``time.monotonic()`` start)."""

    def __init__(self, split: str, start: float):
        self.split = split
        self.keys: set[str] = set()
        self.failures: list[dict] = []
        self.per_shard: collections.Counter = collections.Counter()
        self.precisions: set[str] = set()
        self.busy = timeshare.BusyShare()
        self.clock = timeshare.SteadyClock(start)

    def add(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Count one output batch; return its decoded rows' columns (no timing, no precision)."""
        self.clock.mark(len(batch["key"]))
        self.failures += failurelib.rows(batch, self.split)
        self.keys.update(batch["key"].tolist())
        self.busy.add(batch)
        self.precisions.update(batch["precision"].tolist())
        self.per_shard.update(storage.basename(u) for u in batch["shard"].tolist())
        good = batch["error"] == ""
        return {c: v[good] for c, v in batch.items()
                if c != "precision" and c not in TIMING_COLUMNS}

    @property
    def seen(self) -> int:
        """Rows counted, decoded or failed."""
        return self.clock.rows

    @property
    def precision(self) -> str:
        """What the actors ran, e.g. ``bf16`` (``+``-joined when they differ)."""
        return "+".join(sorted(self.precisions))

    def facts(self) -> dict:
        """summary.json's timing facts: ``steady_images_per_s``, ``startup_seconds`` and the
        predictor's (``BusyShare.facts``)."""
        return {"steady_images_per_s": self.clock.rate(),
                "startup_seconds": self.clock.startup_seconds(), **self.busy.facts()}


def check_coverage(manifest: shards.Manifest, path: str, rows: int, unique: int,
                   per_shard: collections.Counter) -> None:
    """Rows (decoded or failed) must be exactly the manifest's samples, shard by shard: a tar cut
    at a member boundary reads back cleanly with fewer samples, and only this count catches it."""
    if rows != unique:
        raise PipelineError(f"{rows - unique} duplicate keys in the predictions of {path}: "
                           f"nothing published")
    base = storage.dirname(path)  # shard files of one manifest share a folder: names suffice
    wrong = [f"{storage.join(base, s.file)} gave {per_shard.get(s.file, 0)} of "
             f"{s.samples} samples" for s in manifest.shards
             if per_shard.get(s.file, 0) != s.samples]
    if wrong or unique != manifest.total_samples:
        raise PipelineError(f"{path} lists {manifest.total_samples} samples but the stream gave "
                           f"{unique}: {'; '.join(wrong) or 'unknown shards'}. Run `python -m "
                           f"jobs.shard --verify {path}`. Nothing published")


def failure_causes(failures: list[dict], embedding_dtype: str) -> str:
    """The failed samples by cause where not all failed to decode, e.g. ``1 could not be
    decoded, 14 gave a non-finite embedding as float16 (... --embedding-dtype float32 ...)``;
    "" when every one failed to decode (the messages then say just that)."""
    vectors = sum(f["error"].startswith(NON_FINITE) for f in failures)
    if not vectors:
        return ""
    parts = [f"{len(failures) - vectors} could not be decoded"] if len(failures) > vectors else []
    hint = (" (NaN or beyond float16's range of +-65,504: --embedding-dtype float32 keeps "
            "those that are finite)" if embedding_dtype == "float16" else "")
    parts.append(f"{vectors} gave a non-finite embedding as {embedding_dtype}{hint}")
    return ", ".join(parts)


def _summary_field(default=None, doc: str = ""):
    return dataclasses.field(default=default, metadata={"doc": doc})


# fields a summary.json leaves out, rather than writing null, when they do not apply
_ABSENT_WHEN_NONE = ("top1", "top5", "top1_ci95", "top5_ci95", "ece", "reliability",
                     "per_class", "confused_pairs", "real_samples", "real_top1", "real_top5",
                     "real_top1_ci95", "real_top5_ci95", "real_labels", "embedding")


@dataclasses.dataclass(frozen=True)
class Summary(Mapping):
    """summary.json (contract 3 in docs/DESIGN.md), the one type that writes it (``summarize``,
    ``write``) and reads it back (``read``): a published set's counts, metrics and provenance.
    Accuracies in percent, intervals [lo, hi] 95% Wilson in percent, times in seconds.

    The metric fields (``metrics.evaluate``) are None for an embeddings run, the ReaL ones
    without --real-labels (``metrics.real_accuracy``), ``embedding`` without embeddings: the
    file leaves those out. It also reads as the JSON object it is (a read-only Mapping:
    ``summary["top1"]``), for code that formats metrics of either kind (``metrics.format_table``).
    """
    samples: int = _summary_field(0, "rows scored (labelled decoded images; embeddings: rows)")
    top1: float | None = None
    top5: float | None = None
    top1_ci95: list | None = None
    top5_ci95: list | None = None
    ece: float | None = _summary_field(None, "expected calibration error, 15 equal bins")
    reliability: list | None = None
    per_class: list | None = None
    confused_pairs: list | None = None
    real_samples: int | None = _summary_field(None, "images with a non-empty ReaL label list")
    real_top1: float | None = None
    real_top5: float | None = None
    real_top1_ci95: list | None = None
    real_top5_ci95: list | None = None
    real_labels: str | None = _summary_field(None, "--real-labels as given")
    failures: int = _summary_field(0, "samples that failed (failures.parquet)")
    manifest_samples: int = 0
    images_per_s: float = _summary_field(0.0, "manifest samples over wall_seconds")
    wall_seconds: float = 0.0
    started_at: str = _summary_field("", "UTC, ISO 8601")
    batch_size: int = 0
    actors: int = 0
    use_gpu: bool = False
    decode_device: str = "cpu"
    decode_in: str = "tasks"
    steady_images_per_s: float = 0.0
    startup_seconds: float = 0.0
    predictor_busy_share: float | None = None
    predictor_busy_seconds: float = 0.0
    predictor_decode_seconds: float = 0.0
    predictor_actors: int = 0
    predictor_calls: int = 0
    model_classes: int = 0
    scored_over: str | None = _summary_field(None, '"model classes" or "data classes"')
    model_id: str = ""
    arch: str | None = _summary_field(None, "the torchvision model (--model), e.g. resnet18")
    params: int | None = _summary_field(None, "the model's parameters (a count)")
    weights_sha256: str = ""
    data_manifest: str = ""
    data_manifest_sha256: str = ""
    data_fingerprint: str | None = None
    precision: str = ""
    code_version: str = ""
    run_id: str = ""
    preset: dict | None = None
    embedding: dict | None = None
    rows: str = _summary_field(Rows.PREDICTIONS.value, "predictions or embeddings")
    classes: list | None = _summary_field(None, "the classes scored: [{index, id, name}]")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Summary":
        """The summary of a summary.json object. Keys of a later version are left aside, keys
        an earlier version lacked take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read(cls, folder: str) -> "Summary":
        """FOLDER/summary.json, published or staged. FileNotFoundError when it is missing,
        InputError for bad JSON."""
        return cls.from_dict(storage.read_json(storage.join(folder, "summary.json")))

    def to_dict(self) -> dict:
        """The JSON object, without the fields that do not apply (None in ``_ABSENT_WHEN_NONE``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name in _ABSENT_WHEN_NONE and getattr(self, f.name) is None)}

    def write(self, folder: str) -> None:
        """FOLDER/summary.json, atomically."""
        storage.write_text_atomic(storage.join(folder, "summary.json"),
                                  json.dumps(self.to_dict(), indent=1))

    def busy_text(self) -> str:
        """``timeshare.predictor_text`` for this run."""
        return timeshare.predictor_text(
            self.predictor_busy_share, self.predictor_actors,
            self.predictor_decode_seconds / max(self.predictor_busy_seconds, 1e-9))

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def summarize(staging: str, classes: list[dict], manifest: shards.Manifest, failures: list,
              facts: dict, real: tuple[list, str] | None = None,
              rows: Rows = Rows.PREDICTIONS) -> Summary:
    """The summary of the predictions staged in ``staging``: their metrics over ``classes``
    (``metrics.evaluate``; with ``real``, (ReaL label lists, their source), the ReaL figures),
    the failure count, images/s over ``facts["wall_seconds"]``, and ``facts`` (the run's
    settings and metadata: ``Summary`` fields). For ``Rows.EMBEDDINGS`` the counts and
    ``facts`` alone. TypeError for a fact that is no ``Summary`` field."""
    import pyarrow.dataset as pads

    from pipeline import metrics  # pandas: the driver only, not the predictor actors

    fs, p = storage.resolve(storage.join(staging, "predictions"))
    dataset = storage.retrying(fs, f"opening {p}", lambda: pads.dataset(
        p, filesystem=fs, format="parquet"))
    columns = [c for c in dataset.schema.names if c != "embedding"]  # metrics need no vectors
    df = storage.retrying(fs, f"reading {p}",
                          lambda: dataset.to_table(columns=columns).to_pandas())
    figures = metrics.evaluate(df, classes) if len(df) and rows.head else {"samples": len(df)}
    if real is not None:
        figures.update(metrics.real_accuracy(df, classes, real[0]), real_labels=real[1])
    return Summary(**figures, failures=len(failures), manifest_samples=manifest.total_samples,
                   images_per_s=manifest.total_samples / facts["wall_seconds"], **facts,
                   rows=rows.value, classes=classes)
