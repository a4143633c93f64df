"""Batch inference to Parquet, published exactly once (contract 3 in docs/DESIGN.md).

Decoded batches flow through ``map_batches(Predictor)`` on an actor pool (one GPU per actor
where GPUs exist). The driver streams the small per-image results into a staging folder, checks
rows + decode failures = manifest samples with no duplicate key, then publishes:

    OUT/predictions/part-*.parquet   one row per decoded image
    OUT/failures.parquet             key, shard, error for each sample that failed to decode
    OUT/summary.json                 metrics and run metadata
    OUT/_SUCCESS                     written last; readers trust OUT only when it is there

Publishing moves the old set to OUT/_previous, moves the new one in, writes _SUCCESS, then
deletes _previous. A run that dies before that leaves the previous set untouched; one that dies
inside it is rolled back by the next run (``recover``). Moves are renames on a local disk and
copies + deletes on an object store; the protocol holds for both (see ``recover``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import data, faults, model as modellib, presets, shards, storage
from pipeline.errors import PipelineError
from pipeline.version import code_version

ITEMS = ("predictions", "failures.parquet", "summary.json")
ROWS_PER_FILE = 100_000


class Predictor:
    """Loads the model once per actor; maps a decoded batch to per-image predictions."""

    def __init__(self, weights: str, data_classes: list[dict], precision: str = "auto",
                 use_gpu: bool | None = None, topk: int = 5, num_threads: int | None = None,
                 actors_per_node: int = 1, fault: dict | None = None):
        self.fault, self.calls = fault, 0
        if num_threads is not None:  # 0: this node's cores, shared among its predictor actors
            torch.set_num_threads(num_threads or cpu_threads(actors_per_node))
        torch.manual_seed(0)  # "none" weights: the same random model in every actor
        loaded = modellib.load_weights(weights)
        net, self.classes, _ = modellib.build_model(loaded, None if loaded["classes"] else data_classes)
        self.device = modellib.pick_device(use_gpu)
        self.dtype = modellib.resolve_precision(precision, self.device)
        self.model = net.eval().to(self.device, self.dtype, memory_format=torch.channels_last)
        self.names = np.array([c["name"] for c in self.classes], dtype=object)
        self.label_map = label_map(data_classes, self.classes)
        self.topk = min(topk, len(self.classes))

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        _maybe_kill_actor(self.fault, self.calls)
        # Top-5 correctness is always top-5, whatever --topk keeps in the output lists.
        n, k, k5 = len(batch["key"]), self.topk, min(5, len(self.classes))
        ok = batch["error"] == ""
        topi = np.full((n, max(k, k5)), -1, dtype=np.int64)
        topp = np.zeros((n, max(k, k5)), dtype=np.float32)
        if ok.any():
            x = torch.from_numpy(batch["image"][ok]).to(self.device, non_blocking=True)
            logits = self.model(presets.normalize(x, self.dtype))
            probs = logits.float().softmax(dim=1)
            p, i = probs.topk(max(k, k5), dim=1)
            topi[ok], topp[ok] = i.cpu().numpy(), p.cpu().numpy()
        labels = np.where(batch["label"] >= 0, self.label_map[np.maximum(batch["label"], 0)], -1)
        pred = topi[:, 0]
        return {"key": batch["key"], "label": labels, "pred": pred,
                "pred_name": np.where(pred >= 0, self.names[np.maximum(pred, 0)], ""),
                "topk_index": topi[:, :k], "topk_prob": topp[:, :k],
                "top1_correct": (pred == labels) & (labels >= 0),
                "top5_correct": (topi[:, :k5] == labels[:, None]).any(axis=1) & (labels >= 0),
                "error": batch["error"], "shard": batch["shard"],
                # what this actor ran, which the driver cannot know (a CPU-only head can drive
                # GPUs that lack bf16)
                "precision": np.full(n, modellib.precision_name(self.dtype), dtype=object)}


def cpu_threads(actors_per_node: int) -> int:
    """Torch threads for a CPU predictor actor: every core this process may run on, shared
    with the other predictor actors of its node. Decode tasks time-share those cores: at CPU
    inference rates they need a fraction of one (a core decodes ~300 images/s, ResNet-18 in
    bf16 runs ~50 images/s per core), and a core set aside for them would mostly idle."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, actors_per_node))


def label_map(data_classes: list[dict], model_classes: list[dict]) -> np.ndarray:
    """Data label -> model output index, matched by class id; error if the model lacks one."""
    index = {c["id"]: c["index"] for c in model_classes}
    missing = [c["id"] for c in data_classes if c["id"] not in index]
    if missing:
        raise ValueError(f"the model's {len(model_classes)} classes lack {len(missing)} of the "
                         f"data's classes (e.g. {missing[:3]}): wrong weights for this data?")
    return np.array([index[c["id"]] for c in data_classes], dtype=np.int64)


