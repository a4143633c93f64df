"""Batch inference to Parquet, published exactly once (contract 3 in docs/DESIGN.md).

Decoded batches flow through ``map_batches(Predictor)`` on an actor pool (one GPU per actor
where GPUs exist; what runs in the actors: ``pipeline.predictor``). The driver streams the small
per-image results into a staging folder (``pipeline.predictions``: the part files, the tally,
summary.json), checks rows + decode failures = manifest samples with no duplicate key, then
publishes it: OUT's
layout (predictions/, failures.parquet with ``failures.COLUMNS``, summary.json, _SUCCESS) and
the switch that makes it appear exactly once are ``pipeline.publish``'s, the one statement of
the protocol; one run at a time writes into OUT under ``pipeline.lease``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np

from pipeline import (architectures, data, deadline, faults, metrics, model as modellib,
                      predictions, presets, progress, publish, shards, storage)
from pipeline import lease as leaselib
from pipeline import failures as failurelib
from pipeline.errors import InputError, PipelineError, UsageError
from pipeline.predictor import (ActorDecode, Predictor, PredictorSpec, Rows, restricts,
                                scored_classes)
from pipeline.version import code_version


def _opt(default, help: str, choices=None):  # noqa: A002
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


CPUS_PER_ACTOR_HELP = ("CPUs each predictor actor reserves in Ray's scheduling (0: 1 with a "
                       "GPU, 0.5 on CPU, where its threads use the cores anyway)")
ACTORS_HELP = ("predictor actors; 0 (auto) counts the cluster at the start: one per GPU with "
               "--use-gpu, else one single-threaded actor per CPU (with --threads T: one per T "
               "CPUs), at most one per 2 GB of Ray's memory; never more than one per 2 batches "
               "of the set. On a cluster still scaling up, set it")
THREADS_HELP = ("torch threads per predictor actor on CPU (0: 1 where --actors 0 gives an actor "
                "per CPU, else its node's cores shared among the actors there; decode tasks "
                "time-share them)")


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How a prediction run is laid out and what it keeps: one options object, taken by
    ``run_prediction`` and embedded (as base class) by the configs of jobs.predict and
    jobs.nightly_eval, so the two jobs cannot drift apart. Sizes in pixels; 0 means "decide"."""
    model: str = _opt("", architectures.MODEL_HELP)
    batch_size: int = _opt(64, "images per model call")
    precision: str = _opt("auto", "auto: bf16 where oneDNN/CUDA support it, fp16 on GPUs "
                                  "without bf16, else fp32", ["auto", "fp32", "bf16", "fp16"])
    use_gpu: bool = _opt(False, "one GPU per predictor actor")
    actors: int = _opt(0, ACTORS_HELP)
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
    embeddings: bool = _opt(False, "also write each image's embedding: the input of the "
                                   "model's head (ResNet-18: the 512-d pooled feature before "
                                   "fc; ResNet-50: 2048; ConvNeXt-T, ViT-B/16: 768), raw (not "
                                   "L2-normalised), as the `embedding` column "
                                   "(fixed_size_list[D])")
    embedding_dtype: str = _opt("float16", "the embedding column's type (float16: 1 KB an "
                                           "image, half of float32)", ["float16", "float32"])
    progress: bool = _opt(True, "show progress: a bar on a terminal, else a line about every "
                                "10%% or minute (images done, rate, ETA)")
    max_wait: str = _opt("15m", deadline.MAX_WAIT_HELP)

    @classmethod
    def of(cls, config) -> "PredictOptions":
        """The options of a config that embeds them (a subclass instance)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def _actors_per_node(actors: int) -> int:
    """Predictor actors per node, as Ray spreads them over the nodes that have CPUs."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    return -(-actors // max(1, nodes))


