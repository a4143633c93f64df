"""Fine-tuning a torchvision classifier (ResNet-18 by default, ``--model``) with Ray Train V2 (TorchTrainer): the driver's side. ``plan_run`` checks
a run before anything starts, ``fit`` runs it, ``run_planned`` writes its outputs (model.pt,
contract 4 in docs/DESIGN.md). What each worker runs is ``pipeline.train_worker``.

A rerun with the same storage_path and name resumes from the checkpoint Ray Train recorded last
(``recorded_checkpoint``); a failed worker restarts the group from it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pipeline import architectures as archlib, model as modellib, presets, ray_compat
from pipeline import resources, train_worker
from pipeline.errors import InputError, PipelineError, UsageError
from pipeline.train_worker import LoopConfig, check_resumable, load_state

if TYPE_CHECKING:
    from pipeline.resources import TrainPlan


def recorded_checkpoint(storage_path: str, name: str) -> tuple[str, int] | None:
    """The latest checkpoint Ray Train recorded for STORAGE/NAME, the one a rerun resumes from,
    as (its folder name, its epoch), or None for a new run. A checkpoint folder written but not
    yet recorded in the snapshot when a driver died is not it, and may be incomplete. Raises
    InputError for a snapshot this Ray version does not write (``ray_compat``)."""
    from pipeline import storage

    path = storage.join(storage_path, name, ray_compat.SNAPSHOT_FILE)
    if not storage.exists(path):
        return None
    latest = ray_compat.latest_recorded_checkpoint(storage.read_text(path), path)
    if latest is None:
        return None
    try:
        return latest[0], int(latest[1]["epoch"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: the latest checkpoint's metrics hold no epoch "
                         f"({type(e).__name__}: {e})") from e


def resume_epoch(storage_path: str, name: str) -> int:
    """The first epoch a rerun of STORAGE/NAME will train (0 for a new run)."""
    latest = recorded_checkpoint(storage_path, name)
    return 0 if latest is None else latest[1] + 1


def shuffle_seed(seed: int, first_epoch: int) -> int:
    """The shard-order seed of a driver run that starts at ``first_epoch``. Ray reseeds the file
    order on each epoch from a count that starts at 0 in every new run, so a resumed run seeded
    with ``seed`` alone would replay epoch 0's shard order; folding in the resume point keeps
    the seeded order of each (seed, resume point) and never repeats the first run's."""
    return seed if first_epoch == 0 else (seed * 1_000_003 + first_epoch) % (2 ** 31)


@dataclass(frozen=True)
class RunPlan:
    """Everything a fine-tuning run is checked against before Ray Train starts: the loop config
    the workers get (classes, train_samples, world_size and the per-worker batch resolved), the
    resource plan, and where the run lives."""
    loop_config: LoopConfig
    resources: "TrainPlan"
    train_manifest: str
    val_manifest: str
    storage_path: str
    name: str
    notes: tuple[str, ...] = ()  # what the plan changed, for the job to print
    first_epoch: int = 0  # > 0: a rerun resuming after the checkpoint Ray Train recorded

    @property
    def run_dir(self) -> str:
        """The run's folder, STORAGE/NAME (checkpoints, config.json, history.json, model.pt)."""
        from pipeline import storage

        return storage.join(self.storage_path, self.name)


MIN_BATCH = 2  # BatchNorm in train mode needs two values per channel (1x1 maps at small crops)


def per_worker_batch(train_samples: int, num_workers: int, batch_size: int) -> tuple[int, str]:
    """The per-worker batch that gives every epoch at least one optimizer step, and a note when it
    differs from ``batch_size``. Each worker gets ``train_samples // num_workers`` rows (an equal
    split) and drops its last partial batch, so a batch larger than that share trains nothing.
    Raises UsageError when a worker's share is under MIN_BATCH images."""
    share = train_samples // num_workers
    if share < MIN_BATCH:
        raise UsageError(f"the train split has {train_samples} images: with --num-workers "
                         f"{num_workers} each worker gets {share}, fewer than a batch of "
                         f"{MIN_BATCH} (a training batch of 1 breaks BatchNorm); use fewer "
                         f"workers or more images")
    if share >= batch_size:
        return batch_size, ""
    return share, (f"--batch-size {batch_size} is larger than each worker's share of the train "
                   f"split ({train_samples} images / {resources.count(num_workers, 'worker')} "
                   f"= {share}): using a "
                   f"per-worker batch of {share}, one step per epoch")


