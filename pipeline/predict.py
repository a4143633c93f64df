"""Batch inference to Parquet, published exactly once (contract 3 in docs/DESIGN.md).

Decoded batches flow through ``map_batches(Predictor)`` on an actor pool (one GPU per actor
where GPUs exist). The driver streams the small per-image results into a staging folder, checks
rows + decode failures = manifest samples with no duplicate key, then publishes it: OUT's
layout (predictions/, failures.parquet with ``failures.COLUMNS``, summary.json, _SUCCESS) and
the switch that makes it appear exactly once are ``pipeline.publish``'s, the one statement of
the protocol; one run at a time writes into OUT under ``pipeline.lease``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import (data, deadline, faults, model as modellib, presets, progress, publish,
                      shards, storage)
from pipeline import timeshare
from pipeline import lease as leaselib
from pipeline import failures as failurelib
from pipeline.errors import InputError, PipelineError, UsageError
from pipeline.version import code_version

ROWS_PER_FILE = 100_000
EMBEDDING_ROWS_PER_FILE = 20_000


def embedding_info(dtype: str) -> dict:
    """What the ``embedding`` column holds, for summary.json and the Parquet metadata."""
    return {"column": "embedding", "dim": modellib.EMBEDDING_DIM, "dtype": dtype,
            "layer": "avgpool, flattened (the input of fc)", "normalized": False}


def _opt(default, help: str, choices=None):  # noqa: A002
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


CPUS_PER_ACTOR_HELP = ("CPUs each predictor actor reserves in Ray's scheduling (0: 1 with a "
                       "GPU, 0.5 on CPU, where its threads use the cores anyway)")
THREADS_HELP = ("torch threads per predictor actor on CPU (0: the cores of its node, shared "
                "among the actors there; decode tasks time-share them)")


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How a prediction run is laid out and what it keeps: one options object, taken by
    ``run_prediction`` and embedded (as base class) by the configs of jobs.predict and
    jobs.nightly_eval, so the two jobs cannot drift apart. Sizes in pixels; 0 means "decide"."""
    batch_size: int = _opt(64, "images per model call")
    precision: str = _opt("auto", "auto: bf16 where oneDNN/CUDA support it, fp16 on GPUs "
                                  "without bf16, else fp32", ["auto", "fp32", "bf16", "fp16"])
    use_gpu: bool = _opt(False, "one GPU per predictor actor")
    actors: int = _opt(1, "predictor actors (on a GPU cluster: the number of GPUs)")
    cpus_per_actor: float = _opt(0.0, CPUS_PER_ACTOR_HELP)
    threads: int = _opt(0, THREADS_HELP)
    decode_concurrency: int = _opt(0, "decode tasks at once (0: the CPUs the plan leaves to "
                                      "decoding, one task each)")
    decode_device: str = _opt("cpu", "cuda: decode JPEGs with nvJPEG on the GPU (near-identical "
                                     "pixels, for GPU clusters starved by JPEG decoding; needs "
                                     "--use-gpu); a decode task on a node without CUDA uses PIL",
                                     ["cpu", "cuda"])
    decode_in: str = _opt("tasks", "where the JPEGs are decoded: tasks (Ray Data tasks beside "
                                   "the predictor; the decoded pixels go to it through the "
                                   "object store) or actor (inside each predictor actor, from the "
                                   "raw bytes: with --decode-device cuda, nvJPEG on the actor's "
                                   "own GPU and no pixels copied back to the host)",
                          ["tasks", "actor"])
    resize_size: int = _opt(0, "resize shorter side to (0: the model's preset, else 256)")
    crop_size: int = _opt(0, "centre crop (0: the model's preset, else 224)")
    topk: int = _opt(5, "top-k indices and probabilities kept per image")
    max_failed_fraction: float = _opt(0.0, "exit non-zero when more than this fraction of "
                                           "samples fail to decode")
    class_subset: str = _opt("auto", "score over the data's classes only (logits restricted to "
                                     "them, softmax over those) when they are a strict subset "
                                     "of the model's: auto does for ImageNet-R/-A shards, as "
                                     "their published figures are measured", ["auto", "on", "off"])
    real_labels: str = _opt("", "ImageNet-ReaL labels (Beyer et al. 2020) for the ImageNet val "
                                "images among the data (keys ILSVRC2012_val_NNNNNNNN): a JSON "
                                "file of 50,000 label lists, or 'builtin' for the shipped "
                                "real.json; adds real_top1/real_top5/real_samples to "
                                "summary.json; empty: off")
    verify_checksums: bool = _opt(True, "check every shard's size and sha256 against the "
                                        "manifest before predicting")
    embeddings: bool = _opt(False, "also write each image's embedding: the 512-d pooled "
                                   "feature before fc, raw (not L2-normalised), as the "
                                   "`embedding` column (fixed_size_list[512])")
    embedding_dtype: str = _opt("float16", "the embedding column's type (float16: 1 KB an "
                                           "image, half of float32)", ["float16", "float32"])
    progress: bool = _opt(True, "show progress: a bar on a terminal, else a line about every "
                                "10%% or minute (images done, rate, ETA)")
    max_wait: str = _opt("15m", deadline.MAX_WAIT_HELP)

    @classmethod
    def of(cls, config) -> "PredictOptions":
        """The options of a config that embeds them (a subclass instance)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class PredictorSpec:
    """What each predictor actor is built from (Ray pickles it to every actor): the weights
    (``model.load_weights``'s spec) and the data's classes; ``precision`` and ``use_gpu`` (None:
    a GPU whenever there is one) as ``PredictOptions`` has them; ``topk`` kept per image;
    ``num_threads`` for torch on a CPU (None: torch's own; 0: the node's cores shared among
    its ``actors_per_node`` predictor actors); ``restrict``: score over the data's classes
    (``scored_classes``); ``warmup`` (batch size, crop size): one forward pass on zeros of that
    shape in the constructor, so the kernel selection of the first call happens while the
    actor starts (None: none); ``embedding_dtype`` (float16, float32) returns each image's
    pooled feature as ``embedding`` [N, 512] in that type ('': not returned); ``embed_only``:
    no head at all (the model's classes need not cover the data's): each row is the key, the
    data's label and the embedding; ``decode`` (an ``ActorDecode``): the batches are raw
    WebDataset rows, decoded in the actor (None: decoded batches, contract 2)."""
    weights: str
    data_classes: list
    precision: str = "auto"
    use_gpu: bool | None = None
    topk: int = 5
    num_threads: int | None = None
    actors_per_node: int = 1
    restrict: bool = False
    warmup: tuple[int, int] | None = None
    embedding_dtype: str = ""  # float16 or float32: return each image's embedding; '': none
    embed_only: bool = False  # no head: the data's label and the embedding only
    decode: "ActorDecode | None" = None  # raw rows in: the actor decodes them (--decode-in actor)


@dataclasses.dataclass(frozen=True)
class ActorDecode:
    """How a predictor actor decodes the raw WebDataset rows it is given (``--decode-in
    actor``): ``data.decode_batch`` with the eval ``transform``, the data's ``num_classes``
    and ``max_pixels``, on ``device`` ("cuda": nvJPEG on the actor's GPU, the images staying
    there; "cpu": PIL, the reference path)."""
    transform: presets.EvalTransform
    num_classes: int
    max_pixels: int
    device: str = "cpu"


class Predictor:
    """Loads the model once per actor (``PredictorSpec``); maps a decoded batch to per-image
    predictions."""

    def __init__(self, spec: PredictorSpec):
        self.calls = 0
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        if spec.num_threads is not None:  # 0: the node's cores, shared among its actors
            torch.set_num_threads(spec.num_threads or cpu_threads(spec.actors_per_node))
        torch.manual_seed(0)  # "none" weights: the same random model in every actor
        data_classes = spec.data_classes
        loaded = modellib.load_weights(spec.weights)
        net, model_classes, _ = modellib.build_model(loaded,
                                                     None if loaded.classes else data_classes)
        self.device = modellib.pick_device(spec.use_gpu)
        self.dtype = modellib.resolve_precision(spec.precision, self.device)
        # BatchNorm folded; the head apart, so the pooled feature is at hand
        self.backbone, self.head = modellib.split_for_inference(net, self.device, self.dtype)
        self.embedding_dtype = spec.embedding_dtype
        self.embed_only = spec.embed_only
        self.decode = spec.decode
        if not self.embed_only:
            self.classes, index = scored_classes(data_classes, model_classes, spec.restrict)
            self.output_index = None if index is None else torch.from_numpy(index).to(
                self.device)
            self.names = np.array([c["name"] for c in self.classes], dtype=object)
            self.label_map = label_map(data_classes, self.classes)
            self.topk = min(spec.topk, len(self.classes))
        if spec.warmup:  # oneDNN/cuDNN pick their kernels per shape on the first call
            b, c = spec.warmup
            with torch.inference_mode():
                self.head(self.backbone(presets.normalize(torch.zeros(
                    (b, 3, c, c), dtype=torch.uint8, device=self.device), self.dtype)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of ``_predict`` or ``_embed``, plus this call's timing on every row (the
        driver's ``BusyShare`` takes it; no Parquet column): ``TIMING_COLUMNS``, the call's
        seconds and those of its decoding (``--decode-in actor``; else 0) shared out over its
        rows, this actor, and the call's start and end (this actor's wall clock, seconds since
        the epoch)."""
        self.calls += 1
        faults.kill_once("predictor_batch", batch=self.calls)
        start = decoded = time.time()
        with torch.inference_mode():
            if self.decode is not None:  # raw rows: decoded here, on this actor's device
                d = self.decode
                batch = data.decode_batch(batch, d.transform, num_classes=d.num_classes,
                                          max_pixels=d.max_pixels, device=d.device, epoch=0,
                                          on_device=True)
                decoded = time.time()
            out = self._embed(batch) if self.embed_only else self._predict(batch)
        end = time.time()
        n = len(out["key"])
        out.update({"_busy_s": np.full(n, (end - start) / max(n, 1)),
                    "_decode_s": np.full(n, (decoded - start) / max(n, 1)),
                    "_actor": np.full(n, self.actor, dtype=object),
                    "_call_start": np.full(n, start), "_call_end": np.full(n, end)})
        return out

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Top-5 correctness is always top-5, whatever --topk keeps in the output lists.
        n, k, k5 = len(batch["key"]), self.topk, min(5, len(self.classes))
        ok = batch["error"] == ""
        error = batch["error"]
        topi = np.full((n, max(k, k5)), -1, dtype=np.int64)
        topp = np.zeros((n, max(k, k5)), dtype=np.float32)
        emb = (np.zeros((n, modellib.EMBEDDING_DIM), dtype=self.embedding_dtype)
               if self.embedding_dtype else None)
        if ok.any():
            features = self.backbone(presets.normalize(self._images(batch, ok), self.dtype))
            logits = self.head(features)
            if emb is not None:
                error = self._store(emb, ok, features, error)
            if self.output_index is not None:  # a subset set: its classes' logits only
                logits = logits.index_select(1, self.output_index)
            probs = logits.float().softmax(dim=1)
            p, i = probs.topk(max(k, k5), dim=1)
            topi[ok], topp[ok] = i.cpu().numpy(), p.cpu().numpy()
        labels = np.where(batch["label"] >= 0, self.label_map[np.maximum(batch["label"], 0)], -1)
        pred = topi[:, 0]
        extra = {} if emb is None else {"embedding": emb}
        return {"key": batch["key"], "label": labels, "pred": pred, **extra,
                "pred_name": np.where(pred >= 0, self.names[np.maximum(pred, 0)], ""),
                "topk_index": topi[:, :k], "topk_prob": topp[:, :k],
                "top1_correct": (pred == labels) & (labels >= 0),
                "top5_correct": (topi[:, :k5] == labels[:, None]).any(axis=1) & (labels >= 0),
                "error": error, "shard": batch["shard"],
                # what this actor ran, which the driver cannot know (a CPU-only head can drive
                # GPUs that lack bf16)
                "precision": np.full(n, modellib.precision_name(self.dtype), dtype=object)}

    def _images(self, batch: dict, ok: np.ndarray) -> torch.Tensor:
        """The decoded rows' uint8 images on the model's device: copied from the host, or, when
        this actor decoded them on its GPU, selected where they are."""
        images = batch["image"]
        if torch.is_tensor(images):
            return images[torch.from_numpy(ok).to(images.device)].to(self.device)
        return torch.from_numpy(images[ok]).to(self.device, non_blocking=True)

    def _store(self, emb: np.ndarray, ok: np.ndarray, features: torch.Tensor,
               error: np.ndarray) -> np.ndarray:
        """Put the decoded rows' ``features`` into ``emb`` (the stored dtype); return the
        errors with each vector that is not finite there (NaN, inf, beyond float16's range)
        marked: a failed image, never a silent row."""
        with np.errstate(over="ignore"):  # beyond float16's range: inf, caught next
            emb[ok] = features.float().cpu().numpy().astype(self.embedding_dtype)
        bad = ok & ~np.isfinite(emb).all(axis=1)
        return np.where(bad, f"{NON_FINITE} (NaN or inf in the pooled feature as "
                             f"{self.embedding_dtype})", error) if bad.any() else error

    def _embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ``embed_only`` rows: key, the data's label, embedding (a non-finite one, or a
        decode failure, as an error)."""
        n = len(batch["key"])
        error = batch["error"]
        ok = error == ""
        emb = np.zeros((n, modellib.EMBEDDING_DIM), dtype=self.embedding_dtype)
        if ok.any():
            error = self._store(emb, ok, self.backbone(presets.normalize(
                self._images(batch, ok), self.dtype)), error)
        return {"key": batch["key"], "label": batch["label"], "embedding": emb, "error": error,
                "shard": batch["shard"],
                "precision": np.full(n, modellib.precision_name(self.dtype), dtype=object)}


def cpu_threads(actors_per_node: int) -> int:
    """Torch threads for a CPU predictor actor: every core this process may run on, shared
    with the other predictor actors of its node. Decode tasks time-share those cores: at CPU
    inference rates they need a fraction of one (a core decodes ~300 images/s, ResNet-18 in
    bf16 runs ~50 images/s per core), and a core set aside for them would mostly idle."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, actors_per_node))