def prediction_dataset(manifest_path: str, weights: str, plan, opts: PredictOptions,
                       preset: presets.Preset, rows: Rows = Rows.PREDICTIONS):
    """The Ray Dataset of per-image predictions (decode tasks -> predictor actors) laid out as
    ``plan`` (a ``resources.PredictPlan``) says, and the manifest. ``preset``: the model's own
    eval preset with the sizes ``opts`` set; ``rows``: which rows the actors return
    (``predictor.Rows``)."""
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
        num_threads=None if plan.use_gpu else plan.threads,
        actors_per_node=_actors_per_node(plan.actors),
        restrict=restricts(opts.class_subset, manifest.layout),
        warmup=(_warmup_batch(plan.use_gpu, opts.batch_size, manifest.total_samples),
                preset.crop_size),
        embedding_dtype=opts.embedding_dtype if opts.embeddings else "", rows=rows,
        model=opts.model, preset=preset, decode=decode)
    ds = ds.map_batches(
        Predictor, batch_size=opts.batch_size, compute=ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor,
        fn_constructor_args=(spec,))
    return ds, manifest


def _warmup_batch(use_gpu: bool, batch_size: int, total: int) -> int:
    """The batch of the predictor's warm-up pass (``PredictorSpec.warmup``). On a GPU, the
    run's largest batch: cuDNN picks its kernels per shape, and the pass costs milliseconds. On a
    CPU, one image: oneDNN's kernels are made for the layers, not the batch, and a pass at 64
    cost a whole batch of compute before the first (measured 2026-12-07 on 2 cores, bf16, fresh
    processes: model built to first batch out 4.0-4.4 s with the warm-up at 64, 2.7-2.8 s at 1
    or none, the first call then 0.0-0.1 s slower than the next)."""
    return max(1, min(batch_size, total)) if use_gpu else 1


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A prediction run's inputs, resolved and checked (``resolve_inputs``): the weights
    (``model.LoadedWeights``), the manifest, the model's classes, the classes predictions are
    made over and which model outputs they are (``scored_classes``: None for the model's own),
    the ReaL label lists (None without --real-labels), and the embedding's width and the
    head's module name (``architectures.head_path``) and the model's parameter count."""
    loaded: object
    manifest: shards.Manifest
    classes_model: list
    classes_out: list
    subset: np.ndarray | None
    real: list | None
    embedding_dim: int = modellib.EMBEDDING_DIM
    head: str = "fc"
    params: int = 0

    def embedding_info(self, dtype: str) -> dict:
        """``predictions.embedding_info`` of this model."""
        return predictions.embedding_info(dtype, self.embedding_dim, self.head)


def resolve_inputs(manifest_path: str, weights: str, opts: PredictOptions,
                   rows: Rows = Rows.PREDICTIONS, manifest: shards.Manifest | None = None
                   ) -> Inputs:
    """Load and check what a run reads: the manifest loads, the weights load and fit the model
    (``opts.model``, else theirs, else ResNet-18) with a head of the classes they name, their
    classes cover the data's (not for ``Rows.EMBEDDINGS``: no head runs), the ReaL labels load and ``opts.topk`` keeps the top-5
    they score. Raises what ``shards.load_manifest``, ``model.load_weights``,
    ``model.build_model``, ``predictor.label_map`` and ``metrics.load_real_labels`` raise;
    InputError, UsageError for the rest. ``manifest``: the manifest already loaded from
    ``manifest_path`` (None: loaded here)."""
    if manifest is None:  # first: cheap, and no download to wait for
        manifest = shards.load_manifest(manifest_path)
    loaded = modellib.load_weights(weights, opts.model)
    classes_model = loaded.classes or manifest.classes
    net, _, replaced = modellib.build_model(loaded, classes_model)  # wrong shapes fail here
    head = architectures.head_path(net, loaded.arch)
    width = architectures.get_head(net, head).in_features
    params = sum(p.numel() for p in net.parameters())
    if replaced and rows.head:  # embeddings: the head is never run
        raise InputError(f"weights {weights} name other classes than their head holds; "
                         f"predict with a model.pt (it carries its class list)")
    if not rows.head:  # no head: any backbone embeds any data
        return Inputs(loaded, manifest, classes_model, manifest.classes, None, None, width, head,
                      params)
    classes_out, subset = scored_classes(manifest.classes, classes_model,
                                         restricts(opts.class_subset, manifest.layout))
    real = metrics.load_real_labels(opts.real_labels) if opts.real_labels else None
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
    return Inputs(loaded, manifest, classes_model, classes_out, subset, real, width, head,
                  params)


def check_inputs(manifest_path: str, weights: str, opts: PredictOptions | None = None,
                 rows: Rows = Rows.PREDICTIONS) -> None:
    """``resolve_inputs`` before Ray starts (jobs.predict and jobs.embed call it first, so a
    wrong input costs no cluster start and leaves no output folder). The run resolves them
    again once Ray is up: the weights are read twice (a second or so for ResNet-18's 45 MB)."""
    opts = opts or PredictOptions()
    from pipeline import resources

    if opts.model:
        architectures.check_name(opts.model)  # a typo: one line naming the closest names
    resources.check_decode_device(opts.decode_device, opts.use_gpu)
    deadline.parse_duration("--max-wait", opts.max_wait)
    resolve_inputs(manifest_path, weights, opts, rows)


def run_prediction(manifest_path: str, weights: str, out: str,
                   opts: PredictOptions | None = None, *,
                   lease_seconds: float = leaselib.DEFAULT_SECONDS,
                   rows: Rows = Rows.PREDICTIONS, label: str = "",
                   **overrides) -> predictions.Summary:
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

    ``rows``: ``Rows.EMBEDDINGS`` (jobs.embed): the rows are key, label (the data's class index),
    class_id and embedding; no head runs, so the model's classes need not cover the data's (an
    ImageNet backbone on a new task); summary.json has counts and provenance, no metrics. ``label``
    names the run in its progress lines (the nightly's set name; default: the job and the
    manifest's split)."""
    from pipeline import resources

    opts = dataclasses.replace(opts or PredictOptions(), **overrides)
    if not rows.head:
        opts = dataclasses.replace(opts, embeddings=True)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
    manifest = shards.load_manifest(manifest_path)  # the set's size sizes the plan
    plan = resources.plan_prediction(resources.current_cluster(), opts.actors, opts.use_gpu,
                                     opts.cpus_per_actor, opts.decode_device, opts.decode_in,
                                     threads=opts.threads, images=manifest.total_samples,
                                     batch_size=opts.batch_size)
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
                _Run(manifest_path, weights, out, opts, plan, run_id, started, t0, rows,
                     label, manifest), lease)
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
    options and resource plan, its run id, start time (UTC, ISO 8601), monotonic start and
    the manifest as loaded once."""
    manifest_path: str
    weights: str
    out: str
    opts: PredictOptions
    plan: object  # resources.PredictPlan
    run_id: str
    started: str
    t0: float
    rows: Rows = Rows.PREDICTIONS
    label: str = ""
    manifest: shards.Manifest | None = None  # loaded once, before the plan


def _predict_under_lease(run: _Run, lease) -> predictions.Summary:
    """The run once it holds OUT's lease: recover OUT, resolve the inputs, stream the
    predictions into a staging folder (``_stream``), write its summary and failures, publish it
    (``publish.publish_or_roll_back``), then raise FailedSamples if too many samples failed."""
    out, opts = run.out, run.opts
    publish.recover(out)
    # fail here, not in every actor, on bad weights, data or options
    inputs = resolve_inputs(run.manifest_path, run.weights, opts, run.rows, run.manifest)
    # a model.pt knows the preset it was trained at; --resize-size/--crop-size override it
    preset = inputs.loaded.eval_preset.with_sizes(opts.resize_size, opts.crop_size)
    meta = _metadata(run, inputs, preset)
    staging = storage.join(out, f"_staging-{run.run_id}")
    try:
        tally = _stream(run, inputs, preset, meta, staging)
        faults.point("before_publish")
        faults.hold("before_publish")  # (tests) a run holding OUT's lease, for a second to meet
        facts = {"wall_seconds": time.monotonic() - run.t0, "started_at": run.started,
                 "batch_size": opts.batch_size, "actors": run.plan.actors, "use_gpu": opts.use_gpu,
                 "decode_device": opts.decode_device, "decode_in": opts.decode_in,
                 **tally.facts(), "model_classes": len(inputs.classes_model),
                 "params": inputs.params,
                 "scored_over": ("data classes" if inputs.subset is not None
                                 else "model classes"),
                 **{k: v for k, v in meta.items() if k not in ("preset", "embedding")},
                 "preset": json.loads(meta["preset"])}
        if opts.embeddings:
            facts["embedding"] = inputs.embedding_info(opts.embedding_dtype)
        summary = predictions.summarize(
            staging, inputs.classes_out, inputs.manifest, tally.failures, facts,
            None if inputs.real is None else (inputs.real, opts.real_labels), run.rows)
        failurelib.write(storage.join(staging, "failures.parquet"), tally.failures)
        summary.write(staging)
    except OSError as e:  # a store that kept failing after storage's retries, a full disk
        raise PipelineError(f"writing this run's outputs into {staging} failed ({e}): nothing "
                            f"published; the previous set in {out} is untouched") from e
    with deadline.deferred():  # a deadline never cuts the switch in half
        lease.check()  # LeaseLost: another run took OUT over; publish nothing
        publish.publish_or_roll_back(staging, out, run.run_id)
    _check_failures(tally.failures, inputs.manifest.total_samples, opts, out)
    return summary


def _metadata(run: _Run, inputs: Inputs, preset: presets.Preset) -> dict[str, str]:
    """The run metadata every part file's schema carries (and summary.json repeats):
    provenance of the model and the data, the preset, the code and the run."""
    manifest_path = run.manifest_path
    meta = {"model_id": inputs.loaded.model_id, "arch": inputs.loaded.arch,
            "weights_sha256": inputs.loaded.sha256 or "",
            "data_manifest": manifest_path,
            "data_manifest_sha256": hashlib.sha256(storage.read_bytes(manifest_path)).hexdigest(),
            "data_fingerprint": shards.data_fingerprint(inputs.manifest),
            "preset": json.dumps(preset.to_dict()),
            "precision": "", "code_version": code_version(), "run_id": run.run_id}
    if run.opts.embeddings:
        meta["embedding"] = json.dumps(inputs.embedding_info(run.opts.embedding_dtype))
    return meta


CHECKSUM_CPUS_PER_TASK = 4  # the cluster's CPUs per checksum task in flight


def _checksums(manifest_path: str, manifest: shards.Manifest) -> shards.Checksums:
    """The shards' size and sha256 checked beside the run, from its first batch on, reserving
    no CPU (``shards.Checksums``), so the checks never hold a CPU that the decode tasks or the
    predictor actors wait for: one task in flight per CHECKSUM_CPUS_PER_TASK of the cluster's
    CPUs (one on 2 CPUs; 16 on 64, where ImageNet train's 256 shards, 136 GB, must be checked
    within a run of minutes)."""
    from pipeline import resources

    cpus = resources.current_cluster().cpus
    return shards.Checksums(manifest_path, manifest, num_cpus=0,
                            in_flight=max(1, int(cpus) // CHECKSUM_CPUS_PER_TASK))


def _stream(run: _Run, inputs: Inputs, preset: presets.Preset, meta: dict[str, str],
            staging: str) -> predictions.Tally:
    """Run the prediction dataset and write its rows into ``staging``/predictions/ (``meta``
    in every part's schema, its ``precision`` filled in as the actors report it); return the
    tally, its coverage checked (``predictions.check_coverage``)."""
    import ray

    manifest_path, opts = run.manifest_path, run.opts
    checksums = None  # the shards' sha256: checked from the first batch on (below)
    ds, manifest = prediction_dataset(manifest_path, run.weights, run.plan, opts, preset,
                                      run.rows)
    k = min(opts.topk, len(inputs.classes_out))
    class_ids = np.array([c["id"] for c in manifest.classes], dtype=object)
    # a part is built in memory: with 1-2 KB of embedding a row, 20,000 rows (20-40 MB)
    writer = predictions.PartWriter(
        storage.join(staging, "predictions"), meta,
        predictions.EMBEDDING_ROWS_PER_FILE if opts.embeddings else predictions.ROWS_PER_FILE)
    tally = predictions.Tally(manifest.split, run.t0)
    max_wait = deadline.parse_duration("--max-wait", opts.max_wait)
    first_wait = deadline.arm(deadline.Budget(max_wait, _no_first_batch(max_wait, run.plan))
                              ) if max_wait else None
    # No prefetch: with Ray's default of one batch, the driver was handed each output block
    # only once the next one was ready, a whole predictor call late (Ray 2.60; measured
    # 2026-12-07 on 2 cores: the first batch reached the driver 0.8 s after its actor finished
    # it, later ones 1-3 s). The driver only counts and writes the rows: nothing to overlap.
    batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
    name = f"{run.rows.job} {run.label or manifest.split}"
    with progress.Progress(manifest.total_samples, name, enabled=opts.progress) as bar:
        try:
            for batch in batches:
                deadline.disarm(first_wait)  # the actors and decode tasks run
                deadline.check()  # a deadline outside the main thread stops here
                good = tally.add(batch)
                meta["precision"] = tally.precision  # what the actors ran, in every part
                if len(good["key"]):
                    writer.write(predictions.rows_table(run.rows, good, k, class_ids))
                bar.update(len(batch["key"]))
                if opts.verify_checksums:
                    checksums = checksums or _checksums(manifest_path, inputs.manifest)
                    checksums.raise_if_bad()  # a bad shard stops the run when found
        except ray.exceptions.RayTaskError as e:
            if opts.verify_checksums:  # a shard that fails its checksum: that is what to report
                (checksums or _checksums(manifest_path, inputs.manifest)).raise_if_bad(wait=True)
            raise _read_error(e, manifest_path) from None
        finally:
            deadline.disarm(first_wait)
            # stopped early (a deadline, an error): end the execution now, its actors and
            # tasks with it, not when the garbage collector gets to the generator (a
            # process that goes on, e.g. a nightly, kept them holding the cluster's CPUs)
            getattr(batches, "close", lambda: None)()
    if opts.verify_checksums:  # known before anything publishes
        (checksums or _checksums(manifest_path, inputs.manifest)).raise_if_bad(wait=True)
    writer.close()
    predictions.check_coverage(manifest, manifest_path, tally.seen, len(tally.keys),
                               tally.per_shard)
    return tally


def _check_failures(failures: list[dict], total: int, opts: PredictOptions, out: str) -> None:
    """FailedSamples (after publishing) when none of ``total`` samples gave a result, or more
    failed than ``opts.max_failed_fraction`` allows."""
    where = f"see {storage.join(out, 'failures.parquet')}"
    # "" when every failure is a decode failure
    why = predictions.failure_causes(failures, opts.embedding_dtype)
    if len(failures) == total:  # nothing to score: no metric to report
        raise FailedSamples(f"none of the {total} samples "
                            + (f"gave a result ({why})" if why else "could be decoded")
                            + f"; {where}")
    if failurelib.over_limit(len(failures), total, opts.max_failed_fraction):
        raise FailedSamples(f"{len(failures)} of {total} samples failed"
                            + (f" ({why};" if why else " to decode (")
                            + f"allowed: {opts.max_failed_fraction:.2%}); {where}")


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