def check_inputs(train_manifest: str, val_manifest: str, weights: str, model: str = ""):
    """What a fine-tuning run can check before Ray starts (jobs.finetune calls it first): both
    manifests load and have one class list, ``weights`` is a named set of torchvision model
    ``model`` ('': the weights' own, else resnet18) or an existing file.
    Returns the two ``shards.Manifest``; raises what ``shards.load_manifest`` raises, UsageError
    for class lists that differ, FileNotFoundError for missing weights."""
    from pipeline import shards

    if model:
        archlib.check_name(model)  # a typo: one line naming the closest names, first
    train_m, val_m = shards.load_manifest(train_manifest), shards.load_manifest(val_manifest)
    if [c["id"] for c in train_m.classes] != [c["id"] for c in val_m.classes]:
        raise UsageError(f"{train_manifest} and {val_manifest} have different class lists: shard "
                         f"val with --classes-from {train_manifest}")
    modellib.check_weights_spec(weights, model)
    return train_m, val_m


def plan_run(loop_config: LoopConfig, plan: resources.TrainPlan, *, train_manifest: str,
             val_manifest: str, storage_path: str, name: str) -> RunPlan:
    """Check a fine-tuning run before anything starts or is written; raise UsageError (one line)
    for settings that cannot run: too few train images for ``plan``'s workers (a
    ``resources.plan_training``, which refuses what the cluster cannot give), train and val
    class lists that differ, or a rerun of STORAGE/NAME whose settings differ from the run it
    would resume."""
    from pipeline import storage

    storage_path = storage_path if storage.is_uri(storage_path) else os.path.abspath(storage_path)
    num_workers = plan.num_workers
    train_m, _ = check_inputs(train_manifest, val_manifest, loop_config.weights,
                              loop_config.model)
    # Weights that cannot be had (offline DEFAULT, a wrong file) fail here in one line, not in
    # every worker, retried by Ray Train's failure policy.
    loaded = modellib.load_weights(loop_config.weights, loop_config.model)
    modellib.build_model(loaded, train_m.classes)
    batch, note = per_worker_batch(train_m.total_samples, num_workers,
                                   loop_config.batch_size)
    cfg = replace(loop_config, model=loaded.arch, batch_size=batch,
                  classes=tuple(train_m.classes),
                  num_classes=len(train_m.classes), train_samples=train_m.total_samples,
                  world_size=num_workers)
    cap = resources.shuffle_buffer_cap(resources.node_object_store_bytes(), num_workers,
                                       cfg.crop_size)
    if cap is not None and cfg.shuffle_buffer > cap:
        note_cap = (f"--shuffle-buffer {cfg.shuffle_buffer} lowered to {cap} rows a worker: "
                    f"{num_workers} buffers of {cfg.crop_size}-pixel images may hold "
                    f"{resources.SHUFFLE_STORE_SHARE:.0%} of a node's object store, not more "
                    f"(more made the epoch spill to disk)")
        logging.getLogger(__name__).warning(note_cap)
        cfg = replace(cfg, shuffle_buffer=cap)
    saved = recorded_config(storage_path, name)
    if saved is not None:
        check_resumable(saved, cfg)
    return RunPlan(cfg, plan, train_manifest, val_manifest, storage_path, name,
                   tuple(n for n in (note,) if n), resume_epoch(storage_path, name))

TRACKING_EXPERIMENT = "resnet-pipeline finetune"  # the MLflow experiment of fine-tuning runs


