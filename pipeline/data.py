"""Streaming shards through Ray Data into decoded batches (contract 2 in docs/DESIGN.md).

Shards are read a chunk of samples at a time (``shard_chunks``: one ranged read a task, found
through the shard's sample index, ``pipeline.tarindex``): members stay raw bytes and nothing is
unpickled. Each read task decodes the chunk it read (``read_decoded``, ``decode_blocks``), with
one named policy for bad samples:
a sample that cannot be decoded keeps its row, with ``error`` set and a zero image, so it is
counted exactly once downstream; programming errors (TypeError, AttributeError, ...) raise.
Rows: ``key`` str, ``label`` int64, ``image`` uint8 3xHxW, ``error`` str ("" when decoded),
``shard`` str.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline import faults, images as imagelib, presets, ray_compat, shards, storage, tarindex
from pipeline.errors import InputError

log = logging.getLogger(__name__)

# What counts as bad data, not a bug: recorded per sample, never raised (``images.DECODE_ERRORS``,
# the one list; UnidentifiedImageError is an OSError).
DATA_ERRORS = imagelib.DECODE_ERRORS


# Ray Data's downstream-capacity backpressure (its DownstreamCapacityBackpressurePolicy): an
# operator starts no task, and takes no more of its tasks' output, while what it holds for its
# consumer exceeds this many times what the consumer has in flight. Ray 2.60's default, pinned
# here as the bound the jobs rely on (an environment variable of Ray's could change it).
DOWNSTREAM_CAPACITY_RATIO = 2.0


def configure_context() -> None:
    """The Ray Data settings every job and test runs with, on the driver's current
    ``DataContext``, before its datasets are built.

    - No progress bars: jobs log their own progress lines; bars garble ``ray job logs``.
    - No per-operator resource reservation (``op_resource_reservation_enabled``). With Ray's
      default (half the cluster reserved, split between the operators), the read/decode stage
      ran one task at a time on a 2-CPU cluster for most of a pass: measured again 2026-12-06,
      5,000 ImageNet-size images on 2 cores, 295 images/s with it against 476 without (the
      first measurement, 2026-11-29: 440 against 730 on 640 small images). The jobs size their
      operators themselves (``resources.plan_prediction``, ``plan_training``).
    - What bounds the decoded data in flight instead: the decode stage runs at most
      ``ReadPlan.concurrency`` tasks (the plan's ``decode_tasks``), each a chunk of 64 images
      (``tarindex.CHUNK_SAMPLES``), and starts the next only while its queued output is under
      ``DOWNSTREAM_CAPACITY_RATIO`` times what the consumers have in flight. Without the task
      cap Ray Data submitted every read task at once and the policy never applied; with whole
      shards as tasks, one task's output was a shard's (~750 MB). Measured 2026-12-06, 5,000
      ImageNet-size images through jobs.predict on a 300 MB object store: 718 MiB spilled
      before, none after.
    - And at most ``output_budget_bytes`` in any operator's output at any time
      (``ray_compat.bound_operator_outputs``): the bound that holds before the consumers start;
      while CPU predictor actors start, one block each (``ray_compat.startup_bytes``).
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.op_resource_reservation_enabled = False
    ctx.downstream_capacity_backpressure_ratio = DOWNSTREAM_CAPACITY_RATIO
    ray_compat.bound_operator_outputs(ctx, output_budget_bytes())


# The share of the smallest node's object store one operator's output may hold (the decoded
# batches waiting for the model or the Train workers). Ray's downstream-capacity policy has
# nothing to measure until a consumer runs: while the predictor actor or the Train workers
# started (8-15 s on 2 cores), the decode stage ran on unbounded and a fine-tuning epoch over
# 5,000 images spilled 257 MiB of a 300 MB store.
OUTPUT_STORE_SHARE = 0.25


def output_budget_bytes() -> int | None:
    """OUTPUT_STORE_SHARE of the smallest object store among the cluster's live nodes (None
    without a running Ray)."""
    from pipeline import resources

    store = resources.node_object_store_bytes()
    return int(OUTPUT_STORE_SHARE * store) if store else None


def decode_image(data: bytes, max_pixels: int = shards.DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image (``imagelib.decode_rgb``: the one opener with the pixel limit)."""
    return imagelib.decode_rgb(data, max_pixels)


def _sample_image(row: dict, num_classes: int) -> tuple[bytes, int]:
    """The image bytes and label of one raw sample (``shards.validate_sample``'s rule)."""
    ext, label = shards.validate_sample(row, num_classes)
    return row[ext], label


def _columns(batch) -> tuple[int, dict]:
    """(rows, {column: sequence}) of a raw batch in Ray Data's numpy format (a dict of arrays,
    the stage's) or a pandas DataFrame (tests, tools)."""
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return len(batch), {c: batch[c].tolist() for c in batch.columns}
    cols = dict(batch)
    return (len(next(iter(cols.values()))) if cols else 0), cols


Transform = presets.EvalTransform | presets.TrainTransform  # what decode_batch applies


def decode_batch(batch, transform: Transform, *, num_classes: int,
                 max_pixels: int = shards.DEFAULT_MAX_PIXELS, device: str = "cpu",
                 epoch: int | None = None, on_device: bool = False) -> dict[str, np.ndarray]:
    """Raw WebDataset rows -> decoded rows (contract 2), each image through ``transform``.

    ``batch``: Ray Data's numpy format (a dict of equal-length arrays: ``__key__``,
    ``__url__``, ``cls`` and the image member as bytes, None where a row lacks a column) or a
    pandas DataFrame of the same columns. ``transform``: a ``presets.EvalTransform`` (the eval
    preset) or ``presets.TrainTransform`` (RandomResizedCrop + flip from (seed, epoch, key)),
    called with each decoded image, its key and the epoch: ``epoch`` when given, else what the
    transform makes of Ray Data's execution count of this dataset
    (``ray_compat.execution_count``). Returns ``key`` (object, N), ``label`` (int64 N, -1 when
    unknown), ``image`` (uint8 N x 3 x crop x crop), ``error`` (object N, "" when decoded) and
    ``shard`` (object N).

    ``device="cuda"`` decodes the batch's JPEGs with nvJPEG in one batched call where a GPU is
    present (``decode_on_device``) and applies the transform to the GPU tensors
    (``transform.on_tensor``: pixels near-identical to PIL's, not bit-identical: a throughput
    option, not the reference path); anything it cannot decode, and every image on a machine
    without a GPU, takes the PIL path. With ``on_device`` the images stay a uint8 tensor on
    that device (the predictor decoding in its own actor: no pixels copied back to the host).
    Programming errors (TypeError, ...) raise; bad data is recorded in ``error``.
    """
    faults.hold("decode_batch")  # (tests) a decode task held on a node that is then lost
    n, cols = _columns(batch)
    crop = transform.crop_size
    labels = np.full(n, -1, dtype=np.int64)
    errors = np.full(n, "", dtype=object)
    names = list(cols)
    rows = [dict(zip(names, values)) for values in zip(*cols.values())]
    if epoch is None:
        epoch = transform.epoch(ray_compat.execution_count)  # only a train transform asks
    tensors, done = None, set()
    if device == "cuda" and _cuda_available():
        import torch

        tensors = torch.zeros((n, 3, crop, crop), dtype=torch.uint8, device="cuda")
        done = decode_on_device(rows, tensors, transform, epoch, num_classes, max_pixels)
    images = np.zeros((n, 3, crop, crop), dtype=np.uint8)
    for i, row in enumerate(rows):
        if i in done:
            labels[i] = int(row["cls"])
            continue
        try:
            data, labels[i] = _sample_image(row, num_classes)
            images[i] = transform(decode_image(data, max_pixels), str(row["__key__"]), epoch)
        except DATA_ERRORS as e:
            errors[i] = f"{type(e).__name__}: {e}"
    if tensors is not None:  # the PIL rows join the device's, on the device or on the host
        import torch

        pil = [i for i in range(n) if i not in done]
        if pil:
            tensors[pil] = torch.from_numpy(images[pil]).to(tensors.device)
        images = tensors if on_device else tensors.cpu().numpy()
    return {"key": np.array([str(r["__key__"]) for r in rows], dtype=object),
            "label": labels, "image": images, "error": errors,
            "shard": np.array([str(r.get("__url__") or "") for r in rows], dtype=object)}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def decode_blocks(block: dict, *, batch_size: int = 64, **kwargs):
    """A chunk's raw rows (a dict of equal-length columns, or numpy format) -> decoded batches
    of at most ``batch_size`` rows each (``decode_batch`` with ``kwargs``), yielded one after
    the other: what each read task of ``read_decoded`` runs on the chunk it read."""
    n, cols = _columns(block)
    for start in range(0, n, batch_size):
        yield decode_batch({k: v[start:start + batch_size] for k, v in cols.items()}, **kwargs)


def _within_limit(data: bytes, max_pixels: int) -> bool:
    """Whether the header opens and the image is within ``max_pixels`` (no pixels decoded); when
    not, the PIL path records what is wrong."""
    try:
        imagelib.open_image(data, max_pixels).close()
        return True
    except DATA_ERRORS:
        return False


def decode_jpegs(raws: list, device) -> list:
    """torchvision's ``decode_jpeg`` (nvJPEG on a GPU) over ``raws`` (uint8 byte tensors) on
    ``device``, as RGB uint8 3xHxW tensors there: one batched call (pytorch/vision#8496:
    ~7,800 images/s on one A100), and image by image when the batch fails (one bad image fails
    the whole call), None for each image it cannot decode (CMYK corner cases, damage: PIL
    decides those)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not raws:
        return []
    try:
        return list(decode_jpeg(raws, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out = []
    for raw in raws:
        try:
            out.append(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def decode_on_device(rows, out, transform: Transform, epoch: int, num_classes: int,
                     max_pixels: int) -> set[int]:
    """Decode the well-formed JPEG rows on ``out``'s device (``decode_jpegs``: batched nvJPEG on
    a GPU; torchvision's CPU decoder on a CPU, which the tests use) and write each through
    ``transform.on_tensor`` into ``out`` (a uint8 N x 3 x crop x crop tensor there); return
    their indices. Rows that are not JPEG, exceed ``max_pixels``, lack an image or fail to
    decode are left for the PIL path, which records what is wrong."""
    import torch

    todo = []
    for i, row in enumerate(rows):
        try:
            data, _ = _sample_image(row, num_classes)
        except DATA_ERRORS:
            continue  # the PIL path records the error
        if data[:3] == b"\xff\xd8\xff" and _within_limit(data, max_pixels):
            todo.append((i, torch.frombuffer(bytearray(data), dtype=torch.uint8)))
    done = set()
    decoded = decode_jpegs([raw for _, raw in todo], out.device)
    for (i, _), img in zip(todo, decoded):
        if img is not None:
            out[i] = transform.on_tensor(img, str(rows[i]["__key__"]), epoch)
            done.add(i)
    return done


@dataclass(frozen=True)
class ReadPlan:
    """How the fused read + decode stage runs: ``batch_size`` rows per decoded batch; each task
    reserves ``num_cpus`` (and ``num_gpus`` where ``device`` is "cuda": nvJPEG); at most
    ``concurrency`` tasks at once (None: Ray Data decides); ``shuffle_seed`` (train) shuffles
    the order of the chunks afresh, reproducibly, on each execution (None: manifest order);
    each task reads and decodes ``chunk_samples`` samples (``tarindex.CHUNK_SAMPLES``)."""
    batch_size: int = 64
    num_cpus: float = 1.0
    concurrency: int | None = None
    device: str = "cpu"
    num_gpus: float = 0.0
    shuffle_seed: int | None = None
    chunk_samples: int = tarindex.CHUNK_SAMPLES


def read_chunk(chunk: tarindex.Chunk):
    """One chunk's raw rows as an Arrow table: ``__key__`` and ``__url__`` (the shard's path)
    strings, and one binary column per member extension (``cls``, ``json``, ``jpg``, ...), null
    where a sample lacks that member: the rows ``ray.data.read_webdataset(decoder=None)`` gives,
    so ``shards.validate_sample`` judges each the same way. Nothing is decoded or unpickled.

    A shard changed since its manifest was written (rewritten in place, read with
    --no-verify-checksums) no longer fits its index: the chunk's samples are then found by
    reading the shard's own headers, with a warning, so a valid tar reads as it is. Raises
    InputError naming the shard when it is truncated or its bytes are not a readable tar."""
    import pyarrow as pa

    return pa.table({name: pa.array(values, pa.string() if name in ("__key__", "__url__")
                                     else pa.binary())
                     for name, values in raw_columns(chunk).items()})


def raw_columns(chunk: tarindex.Chunk, limit: int | None = None) -> dict[str, list]:
    """One chunk's raw rows (the first ``limit`` of them; None: all) as Python lists:
    ``__key__``, ``__url__`` (the shard's path) and one list of bytes per member extension, None
    where a sample lacks that member. ``read_chunk``'s columns, before Arrow; what a read task
    of ``read_decoded`` decodes. Errors as ``read_chunk``."""
    samples = _chunk_samples(chunk)[:limit]
    exts = sorted({ext for _, members in samples for ext in members})
    return {"__key__": [k for k, _ in samples], "__url__": [chunk.path] * len(samples),
            **{ext: [m.get(ext) for _, m in samples] for ext in exts}}


def _chunk_samples(chunk: tarindex.Chunk) -> list:
    data = storage.read_range(chunk.path, chunk.start, chunk.end - chunk.start)
    try:
        samples = tarindex.read_members(data, chunk.path)
        if len(data) == chunk.end - chunk.start and len(samples) == chunk.samples:
            return samples
    except InputError:
        pass
    # The bytes do not hold the samples the index says: find them by the shard's own headers.
    size, offsets = _own_offsets(chunk.path, storage.size(chunk.path))
    if size < offsets[-1]:  # the headers promise data past the end of the file
        raise InputError(f"{chunk.path}: ends at byte {size}, inside its last member's data, "
                         f"which ends at {offsets[-1]} (truncated)")
    count = len(offsets) - 1
    log.warning("%s does not fit its manifest's sample index (changed since it was written?): "
                "read samples %d-%d by its own headers", chunk.path, chunk.first,
                chunk.first + chunk.samples - 1)
    if chunk.first >= count:
        return []  # the shard now holds fewer samples: the run's coverage check says so
    start, end = offsets[chunk.first], offsets[min(chunk.first + chunk.samples, count)]
    return tarindex.read_members(storage.read_range(chunk.path, start, end - start), chunk.path)


@functools.lru_cache(maxsize=4)
def _own_offsets(path: str, size: int) -> tuple[int, list[int]]:
    """(size, every sample's offset) of the shard at ``path``, read off its tar headers; kept
    per worker process, so the chunks of one changed shard that land there scan it once."""
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return size, tarindex.sample_index(f, every=1, name=path)["offsets"]


def chunk_order(chunks: list, shuffle_seed: int | None, execution: int) -> list:
    """``chunks`` in the order execution number ``execution`` reads them: as given without a
    seed, else a permutation drawn from (``shuffle_seed``, ``execution``): reproducible, and
    new on each pass over a train set."""
    if shuffle_seed is None:
        return list(chunks)
    rng = np.random.default_rng([shuffle_seed, execution])
    return [chunks[i] for i in rng.permutation(len(chunks))]


def shard_chunks(manifest: shards.Manifest, chunk_samples: int = tarindex.CHUNK_SAMPLES,
                 shuffle_seed: int | None = None, decode: dict | None = None):
    """The ``ray.data.Datasource`` that reads ``manifest``'s shards in chunks of about
    ``chunk_samples`` samples. Shards whose records carry no sample index (written before it
    was recorded) have their tar headers read here, once, with a line saying so.

    Its blocks are the raw rows (``read_chunk``); with ``decode`` (``decode_batch``'s keywords,
    ``batch_size`` and ``transform`` among them) each read task decodes its chunk itself and
    its blocks are decoded batches of at most ``batch_size`` rows (``read_decoded``). A train
    transform's epoch is taken from the execution the tasks are planned for."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    chunks, scanned = [], 0
    for path, rec in zip(manifest.shard_paths, manifest.shards):
        scanned += rec.index is None
        chunks += tarindex.chunks_of(path, rec.samples, shards.shard_index(path, rec),
                                     chunk_samples)
    if scanned:
        log.info("%d of %d shards of %s carry no sample index (sharded before it was "
                 "recorded): read it off their tar headers; rerun jobs.shard into the same "
                 "folder to store it", scanned, len(manifest.shards), manifest.path)

    class _Source(Datasource):
        def estimate_inmemory_data_size(self):
            return sum(c.end - c.start for c in chunks)

        def get_name(self):
            return "ReadShards"

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            execution = ray_compat.execution_count(data_context)
            order = chunk_order(chunks, shuffle_seed, execution)
            kwargs = None
            if decode is not None:
                kwargs = dict(decode, epoch=decode["transform"].epoch(lambda: execution))
            return [ReadTask(functools.partial(_read_task, c, per_task_row_limit, kwargs),
                             BlockMetadata(num_rows=c.samples, size_bytes=c.end - c.start,
                                           input_files=[c.path], exec_stats=None),
                             per_task_row_limit=per_task_row_limit)
                    for c in order]

    return _Source()


def _read_task(chunk: tarindex.Chunk, limit: int | None, decode: dict | None = None):
    if decode is None:
        table = read_chunk(chunk)
        yield table if limit is None else table.slice(0, limit)
        return
    from ray.data.block import BlockAccessor

    for batch in decode_blocks(raw_columns(chunk, limit), **decode):
        yield BlockAccessor.batch_to_block(batch)


def read_raw(manifest_path: str, plan: ReadPlan = ReadPlan()):
    """A Ray Dataset of the raw WebDataset rows (``read_chunk``: ``__key__``, ``__url__``,
    ``cls`` and each member's bytes, nothing decoded or unpickled) of the shards a manifest
    lists, one read task per chunk of ``plan.chunk_samples`` samples reserving
    ``plan.num_cpus``, in ``plan.shuffle_seed``'s order; and the manifest. What
    ``read_decoded`` decodes, and what a predictor that decodes in its own actor takes."""
    return _read(manifest_path, plan)


def _read(manifest_path: str, plan: ReadPlan, decode: dict | None = None, **remote_args):
    import ray

    manifest = shards.load_manifest(manifest_path)
    source = shard_chunks(manifest, plan.chunk_samples, plan.shuffle_seed,
                          None if decode is None else dict(
                              decode, num_classes=len(manifest.classes),
                              max_pixels=manifest.max_pixels))
    # Read tasks reserve what the decode tasks reserve (Ray's default is one CPU each): a plan
    # that left the data stage a fraction of a CPU cannot wait forever on a read task
    # (resources.py).
    ds = ray.data.read_datasource(source, override_num_blocks=-(-manifest.total_samples
                                                                // plan.chunk_samples),
                                  num_cpus=plan.num_cpus, concurrency=plan.concurrency,
                                  **remote_args)
    return ds, manifest


def read_decoded(manifest_path: str, transform: Transform, plan: ReadPlan = ReadPlan()):
    """A Ray Dataset of decoded batches (contract 2: uint8 3 x crop x crop images, through
    ``transform``) for the shards a manifest lists, laid out as ``plan`` says; and the manifest.

    Each read task decodes the chunk it read (``shard_chunks`` with ``decode``): the raw bytes
    never become an Arrow column or a numpy batch on their way to the decoder. Measured
    2026-12-07 on 2 cores against the read task handing Arrow blocks to a fused
    ``map_batches(decode_blocks)``: see docs/BENCHMARKS.md, the decode stage's CPU row.

    Ray counts executions from 0 in each new run, so a resumed run must fold its resume point
    into ``plan.shuffle_seed`` (``train.shuffle_seed``) or it replays epoch 0's order, and give
    a ``presets.TrainTransform`` its first epoch as ``epoch_offset``; iterate a train dataset
    once per epoch.
    """
    return _read(manifest_path, plan, {"batch_size": plan.batch_size, "transform": transform,
                                       "device": plan.device},
                 num_gpus=plan.num_gpus if plan.device == "cuda" else 0.0)