def _maybe_kill_actor(fault: dict | None, calls: int) -> None:
    """Fault injection for the tests: SIGKILL this actor once, at its N-th batch."""
    if fault and calls == fault["after_batches"] and not os.path.exists(fault["marker"]):
        open(fault["marker"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def _actors_per_node(actors: int) -> int:
    """Predictor actors per node, as Ray spreads them over the nodes that have CPUs."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    return -(-actors // max(1, nodes))


MOVED = "_MOVED"  # in OUT/_previous: the old set has left OUT whole


def _remove_stale_staging(out: str) -> None:
    """Staging folders of runs that died before publishing hold nothing anyone reads."""
    import pyarrow.fs as pafs

    fs, p = storage.resolve(out)
    if fs.get_file_info(p).type != pafs.FileType.Directory and storage.is_local(fs):
        return
    for info in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True)):
        if storage.basename(info.path).startswith("_staging-"):
            fs.delete_dir(info.path)


def recover(out: str) -> None:
    """Finish or roll back a publish that a crash interrupted.

    Three states, told apart by two markers (OUT/_SUCCESS and OUT/_previous/_MOVED):

    * OUT/_SUCCESS present: OUT holds a whole set (the new one, or the old one that had not
      started to leave); only the clean-up of _previous was left.
    * no _SUCCESS, _MOVED present: the old set was whole in _previous and whatever OUT holds
      is part of the new set: remove it, drop _MOVED, then move the old set back.
    * no _SUCCESS, no _MOVED: the old set was on its way out. On a local disk each item was
      renamed, so it is in one place or the other; on an object store an item can be partly
      in both (copy, then delete). OUT then holds nothing but old objects, so the items in
      _previous are merged back over OUT without deleting anything first.

    _SUCCESS goes back last and _previous is deleted after it, so a crash inside recover leaves
    one of the same three states and the next recover finishes the job.
    """
    _remove_stale_staging(out)
    prev = storage.join(out, "_previous")
    if not storage.exists(prev):
        return
    if storage.exists(storage.join(out, "_SUCCESS")):
        storage.delete_dir(prev)  # the set in OUT is complete: only the clean-up was left
        return
    if storage.exists(storage.join(prev, MOVED)):
        for item in ITEMS:
            _remove(storage.join(out, item))
        storage.delete_file(storage.join(prev, MOVED))
    for item in ITEMS + ("_SUCCESS",):
        src = storage.join(prev, item)
        if storage.exists(src):
            storage.move_tree(src, storage.join(out, item))
    storage.delete_dir(prev)


def _remove(path: str) -> None:
    if storage.is_dir(path):
        storage.delete_dir(path)
    else:
        storage.delete_file(path)


def publish(staging: str, out: str, run_id: str) -> None:
    """Old set to OUT/_previous (its _SUCCESS first), _MOVED, new set in, _SUCCESS, clean up.

    Each move is one rename on a local disk and a copy + delete of every object on an object
    store (``storage.move_tree``); the markers, not the moves, make the switch safe: readers
    trust OUT only while _SUCCESS is there, and ``recover`` rolls back any half-done state.
    """
    prev = storage.join(out, "_previous")
    storage.makedirs(prev)
    for item in ("_SUCCESS",) + ITEMS:  # _SUCCESS first: from here on OUT is not trusted
        if storage.exists(storage.join(out, item)):
            storage.move_tree(storage.join(out, item), storage.join(prev, item))
    storage.write_text_atomic(storage.join(prev, MOVED), run_id + "\n")
    faults.point("mid_publish")
    for item in ITEMS:
        storage.move_tree(storage.join(staging, item), storage.join(out, item))
    storage.write_text_atomic(storage.join(out, "_SUCCESS"), run_id + "\n")  # the switch
    storage.delete_dir(prev)
    storage.delete_dir(staging)


class _PartWriter:
    """Streams prediction rows into part-NNNNN.parquet files with run metadata."""

    def __init__(self, folder: str, metadata: dict[str, str]):
        self.folder, self.metadata, self.index, self.writer, self.rows = folder, metadata, 0, None, 0
        storage.makedirs(folder)

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            fs, p = storage.resolve(storage.join(self.folder, f"part-{self.index:05d}.parquet"))
            schema = table.schema.with_metadata({k.encode(): v.encode()
                                                 for k, v in self.metadata.items()})
            self.writer = pq.ParquetWriter(p, schema, filesystem=fs)
        self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata))
        self.rows += len(table)
        if self.rows >= ROWS_PER_FILE:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.rows, self.index = None, 0, self.index + 1


def _to_table(batch: dict[str, np.ndarray], k: int) -> pa.Table:
    def lists(arr, typ):
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), typ), k).cast(
            pa.list_(typ))
    return pa.table({
        "key": pa.array(batch["key"].astype(str), pa.string()),
        "label": pa.array(batch["label"], pa.int64()),
        "pred": pa.array(batch["pred"], pa.int64()),
        "pred_name": pa.array(batch["pred_name"].astype(str), pa.string()),
        "topk_index": lists(np.asarray(batch["topk_index"]), pa.int64()),
        "topk_prob": lists(np.asarray(batch["topk_prob"]), pa.float32()),
        "top1_correct": pa.array(batch["top1_correct"], pa.bool_()),
        "top5_correct": pa.array(batch["top5_correct"], pa.bool_()),
    })


def prediction_dataset(manifest_path: str, weights: str, plan, *, batch_size: int,
                       precision: str, threads: int, topk: int,
                       decode_concurrency: int | None, resize_size: int, crop_size: int,
                       decode_device: str, fault: dict | None = None):
    """The Ray Dataset of per-image predictions (decode tasks -> predictor actors) laid out as
    ``plan`` (a ``resources.PredictPlan``) says, and the manifest."""
    ds, manifest = data.read_decoded(manifest_path, mode="eval", batch_size=batch_size,
                                     concurrency=decode_concurrency, resize_size=resize_size,
                                     crop_size=crop_size, decode_device=decode_device,
                                     num_cpus=plan.decode_cpus, num_gpus=plan.decode_gpus)
    ds = ds.map_batches(
        Predictor, batch_size=batch_size, concurrency=plan.actors, num_gpus=plan.gpus_per_actor,
        num_cpus=plan.cpus_per_actor,
        fn_constructor_kwargs={"weights": weights, "data_classes": manifest["classes"],
                               "precision": precision, "use_gpu": plan.use_gpu, "topk": topk,
                               "num_threads": None if plan.use_gpu else threads,
                               "actors_per_node": _actors_per_node(plan.actors), "fault": fault})
    return ds, manifest


def run_prediction(manifest_path: str, weights: str, out: str, *, batch_size: int = 64,
                   precision: str = "auto", use_gpu: bool = False, actors: int = 1,
                   cpus_per_actor: float = 0.0, decode_concurrency: int | None = None,
                   topk: int = 5, max_failed_fraction: float = 0.0,
                   resize_size: int | None = None, crop_size: int | None = None,
                   progress: bool = True, fault: dict | None = None,
                   verify_checksums: bool = True, decode_device: str = "cpu",
                   threads: int = 0) -> dict:
    """Predict every image a manifest lists into ``out``; return the published summary.
    ``cpus_per_actor``: the CPUs each actor reserves in Ray (0: 1 with a GPU, 0.5 on CPU);
    ``threads``: torch threads per CPU actor (0: its node's cores shared among its actors)."""
    import ray
    from tqdm import tqdm

    from pipeline import resources

    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
    plan = resources.plan_prediction(resources.current_cluster(), actors, use_gpu, cpus_per_actor,
                                     decode_device)
    storage.check_writable(out)
    recover(out)
    loaded = modellib.load_weights(weights)  # fail here, not in every actor, on bad weights
    preset = loaded["extra"].get("preset") or {}  # a model.pt knows the preset it was trained at
    resize_size = resize_size or preset.get("resize_size", presets.RESIZE_SIZE)
    crop_size = crop_size or preset.get("crop_size", presets.CROP_SIZE)
    manifest = shards.load_manifest(manifest_path)
    if verify_checksums:
        shards.check_checksums(manifest_path, manifest)
    classes_model = loaded["classes"] or manifest["classes"]
    _, _, replaced = modellib.build_model(loaded, classes_model)  # wrong shapes fail here
    if replaced:
        raise ValueError(f"weights {weights} name other classes than their head holds; "
                         f"predict with a model.pt (it carries its class list)")
    label_map(manifest["classes"], classes_model)
    ds, manifest = prediction_dataset(
        manifest_path, weights, plan, batch_size=batch_size, precision=precision,
        threads=threads, topk=topk, decode_concurrency=decode_concurrency,
        resize_size=resize_size, crop_size=crop_size, decode_device=decode_device, fault=fault)
    k = min(topk, len(classes_model))
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    meta = {"model_id": loaded["model_id"], "weights_sha256": loaded["sha256"] or "",
            "data_manifest": manifest_path,
            "data_manifest_sha256": hashlib.sha256(storage.read_bytes(manifest_path)).hexdigest(),
            "preset": json.dumps({"resize_size": resize_size, "crop_size": crop_size,
                                  "interpolation": "bilinear", "antialias": True}),
            "precision": "", "code_version": code_version(), "run_id": run_id}
    staging = storage.join(out, f"_staging-{run_id}")
    writer = _PartWriter(storage.join(staging, "predictions"), meta)
    keys, failures, t_first, seen, first_n = set(), [], None, 0, 0
    per_shard, ran = collections.Counter(), set()
    with tqdm(total=manifest["total_samples"], unit="img", desc="predict",
              disable=not progress) as bar:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if t_first is None:  # steady state starts once the first batch is out
                    t_first, first_n = time.monotonic(), len(batch["key"])
                bad = batch["error"] != ""
                failures += [{"key": str(key), "shard": str(s), "error": str(e)} for key, s, e in
                             zip(batch["key"][bad], batch["shard"][bad], batch["error"][bad])]
                keys.update(batch["key"].tolist())
                ran.update(batch["precision"].tolist())
                # the Parquet metadata (written with the first part) names what the actors ran
                meta["precision"] = "+".join(sorted(ran))
                per_shard.update(storage.basename(u) for u in batch["shard"].tolist())
                good = {c: v[~bad] for c, v in batch.items() if c != "precision"}
                if len(good["key"]):
                    writer.write(_to_table(good, k))
                seen += len(batch["key"])
                bar.update(len(batch["key"]))
        except ray.exceptions.RayTaskError as e:
            raise _read_error(e, manifest_path) from None
    writer.close()
    check_coverage(manifest, manifest_path, seen, len(keys), per_shard)
    faults.point("before_publish")
    wall = time.monotonic() - t0
    summary = _summarize(staging, classes_model, manifest, meta, failures, wall, started,
                         {"batch_size": batch_size, "actors": actors, "use_gpu": use_gpu,
                          "steady_images_per_s": (seen - first_n) / (time.monotonic() - t_first)
                          if t_first and seen > first_n else 0.0,
                          "startup_seconds": (t_first - t0) if t_first else wall})
    _write_failures(storage.join(staging, "failures.parquet"), failures)
    storage.write_text_atomic(storage.join(staging, "summary.json"), json.dumps(summary, indent=1))
    publish(staging, out, run_id)
    if len(failures) > max_failed_fraction * manifest["total_samples"]:
        raise FailedSamples(f"{len(failures)} of {manifest['total_samples']} samples failed to "
                            f"decode (allowed: {max_failed_fraction:.2%}); see "
                            f"{storage.join(out, 'failures.parquet')}")
    return summary


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


def check_coverage(manifest: dict, path: str, rows: int, unique: int,
                   per_shard: collections.Counter) -> None:
    """Rows (decoded or failed) must be exactly the manifest's samples, shard by shard: a tar cut
    at a member boundary reads back cleanly with fewer samples, and only this count catches it."""
    if rows != unique:
        raise PipelineError(f"{rows - unique} duplicate keys in the predictions of {path}: "
                           f"nothing published")
    base = storage.dirname(path)  # shard files of one manifest share a folder: names suffice
    wrong = [f"{storage.join(base, s['file'])} gave {per_shard.get(s['file'], 0)} of "
             f"{s['samples']} samples" for s in manifest["shards"]
             if per_shard.get(s["file"], 0) != s["samples"]]
    if wrong or unique != manifest["total_samples"]:
        raise PipelineError(f"{path} lists {manifest['total_samples']} samples but the stream gave "
                           f"{unique}: {'; '.join(wrong) or 'unknown shards'}. Run `python -m "
                           f"jobs.shard --verify {path}`. Nothing published")


def _write_failures(path: str, failures: list[dict]) -> None:
    fs, p = storage.resolve(path)
    table = pa.table({c: pa.array([f[c] for f in failures], pa.string())
                      for c in ("key", "shard", "error")})
    pq.write_table(table, p, filesystem=fs)


def _summarize(staging, classes, manifest, meta, failures, wall, started, settings) -> dict:
    import pyarrow.dataset as pads

    from pipeline import metrics  # pandas: the driver only, not the predictor actors

    fs, p = storage.resolve(storage.join(staging, "predictions"))
    df = pads.dataset(p, filesystem=fs, format="parquet").to_table().to_pandas()
    summary = metrics.evaluate(df, classes) if len(df) else {"samples": 0}
    summary.update({"failures": len(failures), "manifest_samples": manifest["total_samples"],
                    "wall_seconds": wall, "images_per_s": manifest["total_samples"] / wall,
                    "started_at": started, **settings,
                    **{k: v for k, v in meta.items() if k != "preset"},
                    "preset": json.loads(meta["preset"]), "classes": classes})
    return summary