def start_tracking(plan: RunPlan, uri: str, params: dict):
    """The MLflow tracker of a run (``pipeline.tracking``; off when ``uri`` is '') and the plan
    with ``loop_config.tracking`` set, so that the rank-0 worker logs each epoch to it. A new
    run creates an MLflow run named after it, in TRACKING_EXPERIMENT, and keeps its id in
    STORAGE/NAME/mlflow_run_id; a resumed run continues that MLflow run, never a second one.
    ``params`` (the job's flags) are logged once."""
    from pipeline import storage, tracking

    if not uri:
        return tracking.Tracker(""), plan
    id_file = storage.join(plan.run_dir, tracking.RUN_ID_FILE)
    known = storage.read_text(id_file).strip() if storage.exists(id_file) else ""
    tracker = tracking.Tracker.start(uri, TRACKING_EXPERIMENT, plan.name, run_id=known,
                                     tags={"job": "jobs.finetune", "run_dir": plan.run_dir})
    if tracker.enabled and not known:
        storage.write_text_atomic(id_file, tracker.run_id)
    tracker.params(params)
    if not tracker.enabled:
        return tracker, plan
    return tracker, replace(plan, loop_config=replace(plan.loop_config,
                                                      tracking=(uri, tracker.run_id)))


def recorded_state(storage_path: str, name: str) -> dict | None:
    """The state (``train_worker.load_state``) of the checkpoint a rerun of STORAGE/NAME would
    resume from; None for a new run."""
    from pipeline import storage

    latest = recorded_checkpoint(storage_path, name)
    return None if latest is None else load_state(storage.join(storage_path, name, latest[0]))


def recorded_config(storage_path: str, name: str) -> dict | None:
    """The loop config saved in the checkpoint a rerun of STORAGE/NAME would resume from."""
    state = recorded_state(storage_path, name)
    return None if state is None else state["config"]


GROUP_START_SECONDS = 60.0  # Ray Train V2's own default for one worker-group start
# Ray Train V2's errors (ray.train.v2._internal.exceptions, by name: an internal module) for a
# worker group that did not start: its placement group waited past the start timeout, it failed
# to start, or the autoscaler's configured maximum cannot hold it
GROUP_START_ERRORS = ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError",
                      "InsufficientClusterResourcesError")