SUBSET_LAYOUTS = ("imagenet-r", "imagenet-a")  # sets published as scored over their classes


def scored_classes(data_classes: list[dict], model_classes: list[dict], restrict: bool
                   ) -> tuple[list[dict], np.ndarray | None]:
    """The classes a prediction is made over, and which model outputs they are.

    With ``restrict`` (``--class-subset``: by default for the ImageNet-R and ImageNet-A layouts)
    and the data's class ids a strict subset of the model's (their 200 classes under a
    1000-class ImageNet model), the model is scored over the data's classes only: its logits
    restricted to them (matched by id, in the data's order), the softmax taken over those,
    ``pred``/``topk_*`` in the data's class space. This is how those sets' own evaluation code
    and timm's ``--valid-labels`` score them (Hendrycks et al. 2021, "The Many Faces of
    Robustness"; "Natural Adversarial Examples"). Returns (data_classes, model indices of shape
    [C_data]); otherwise (model_classes, None): the model's own output space. InputError
    (``label_map``) when the model lacks some of the data's classes."""
    label_map(data_classes, model_classes)
    if restrict and len(data_classes) < len(model_classes):
        index = {c["id"]: c["index"] for c in model_classes}
        return data_classes, np.array([index[c["id"]] for c in data_classes], dtype=np.int64)
    return model_classes, None