def fit(run: RunPlan, *, max_failures: int = 1, num_to_keep: int = 2,
        decode_concurrency: int | None = None, max_wait: float = 0.0):
    """Run (or resume) a planned fine-tuning run (``plan_run``); return (ray.train.Result, the
    last checkpoint's state, the resolved loop config).

    ``max_wait`` (seconds, 0: no limit) bounds the wait for resources: first for the cluster
    to hold the plan (``resources.await_resources``), then Ray Train's retries of a worker
    group that cannot start: each try waits at most GROUP_START_SECONDS (or ``max_wait`` when
    shorter), and ``FailureConfig.controller_failure_limit`` stops them after ``max_wait`` in
    all (Ray's default, -1, retries forever). Raises ``deadline.ResourcesUnavailable`` (exit 7)
    for either."""
    import math
    import os

    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline import data, deadline, resources

    cfg, plan = run.loop_config, run.resources
    with deadline.doing(f"waiting for the resources of {plan.describe()}"):
        resources.await_resources(plan.needs(), max_wait, what=f"the plan ({plan.describe()})")
    controller_limit = -1
    if max_wait > 0:  # read by Ray Train's controller, which the driver's environment reaches
        start = min(GROUP_START_SECONDS, max_wait)
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{start:g}"
        controller_limit = max(1, math.ceil(max_wait / start) - 1)
    first_epoch = resume_epoch(run.storage_path, run.name)
    read = data.ReadPlan(batch_size=cfg.batch_size, num_cpus=plan.decode_cpus,
                         concurrency=decode_concurrency or plan.decode_tasks)
    train_ds, _ = data.read_decoded(
        run.train_manifest,
        presets.TrainTransform(cfg.crop_size, seed=cfg.seed, epoch_offset=first_epoch,
                               min_scale=cfg.min_crop_scale),
        replace(read, shuffle_seed=shuffle_seed(cfg.seed, first_epoch)))
    val_ds, _ = data.read_decoded(
        run.val_manifest, presets.EvalTransform(presets.Preset.for_crop(cfg.crop_size)), read)
    # Ray Train keeps its workers' resources from Ray Data; on a fixed cluster the limit also
    # says what the plan left to the data stage, so Ray Data never waits on CPUs it cannot get.
    options = None if plan.data_cpus is None else ExecutionOptions(
        resource_limits=ExecutionResources(cpu=plan.data_cpus))
    trainer = TorchTrainer(
        train_worker.train_loop_per_worker, train_loop_config={"loop": cfg},
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu,
            resources_per_worker={"CPU": plan.cpus_per_worker,
                                  **({"GPU": 1} if plan.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run.name, storage_path=run.storage_path,
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=controller_limit),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            logging_config=ray_compat.train_logging_config()),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray_compat.exact_val_data_config(options))
    try:
        with deadline.doing(f"fine-tuning run {run.name}"), deadline.translated():
            result = trainer.fit()
    except ray.train.ControllerError as e:
        if type(e.controller_failure).__name__ not in GROUP_START_ERRORS:
            raise
        raise deadline.ResourcesUnavailable(
            f"Ray Train could not start the worker group of run {run.name} "
            f"({plan.describe()}) within --max-wait {deadline.duration_text(max_wait)}: "
            f"{str(e.controller_failure).splitlines()[0]}") from None
    if result.checkpoint is None:
        raise PipelineError(f"run {run.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return result, load_state(d), cfg


def run_planned(plan: RunPlan, *, job_config: dict, max_failures: int = 1, num_to_keep: int = 2,
                decode_concurrency: int | None = None, max_wait: float = 0.0) -> dict:
    """Run a checked fine-tuning run (``plan_run``) to its end and write its outputs under
    STORAGE/NAME: config.json (``job_config`` plus the resolved plan), checkpoints, history.json,
    failures.parquet and model.pt (contract 4 in docs/DESIGN.md). A run whose every epoch is
    already trained starts no worker group. Returns the last epoch's metrics with ``history``,
    ``model``, ``run_dir`` and ``failures`` (paths). Raises PipelineError when more samples
    failed to decode than ``max_failed_fraction`` allows (after that epoch's checkpoint)."""
    from pipeline import failures as failurelib, storage

    cfg, run_dir = plan.loop_config, plan.run_dir
    resolved = {"cpus_per_worker": plan.resources.cpus_per_worker,
                "batch_size_per_worker": cfg.batch_size}
    storage.write_text_atomic(storage.join(run_dir, "config.json"),
                              json.dumps({**job_config, "resolved": resolved}, indent=1,
                                         default=str))
    if plan.first_epoch >= cfg.epochs:
        state = recorded_state(plan.storage_path, plan.name)
    else:
        _, state, cfg = fit(plan, max_failures=max_failures, num_to_keep=num_to_keep,
                            decode_concurrency=decode_concurrency, max_wait=max_wait)
    failures_path = storage.join(run_dir, "failures.parquet")
    failurelib.write(failures_path, state.get("failures", []))
    storage.write_text_atomic(storage.join(run_dir, "history.json"),
                              json.dumps(state.get("history", []), indent=1))
    if state["metrics"].get("stopped"):
        raise PipelineError(f"run {plan.name} stopped: {state['metrics']['stopped']}; see "
                            f"{failures_path}. The epoch's checkpoint is kept: fix or reshard "
                            f"the data, or rerun with a higher --max-failed-fraction to go on")
    model_path = storage.join(run_dir, "model.pt")
    export_model(state, model_path, cfg, job_config)
    return {**state["metrics"], "history": state.get("history", []), "model": model_path,
            "run_dir": run_dir, "failures": failures_path}


def export_model(state: dict, path: str, loop_config: LoopConfig, job_config: dict) -> str:
    """Write model.pt (contract 4 in docs/DESIGN.md) from a checkpoint state; return its sha256."""
    from pipeline import model as m

    arch = loop_config.model or archlib.DEFAULT_MODEL
    net, classes, _ = m.build_model(m.LoadedWeights(None, None, "", arch=arch),
                                    list(loop_config.classes))
    net.load_state_dict(state["model"])
    preset = presets.Preset.for_crop(loop_config.crop_size).to_dict()
    return m.save_model(path, net, classes, preset, job_config,
                        model_id=f"{arch}-finetuned/{job_config.get('name', '')}"
                                 f"/epoch{state['epoch']}", arch=arch)