def restricts(class_subset: str, layout: str) -> bool:
    """Whether ``--class-subset`` (auto, on, off) restricts scoring to the data's classes for a
    manifest of ``layout``: auto does for SUBSET_LAYOUTS (ImageNet-R, -A)."""
    return class_subset == "on" or (class_subset == "auto" and layout in SUBSET_LAYOUTS)


def label_map(data_classes: list[dict], model_classes: list[dict]) -> np.ndarray:
    """Data label -> model output index, matched by class id; error if the model lacks one."""
    index = {c["id"]: c["index"] for c in model_classes}
    missing = [c["id"] for c in data_classes if c["id"] not in index]
    if missing:
        raise InputError(f"the model's {len(model_classes)} classes lack {len(missing)} of the "
                         f"data's classes (e.g. {missing[:3]}): wrong weights for this data?")
    return np.array([index[c["id"]] for c in data_classes], dtype=np.int64)


def _actors_per_node(actors: int) -> int:
    """Predictor actors per node, as Ray spreads them over the nodes that have CPUs."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    return -(-actors // max(1, nodes))


class _PartWriter:
    """Collects prediction rows into part-NNNNN.parquet files with run metadata. Each part is
    built in memory (at most ~ROWS_PER_FILE rows, tens of MB) and stored in one whole-file
    write, which ``storage`` retries on an object store: a dropped connection costs a retry,
    not a half-uploaded stream."""

    def __init__(self, folder: str, metadata: dict[str, str], rows_per_file: int = ROWS_PER_FILE):
        self.folder, self.metadata, self.index, self.writer, self.rows = folder, metadata, 0, None, 0
        self.rows_per_file = rows_per_file
        self.buffer = None
        storage.makedirs(folder)

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (``_to_table``'s columns) to the open part, first opening the next
        ``part-NNNNN.parquet`` with the run metadata in its schema. A part is closed once it
        holds ``rows_per_file`` rows or more, so it may exceed that by up to one table."""
        if self.writer is None:
            schema = table.schema.with_metadata({k.encode(): v.encode()
                                                 for k, v in self.metadata.items()})
            self.buffer = pa.BufferOutputStream()
            self.writer = pq.ParquetWriter(self.buffer, schema)
        self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata))
        self.rows += len(table)
        if self.rows >= self.rows_per_file:
            self.close()

    def close(self) -> None:
        """Store the open part, if any (OSError when the store keeps failing); the next
        ``write`` opens a new part."""
        if self.writer is not None:
            self.writer.close()
            storage.write_bytes_atomic(
                storage.join(self.folder, f"part-{self.index:05d}.parquet"),
                self.buffer.getvalue().to_pybytes())
            self.writer, self.buffer, self.rows, self.index = None, None, 0, self.index + 1


def _to_table(batch: dict[str, np.ndarray], k: int) -> pa.Table:
    """The Parquet columns of a batch of predictor output: key, label, pred, pred_name,
    topk_index, topk_prob, top1_correct, top5_correct and, when the batch has one, ``embedding``
    (fixed_size_list<float16 or float32>[512], as the predictor returned it)."""
    def lists(arr, typ):
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), typ), k).cast(
            pa.list_(typ))
    extra = {"embedding": _embedding_column(batch["embedding"])} if "embedding" in batch else {}
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


def _embedding_table(batch: dict[str, np.ndarray], class_ids: np.ndarray) -> pa.Table:
    """The Parquet columns of a batch of ``embed_only`` rows: key, label (the data's class
    index), class_id (the manifest's id of that class) and embedding."""
    return pa.table({
        "key": pa.array(batch["key"].astype(str), pa.string()),
        "label": pa.array(batch["label"], pa.int64()),
        "class_id": pa.array(np.where(batch["label"] >= 0,
                                      class_ids[np.maximum(batch["label"], 0)], "").astype(str),
                             pa.string()),
        "embedding": _embedding_column(batch["embedding"]),
    })


def _embedding_column(emb: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] vectors as fixed_size_list<their dtype>[D] (float16 stays halffloat)."""
    emb = np.ascontiguousarray(emb)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def prediction_dataset(manifest_path: str, weights: str, plan, opts: PredictOptions,
                       preset: presets.Preset, embed_only: bool = False):
    """The Ray Dataset of per-image predictions (decode tasks -> predictor actors) laid out as
    ``plan`` (a ``resources.PredictPlan``) says, and the manifest. ``preset``: the model's own
    eval preset with the sizes ``opts`` set; ``embed_only``: embeddings, no head
    (``PredictorSpec``)."""
    from ray.data import ActorPoolStrategy

    read = data.ReadPlan(batch_size=opts.batch_size, num_cpus=plan.decode_cpus,
                         concurrency=opts.decode_concurrency or plan.decode_tasks,
                         device=opts.decode_device, num_gpus=plan.decode_gpus)
    transform = presets.EvalTransform(preset)
    decode = None
    if opts.decode_in == "actor":  # raw rows to the actors, which decode them
        ds, manifest = data.read_raw(manifest_path, read)
        decode = ActorDecode(transform, len(manifest.classes), manifest.max_pixels,
                             opts.decode_device)
    else:
        ds, manifest = data.read_decoded(manifest_path, transform, read)
    spec = PredictorSpec(
        weights, manifest.classes, opts.precision, plan.use_gpu, opts.topk,
        num_threads=None if plan.use_gpu else opts.threads,
        actors_per_node=_actors_per_node(plan.actors),
        restrict=restricts(opts.class_subset, manifest.layout),
        # the first batch's kernel selection (~1 s in bf16 on a CPU) done while the actor
        # starts, not on the data's first batch; at the largest batch the run has (a set
        # smaller than one batch: a warm-up at 64 cost 2.2 s of fp32 on AVX2 for 16 images)
        warmup=(max(1, min(opts.batch_size, manifest.total_samples)), preset.crop_size),
        embedding_dtype=opts.embedding_dtype if opts.embeddings else "", embed_only=embed_only,
        decode=decode)
    ds = ds.map_batches(
        Predictor, batch_size=opts.batch_size, compute=ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor,
        fn_constructor_args=(spec,))
    return ds, manifest


TIMING_COLUMNS = ("_busy_s", "_decode_s", "_actor", "_call_start", "_call_end")


class BusyShare:
    """The predictor actors' busy share (``pipeline.timeshare``) from the timing columns of
    their output batches: each actor's seconds inside ``Predictor.__call__`` over the span from
    the start of its first call to the end of its last, summed over the actors that made two
    calls or more (one call's span is that call: always 100%, a figure that says nothing)."""

    def __init__(self):
        # actor -> {"first", "last" (wall clock), "busy", "decode" (seconds), "calls" (starts)}
        self.actors: dict[str, dict] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for actor in set(batch["_actor"].tolist()):
            mine = batch["_actor"] == actor
            a = self.actors.setdefault(actor, {"first": float("inf"), "last": float("-inf"),
                                               "busy": 0.0, "decode": 0.0, "calls": set()})
            a["first"] = min(a["first"], float(batch["_call_start"][mine].min()))
            a["last"] = max(a["last"], float(batch["_call_end"][mine].max()))
            a["busy"] += float(batch["_busy_s"][mine].sum())
            a["decode"] += float(batch["_decode_s"][mine].sum())
            a["calls"].update(batch["_call_start"][mine].tolist())

    def facts(self) -> dict:
        """summary.json's ``predictor_busy_share`` (None: no actor made two calls),
        ``predictor_busy_seconds`` and ``predictor_decode_seconds`` (all actors; decoding is
        part of busy with ``--decode-in actor``), ``predictor_actors`` (the actors that
        predicted) and ``predictor_calls``."""
        timed = [a for a in self.actors.values() if len(a["calls"]) >= 2]
        busy = sum(a["busy"] for a in timed)
        return {"predictor_busy_share": timeshare.share(
                    busy, sum(a["last"] - a["first"] for a in timed)),
                "predictor_busy_seconds": sum(a["busy"] for a in self.actors.values()),
                "predictor_decode_seconds": sum(a["decode"] for a in self.actors.values()),
                "predictor_actors": len(self.actors),
                "predictor_calls": sum(len(a["calls"]) for a in self.actors.values())}


def busy_text(summary: dict) -> str:
    """``timeshare.predictor_text`` for a run's summary.json."""
    return timeshare.predictor_text(summary.get("predictor_busy_share"),
                                    summary.get("predictor_actors", 0),
                                    summary.get("predictor_decode_seconds", 0.0)
                                    / max(summary.get("predictor_busy_seconds", 0.0), 1e-9))


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A prediction run's inputs, resolved and checked (``resolve_inputs``): the weights
    (``model.LoadedWeights``), the manifest, the model's classes, the classes predictions are
    made over and which model outputs they are (``scored_classes``: None for the model's own),
    and the ReaL label lists (None without --real-labels)."""
    loaded: object
    manifest: shards.Manifest
    classes_model: list
    classes_out: list
    subset: np.ndarray | None
    real: list | None


def resolve_inputs(manifest_path: str, weights: str, opts: PredictOptions,
                   embed_only: bool = False) -> Inputs:
    """Load and check what a run reads: the manifest loads, the weights load and fit ResNet-18
    with a head of the classes they name, their classes cover the data's (not for
    ``embed_only``: no head runs), the ReaL labels load and ``opts.topk`` keeps the top-5 they
    score. Raises what ``shards.load_manifest``, ``model.load_weights``, ``model.build_model``,
    ``label_map`` and ``load_real_labels`` raise; InputError, UsageError for the rest."""
    manifest = shards.load_manifest(manifest_path)  # first: cheap, and no download to wait for
    loaded = modellib.load_weights(weights)
    classes_model = loaded.classes or manifest.classes
    _, _, replaced = modellib.build_model(loaded, classes_model)  # wrong shapes fail here
    if replaced and not embed_only:  # embeddings: the head is never run
        raise InputError(f"weights {weights} name other classes than their head holds; "
                         f"predict with a model.pt (it carries its class list)")
    if embed_only:  # no head: any backbone embeds any data
        return Inputs(loaded, manifest, classes_model, manifest.classes, None, None)
    classes_out, subset = scored_classes(manifest.classes, classes_model,
                                         restricts(opts.class_subset, manifest.layout))
    real = load_real_labels(opts.real_labels) if opts.real_labels else None
    if real is not None and opts.topk < 5:
        raise UsageError(f"--real-labels scores top-5 from the kept top-k: --topk "
                         f"{opts.topk} must be at least 5")
    if real is not None:
        from pipeline import sources

        wnids = set(sources.imagenet_wnids())
        others = [c["id"] for c in classes_out if c["id"] not in wnids]
        if others:
            raise UsageError(
                f"--real-labels {opts.real_labels}: ReaL labels are ImageNet classes, but the "
                f"classes scored here are not ImageNet wnids (e.g. {others[0]!r}, from "
                f"{'the weights ' + weights if loaded.classes else 'the data ' + manifest_path})"
                f": drop --real-labels for this data")
    return Inputs(loaded, manifest, classes_model, classes_out, subset, real)


def check_inputs(manifest_path: str, weights: str, opts: PredictOptions | None = None,
                 embed_only: bool = False) -> None:
    """``resolve_inputs`` before Ray starts (jobs.predict and jobs.embed call it first, so a
    wrong input costs no cluster start and leaves no output folder). The run resolves them
    again once Ray is up: the weights are read twice (a second or so for ResNet-18's 45 MB)."""
    opts = opts or PredictOptions()
    from pipeline import resources

    resources.check_decode_device(opts.decode_device, opts.use_gpu)
    deadline.parse_duration("--max-wait", opts.max_wait)
    resolve_inputs(manifest_path, weights, opts, embed_only)


def run_prediction(manifest_path: str, weights: str, out: str,
                   opts: PredictOptions | None = None, *,
                   lease_seconds: float = leaselib.DEFAULT_SECONDS, embed_only: bool = False,
                   label: str = "", **overrides) -> dict:
    """Predict every image a manifest lists into ``out`` and publish it exactly once
    (``pipeline.publish``); return the published summary (contract 3 in docs/DESIGN.md).

    ``opts`` (default ``PredictOptions()``), with ``overrides`` (its field names) applied on
    top. Raises UsageError for a resource plan the cluster cannot give, InputError/OSError for
    bad weights, manifests or shards (nothing published), FailedSamples after publishing when
    more than ``max_failed_fraction`` of the samples failed to decode.

    Only one run writes into ``out`` at a time: the run holds ``out``'s lease
    (``pipeline.lease``, period ``lease_seconds``, renewed every third of it) from before it
    touches ``out`` to its end. Raises LeaseHeld (nothing done) when another live run holds it,
    LeaseLost (nothing published) when this run's lease was taken over.

    ``embed_only`` (jobs.embed): the rows are key, label (the data's class index), class_id and
    embedding; no head runs, so the model's classes need not cover the data's (an ImageNet
    backbone on a new task); summary.json has counts and provenance, no metrics. ``label``
    names the run in its progress lines (the nightly's set name; default: the job and the
    manifest's split)."""
    from pipeline import resources

    opts = dataclasses.replace(opts or PredictOptions(), **overrides)
    if embed_only:
        opts = dataclasses.replace(opts, embeddings=True)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
    plan = resources.plan_prediction(resources.current_cluster(), opts.actors, opts.use_gpu,
                                     opts.cpus_per_actor, opts.decode_device, opts.decode_in)
    with deadline.doing(f"waiting for the resources of {plan.describe()}"):
        resources.await_resources(plan.needs(),
                                  deadline.parse_duration("--max-wait", opts.max_wait),
                                  what=f"the plan ({plan.describe()})")
    storage.check_writable(out)
    run_id = publish.new_run_id()
    # One publisher per OUT: taken before anything in OUT changes (recover included), renewed
    # while the run lives, released at the end, also on failure (pipeline/lease.py).
    try:
        with deadline.translated(), leaselib.Lease(out, run_id, lease_seconds) as lease:
            return _predict_under_lease(
                _Run(manifest_path, weights, out, opts, plan, run_id, started, t0, embed_only,
                     label), lease)
    except (deadline.DeadlineExceeded, deadline.ResourcesUnavailable) as e:
        try:
            ours = publish.published_run(out) == run_id
        except OSError:  # the store does not answer: the stop is the news, not this
            ours = False
        raise type(e)(f"{e}. " + (
            f"This run had published {out} just before" if ours else
            f"Nothing published to {out}: what it held before stays whole")) from None


def _no_first_batch(max_wait: float, plan):
    """The ResourcesUnavailable of a run whose first batch did not come within --max-wait."""
    from pipeline import resources

    cluster = resources.current_cluster().describe()

    def exception(elapsed: float):
        return deadline.ResourcesUnavailable(
            f"no batch came back within --max-wait {deadline.duration_text(max_wait)} of the "
            f"start: the plan's actors or decode tasks could not start ({plan.describe()}; "
            f"{cluster} in all, and other jobs may hold some)")
    return exception


@dataclasses.dataclass(frozen=True)
class _Run:
    """One prediction run as ``run_prediction`` resolved it: what it reads and writes, its
    options and resource plan, its run id, start time (UTC, ISO 8601) and monotonic start."""
    manifest_path: str
    weights: str
    out: str
    opts: PredictOptions
    plan: object  # resources.PredictPlan
    run_id: str
    started: str
    t0: float
    embed_only: bool = False
    label: str = ""


def _predict_under_lease(run: _Run, lease) -> dict:
    import ray

    manifest_path, weights, out, opts, plan = (run.manifest_path, run.weights, run.out,
                                               run.opts, run.plan)
    run_id, t0 = run.run_id, run.t0

    publish.recover(out)
    # fail here, not in every actor, on bad weights, data or options
    inputs = resolve_inputs(manifest_path, weights, opts, run.embed_only)
    loaded, manifest, classes_model = inputs.loaded, inputs.manifest, inputs.classes_model
    classes_out, subset, real = inputs.classes_out, inputs.subset, inputs.real
    # a model.pt knows the preset it was trained at; --resize-size/--crop-size override it
    preset = loaded.eval_preset.with_sizes(opts.resize_size, opts.crop_size)
    # the shards' sha256 checked beside the run, not before it; known before anything publishes
    checksums = shards.Checksums(manifest_path, manifest) if opts.verify_checksums else None
    ds, manifest = prediction_dataset(manifest_path, weights, plan, opts, preset, run.embed_only)
    k = min(opts.topk, len(classes_out))
    class_ids = np.array([c["id"] for c in manifest.classes], dtype=object)
    meta = {"model_id": loaded.model_id, "weights_sha256": loaded.sha256 or "",
            "data_manifest": manifest_path,
            "data_manifest_sha256": hashlib.sha256(storage.read_bytes(manifest_path)).hexdigest(),
            "data_fingerprint": shards.data_fingerprint(manifest),
            "preset": json.dumps(preset.to_dict()),
            "precision": "", "code_version": code_version(), "run_id": run_id}
    if opts.embeddings:
        meta["embedding"] = json.dumps(embedding_info(opts.embedding_dtype))
    staging = storage.join(out, f"_staging-{run_id}")
    try:
        # a part is built in memory: with 1-2 KB of embedding a row, 20,000 rows (20-40 MB)
        writer = _PartWriter(storage.join(staging, "predictions"), meta,
                             EMBEDDING_ROWS_PER_FILE if opts.embeddings else ROWS_PER_FILE)
        keys, failures, t_first, seen, first_n = set(), [], None, 0, 0
        busy = BusyShare()
        per_shard, ran = collections.Counter(), set()
        name = f"{'embed' if run.embed_only else 'predict'} {run.label or manifest.split}"
        max_wait = deadline.parse_duration("--max-wait", opts.max_wait)
        first_wait = deadline.arm(deadline.Budget(max_wait, _no_first_batch(max_wait, plan))
                                  ) if max_wait else None
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
        with progress.Progress(manifest.total_samples, name, enabled=opts.progress) as bar:
            try:
                for batch in batches:
                    deadline.disarm(first_wait)  # the actors and decode tasks run
                    deadline.check()  # a deadline outside the main thread stops here
                    if t_first is None:  # steady state starts once the first batch is out
                        t_first, first_n = time.monotonic(), len(batch["key"])
                    bad = batch["error"] != ""
                    failures += [{"key": str(key), "shard": str(s), "split": manifest.split,
                                  "error": str(e)} for key, s, e in
                                 zip(batch["key"][bad], batch["shard"][bad],
                                     batch["error"][bad])]
                    keys.update(batch["key"].tolist())
                    busy.add(batch)
                    ran.update(batch["precision"].tolist())
                    # the Parquet metadata (written with the first part) names what the
                    # actors ran
                    meta["precision"] = "+".join(sorted(ran))
                    per_shard.update(storage.basename(u) for u in batch["shard"].tolist())
                    good = {c: v[~bad] for c, v in batch.items()
                            if c != "precision" and c not in TIMING_COLUMNS}
                    if len(good["key"]):
                        writer.write(_embedding_table(good, class_ids) if run.embed_only
                                     else _to_table(good, k))
                    seen += len(batch["key"])
                    bar.update(len(batch["key"]))
                    if checksums:
                        checksums.raise_if_bad()  # a bad shard stops the run when found
            except ray.exceptions.RayTaskError as e:
                if checksums:  # a shard that fails its checksum: that is what to report
                    checksums.raise_if_bad(wait=True)
                raise _read_error(e, manifest_path) from None
            finally:
                deadline.disarm(first_wait)
                # stopped early (a deadline, an error): end the execution now, its actors and
                # tasks with it, not when the garbage collector gets to the generator (a
                # process that goes on, e.g. a nightly, kept them holding the cluster's CPUs)
                getattr(batches, "close", lambda: None)()
        if checksums:
            checksums.raise_if_bad(wait=True)
        writer.close()
        check_coverage(manifest, manifest_path, seen, len(keys), per_shard)
        faults.point("before_publish")
        faults.hold("before_publish")  # (tests) a run holding OUT's lease, for a second to meet
        wall = time.monotonic() - t0
        steady = ((seen - first_n) / (time.monotonic() - t_first)
                  if t_first and seen > first_n else 0.0)
        facts = {"wall_seconds": wall, "started_at": run.started,
                 "batch_size": opts.batch_size, "actors": opts.actors, "use_gpu": opts.use_gpu,
                 "decode_device": opts.decode_device, "decode_in": opts.decode_in,
                 "steady_images_per_s": steady,
                 "startup_seconds": (t_first - t0) if t_first else wall,
                 **busy.facts(),
                 "model_classes": len(classes_model),
                 "scored_over": "data classes" if subset is not None else "model classes",
                 **{k: v for k, v in meta.items() if k not in ("preset", "embedding")},
                 "preset": json.loads(meta["preset"])}
        if opts.embeddings:
            facts["embedding"] = embedding_info(opts.embedding_dtype)
        facts["rows"] = "embeddings" if run.embed_only else "predictions"
        summary = _summarize(staging, classes_out, manifest, failures, facts,
                             None if real is None else (real, opts.real_labels),
                             metrics_too=not run.embed_only)
        failurelib.write(storage.join(staging, "failures.parquet"), failures)
        storage.write_text_atomic(storage.join(staging, "summary.json"),
                                  json.dumps(summary, indent=1))
    except OSError as e:  # a store that kept failing after storage's retries, a full disk
        raise PipelineError(f"writing this run's outputs into {staging} failed ({e}): nothing "
                            f"published; the previous set in {out} is untouched") from e
    with deadline.deferred():  # a deadline never cuts the switch in half
        lease.check()  # LeaseLost: another run took OUT over; publish nothing
        publish.publish_or_roll_back(staging, out, run_id)
    where = f"see {storage.join(out, 'failures.parquet')}"
    why = failure_causes(failures, opts)  # "" when every failure is a decode failure
    if len(failures) == manifest.total_samples:  # nothing to score: no metric to report
        raise FailedSamples(f"none of the {manifest.total_samples} samples "
                            + (f"gave a result ({why})" if why else "could be decoded")
                            + f"; {where}")
    if failurelib.over_limit(len(failures), manifest.total_samples, opts.max_failed_fraction):
        raise FailedSamples(f"{len(failures)} of {manifest.total_samples} samples failed"
                            + (f" ({why};" if why else " to decode (")
                            + f"allowed: {opts.max_failed_fraction:.2%}); {where}")
    return summary


NON_FINITE = "non-finite embedding"  # how a failed image's error starts when its vector was


def failure_causes(failures: list[dict], opts: PredictOptions) -> str:
    """The failed samples by cause where not all failed to decode, e.g. ``1 could not be
    decoded, 14 gave a non-finite embedding as float16 (... --embedding-dtype float32 ...)``;
    "" when every one failed to decode (the messages then say just that)."""
    vectors = sum(f["error"].startswith(NON_FINITE) for f in failures)
    if not vectors:
        return ""
    parts = [f"{len(failures) - vectors} could not be decoded"] if len(failures) > vectors else []
    hint = (" (NaN or beyond float16's range of +-65,504: --embedding-dtype float32 keeps "
            "those that are finite)" if opts.embedding_dtype == "float16" else "")
    parts.append(f"{vectors} gave a non-finite embedding as {opts.embedding_dtype}{hint}")
    return ", ".join(parts)


REAL_LABELS_BUILTIN = "builtin"


def load_real_labels(spec: str) -> list[list[int]]:
    """ImageNet-ReaL labels: entry i lists the sorted-wnid class indices that are right for
    ``ILSVRC2012_val_{i+1:08d}`` (possibly none). ``spec`` is ``builtin`` (the 50,000 lists of
    google-research/reassessed-imagenet's real.json, Beyer et al. 2020, "Are we done with
    ImageNet?", Apache-2.0, shipped in pipeline/reference/) or a path or URI to such a JSON file.
    InputError naming the file when it is not a list of lists of ints in 0..999."""
    from importlib import resources

    if spec == REAL_LABELS_BUILTIN:
        text = resources.files("pipeline").joinpath("reference",
                                                    "imagenet_real_labels.json").read_text()
    else:
        text = storage.read_text(spec)
    try:
        labels = json.loads(text)
    except ValueError as e:
        raise InputError(f"--real-labels {spec}: not JSON ({e})") from None
    if not isinstance(labels, list) or not all(
            isinstance(row, list) and all(isinstance(v, int) and 0 <= v < 1000 for v in row)
            for row in labels):
        raise InputError(f"--real-labels {spec}: expected a JSON list of lists of class indices "
                         f"0..999 (entry i for ILSVRC2012_val_{{i+1:08d}})")
    return labels


def _read_error(e, manifest_path: str) -> PipelineError:
    """A damaged shard surfaces as a failed Ray read task: say what broke and what to run."""
    cause = getattr(e, "cause", None) or e
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    first = lines[0] if lines else type(cause).__name__
    return PipelineError(f"reading the shards of {manifest_path} failed "
                        f"({type(cause).__name__}: {first}); run `python -m jobs.shard --verify "
                        f"{manifest_path}` to name the damaged shard. Nothing published")


class FailedSamples(PipelineError):
    """More samples failed than the run allows; outputs are published all the same."""


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


def _summarize(staging: str, classes: list[dict], manifest: shards.Manifest, failures: list,
               facts: dict, real: tuple[list, str] | None = None,
               metrics_too: bool = True) -> dict:
    """summary.json's content: the metrics of the staged predictions over ``classes``
    (``metrics.evaluate``; with ``real``, (ReaL label lists, their source), the ReaL figures),
    the failure count, images/s over ``facts["wall_seconds"]``, and ``facts`` (the run's
    settings and metadata) as they are. Without ``metrics_too`` (embeddings only) the counts
    and ``facts`` alone."""
    import pyarrow.dataset as pads

    from pipeline import metrics  # pandas: the driver only, not the predictor actors

    fs, p = storage.resolve(storage.join(staging, "predictions"))
    dataset = storage.retrying(fs, f"opening {p}", lambda: pads.dataset(
        p, filesystem=fs, format="parquet"))
    columns = [c for c in dataset.schema.names if c != "embedding"]  # metrics need no vectors
    df = storage.retrying(fs, f"reading {p}",
                          lambda: dataset.to_table(columns=columns).to_pandas())
    summary = metrics.evaluate(df, classes) if len(df) and metrics_too else {"samples": len(df)}
    if real is not None:
        summary.update(metrics.real_accuracy(df, classes, real[0]), real_labels=real[1])
    summary.update({"failures": len(failures), "manifest_samples": manifest.total_samples,
                    "images_per_s": manifest.total_samples / facts["wall_seconds"], **facts,
                    "classes": classes})
    return summary
