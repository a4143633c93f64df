"""What runs on each Ray Train worker when a model (ResNet-18 by default) is fine-tuned (the driver's side, plan and
fit and export, is ``pipeline.train``).

Each epoch: train over this worker's share of the train split (crops already drawn in the decode
stage by ``presets.TrainTransform`` from (seed, epoch, key) over the whole image), validate over
this worker's share of the val split (every val image exactly once across workers, counts summed
with all_reduce), then report metrics and, from rank 0, a checkpoint (``state.pt``: the
``TrainState``, epoch, config, metrics, history, failures). The state is built by one function
(``build_state``, which the benchmark's training rows use too) and read back by one
(``load_state``).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from pipeline import architectures as archlib, failures as failurelib, faults, model as modellib
from pipeline import presets, progress, ray_compat, timeshare
from pipeline.errors import UsageError

STATE_FILE = "state.pt"


def param_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """Four groups: backbone/head x decay/no-decay; BatchNorm weights and biases get no decay.
    The head is the model's last linear layer (``architectures.head_path``: ``fc``,
    ``classifier.3``, ``heads.head``)."""
    head = archlib.head_path(model) + "."
    groups = {(h, d): [] for h in (False, True) for d in (False, True)}
    for name, p in model.named_parameters():
        is_head = name.startswith(head)
        no_decay = p.ndim <= 1  # biases and BatchNorm affine parameters
        groups[(is_head, not no_decay)].append(p)
    return [{"params": ps, "lr": head_lr if h else lr, "weight_decay": weight_decay if d else 0.0}
            for (h, d), ps in groups.items() if ps]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier (a fraction of the base LR) at optimizer step ``step`` (0-based): linear
    warmup, (step + 1) / warmup over the first ``warmup`` steps (Goyal et al. 2017), then cosine
    decay from 1 to 0 at step ``total`` and after (Loshchilov & Hutter 2017, SGDR, without
    restarts). ``total`` counts the warmup steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Linear probe: every weight but the head's (the last linear layer,
    ``architectures.head_path``) fixed, and everything but the head in eval mode (BatchNorm
    statistics frozen, dropout off); unfrozen, all of it trains. The head's mode is left as
    it was."""
    path = archlib.head_path(model)
    for name, p in model.named_parameters():
        if not name.startswith(path + "."):
            p.requires_grad_(not frozen)
    head = archlib.get_head(model, path)
    head_mode = head.training
    model.train(not frozen)
    head.train(head_mode)


@dataclass(frozen=True)
class LoopConfig:
    """What every Ray Train worker runs with: the recipe (from jobs.finetune's flags), then what
    the driver resolves against the data and the cluster (``plan_run``), then what each worker
    resolves for itself. Saved with every checkpoint as a dict (``saved_config``); a rerun must
    match it in RESUME_KEYS. Learning rates are per 256 images (scaled by the global batch)."""
    weights: str  # the recipe: no defaults here, jobs.finetune's flags are the one place
    epochs: int
    batch_size: int  # per worker; plan_run lowers it to a worker's share of the split
    optimizer: str
    lr: float
    head_lr_mult: float
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    warmup_epochs: float
    crop_size: int
    min_crop_scale: float
    precision: str
    shuffle_buffer: int
    seed: int
    threads: int
    max_failed_fraction: float
    freeze_epochs: int  # backbone frozen (linear probe) for the first N epochs
    # resolved by plan_run
    model: str = ""  # --model: the torchvision architecture ('' until plan_run: the weights')
    classes: tuple = ()
    num_classes: int = 0
    train_samples: int = 0
    world_size: int = 1
    # the MLflow run the rank-0 worker logs each epoch to: (tracking URI, run id), () for none;
    # set by the driver (jobs.finetune), never saved (a URI may carry credentials)
    tracking: tuple = ()
    # resolved by each worker; never saved
    amp_dtype: object = None

    def saved_config(self) -> dict:
        """The dict saved in checkpoints and compared on resume (no per-worker fields)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("amp_dtype", "tracking")}
        out["classes"] = list(self.classes)
        return out

@dataclass
class TrainState:
    """What a worker trains and a checkpoint saves: the model (``LoopConfig.model``, channels_last, on the
    worker's device), its optimizer (SGD or AdamW over ``param_groups``), the per-step warmup +
    cosine schedule (``warmup_cosine``) and the GradScaler (enabled in fp16 only)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    # The module the steps run through: Ray Train's DDP wrapper of ``model`` (None: ``model``)
    net: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def stepped(self) -> nn.Module:
        """The module a train step runs: ``net`` where set, else ``model``."""
        return self.net if self.net is not None else self.model

    def state_dict(self) -> dict:
        """The four state dicts, as ``state.pt`` holds them beside epoch, config and metrics."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a ``load_state`` dict (a disabled GradScaler saved an empty state)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def build_state(cfg: LoopConfig, device: torch.device) -> TrainState:
    """The model (``cfg.weights``, head for ``cfg.classes``, seeded by ``cfg.seed``), optimizer,
    schedule and scaler of a run, on ``device``. Learning rates scale linearly with the global
    batch, ``cfg.batch_size * cfg.world_size`` / 256 (Goyal et al. 2017); the schedule spans
    ``cfg.epochs`` epochs of ``cfg.train_samples / cfg.world_size`` images per worker.
    ``cfg.amp_dtype`` (None: fp32) enables the GradScaler in fp16 only."""
    torch.manual_seed(cfg.seed)
    loaded = modellib.load_weights(cfg.weights, cfg.model)
    model, classes, _ = modellib.build_model(loaded, list(cfg.classes))
    model = model.to(device, memory_format=torch.channels_last)
    world = cfg.world_size
    scale = cfg.batch_size * world / 256  # linear scaling rule (Goyal et al.)
    lr = cfg.lr * scale
    groups = param_groups(model, lr, lr * cfg.head_lr_mult, cfg.weight_decay)
    if cfg.optimizer == "adamw":  # converges faster from random init on small data
        optimizer = torch.optim.AdamW(groups, lr=lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                                    nesterov=cfg.nesterov)
    # Counts the partial batch that drop_last skips, so the cosine ends just above 0. Counting
    # exactly (floor) moved the demo from 87.7% to 75.0% val top-1 with the centre-square crop
    # of the time (seed sensitivity on 1200 images, same run otherwise): kept as it was.
    steps = max(1, math.ceil(cfg.train_samples / world / cfg.batch_size))
    total, warmup = steps * cfg.epochs, max(1, int(steps * cfg.warmup_epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup, total))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp_dtype == torch.float16)
    return TrainState(model, optimizer, scheduler, scaler)


def load_state(folder: str, map_location="cpu") -> dict:
    """The state a rank-0 worker saved in a checkpoint folder (a local path, or a URI that
    ``pipeline.storage`` reads): ``TrainState.state_dict``'s four keys plus epoch, config,
    metrics, history and failures; loaded with ``weights_only=True`` onto ``map_location``.
    The one reader of ``state.pt``: the resuming worker, the driver after ``fit`` and a rerun
    that has nothing left to train. FileNotFoundError when the folder holds no state.pt."""
    from pipeline import storage

    data = storage.read_bytes(storage.join(folder, STATE_FILE))
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def train_step(state: TrainState, images, labels, ok, loss_fn, amp_dtype):
    """One optimizer step of ``state`` on a batch; returns (loss, logits).

    ``images``: uint8 N x 3 x H x W on the training device (already augmented); ``labels``:
    int64 N; ``ok``: bool N, False for undecodable samples, which keep their row (equal step
    counts across DDP workers) at weight 0 in the loss; ``loss_fn`` has ``reduction="none"``;
    ``amp_dtype``: torch.float32 (no autocast), torch.bfloat16 or torch.float16 (with
    ``state.scaler``). The model runs in channels_last on normalized input
    (``presets.normalize``). The schedule is stepped by the caller.
    """
    device = images.device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
        logits = state.stepped(presets.normalize(images))
        loss = (loss_fn(logits.float(), labels) * ok).sum() / ok.sum().clamp(min=1)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss, logits


def train_one_epoch(state: TrainState, batches, cfg: LoopConfig, epoch: int):
    """Train ``state`` for one epoch over ``batches`` (this worker's ``DataIterator`` of the
    train split), stepping its schedule per batch; collective (all ranks call it). Returns (metrics
    over all workers: train_loss, train_top1 % on the augmented crops, train_images,
    train_failed, train_seconds, train_first_step_seconds, train_steady_images_per_s; this
    worker's failed samples as [{"key", "shard", "split", "error"}])."""
    # drop_last: a 1-image tail batch breaks BatchNorm in train mode; every worker holds the same
    # number of rows (equal split), so all drop the same tail and DDP stays in lockstep.
    faults.hold(f"train_epoch_{epoch}")  # (tests) a worker held on a node that is then lost
    device = state.device
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    state.stepped.train()
    set_backbone_frozen(state.model, epoch < cfg.freeze_epochs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")
    seen = correct = 0
    loss_sum, t0, failures = 0.0, time.monotonic(), []
    clock = timeshare.SteadyClock(t0)  # steady state: from the end of the first step on
    wait = compute = 0.0  # steady steps: blocked on the iterator, and in the step (timeshare)
    buffer = shuffle_buffer_rows(cfg)
    stream = iter(batches.iter_batches(
        batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=(cfg.seed * 1000 + epoch) if buffer else None))
    world = cfg.world_size or 1
    # rank 0's rows times the world size: every worker holds an equal share (drop_last)
    bar = progress.Progress(cfg.train_samples, f"epoch {epoch + 1}/{cfg.epochs} train",
                            enabled=rank == 0 and cfg.train_samples > 0, tty=False,
                            emit=logging.getLogger(__name__).info)
    for step in itertools.count():
        asked = time.monotonic()
        batch = next(stream, None)
        if batch is None:
            break
        got = time.monotonic()
        faults.kill_once("train_step", epoch=epoch, step=step, rank=rank)
        ok = torch.from_numpy(batch["error"] == "").to(device)
        # already cropped and flipped in the decode stage, from (seed, epoch, key)
        images = torch.from_numpy(batch["image"]).to(device, non_blocking=True)
        labels = torch.from_numpy(np.maximum(batch["label"], 0)).to(device)
        loss, logits = train_step(state, images, labels, ok, loss_fn, cfg.amp_dtype)
        state.scheduler.step()
        n_ok = int(ok.sum())
        seen += n_ok
        failures += failurelib.rows(batch, "train")
        # both read back from the device: the step's work is done when they return
        loss_sum += float(loss.detach()) * n_ok
        correct += int(((logits.argmax(1) == labels) & ok).sum())
        done = time.monotonic()
        bar.update(len(ok) * world)
        if clock.first is not None:
            wait, compute = wait + got - asked, compute + done - got
        clock.mark(len(ok), done)
    end = time.monotonic()
    steady_rows = clock.steady_rows
    seen, correct, loss_sum, failed, steady_rows, wait, compute = _all_reduce(
        [seen, correct, loss_sum, len(failures), steady_rows, wait, compute], device)
    seconds, first_step = _all_reduce([end - t0, clock.startup_seconds(end)], device, op="max")
    return {"train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
            "train_images": int(seen), "train_failed": int(failed), "train_seconds": seconds,
            # The first step waits for the epoch's data pipeline to start and fill the shuffle
            # buffer: a fixed cost per epoch, large on tiny epochs, negligible on ImageNet.
            "train_first_step_seconds": first_step,
            "train_steady_images_per_s": steady_rows / max(seconds - first_step, 1e-9),
            # where the steady steps' time went, per worker on average (pipeline/timeshare.py)
            "train_data_wait_seconds": wait / world, "train_compute_seconds": compute / world,
            "train_data_wait_share": timeshare.share(wait, wait + compute)}, failures


def _wait_text(wait_share: float | None) -> str:
    """The epoch line's short form of ``timeshare.train_text``: ``data wait 63% (input-bound)``."""
    if wait_share is None:
        return "data wait not measured"
    bound = " (input-bound)" if wait_share > timeshare.INPUT_BOUND else ""
    return f"data wait {wait_share:.0%}{bound}"


def shuffle_buffer_rows(cfg: LoopConfig) -> int:
    """The local shuffle buffer, capped at a quarter of this worker's share of an epoch. The
    first batch waits until the buffer is full, so a buffer near the whole share would make
    every epoch decode first and train after, instead of both at once."""
    if not cfg.shuffle_buffer:
        return 0
    share = cfg.train_samples // cfg.world_size
    return min(cfg.shuffle_buffer, max(cfg.batch_size, share // 4))


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """Sum (or max) numbers over all workers; the numbers themselves on a single process."""
    if not torch.distributed.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max"
                                 else torch.distributed.ReduceOp.SUM)
    return t.cpu().tolist()


def _broadcast_buffers(model: nn.Module) -> None:
    if torch.distributed.is_initialized():
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


def _gather_failures(failures: list[dict], total: int) -> list[dict]:
    """Every worker's failed samples, on every worker (collective: all ranks call it)."""
    if total == 0 or not torch.distributed.is_initialized():
        return failures
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, failures)
    return sorted((f for part in out for f in part), key=lambda f: (f["split"], f["key"]))


@torch.inference_mode()
def validate(model: nn.Module, batches, cfg: LoopConfig) -> tuple[dict, list[dict]]:
    """Top-1/top-5 of ``model`` (the bare module, not DDP's wrapper) over ``batches``, this
    worker's share of val, summed over all workers (collective). Returns (val_images,
    val_failed, val_top1 %, val_top5 %; this worker's failed samples)."""
    device = next(model.parameters()).device
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # seen, top1, top5, failed
    k = min(5, cfg.num_classes)
    failures = []
    for batch in batches.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        ok = batch["error"] == ""
        counts[3] += int((~ok).sum())
        failures += failurelib.rows(batch, "val")
        if not ok.any():
            continue
        images = torch.from_numpy(batch["image"][ok]).to(device)
        labels = torch.from_numpy(batch["label"][ok]).to(device)
        with torch.autocast(device.type, dtype=cfg.amp_dtype,
                            enabled=cfg.amp_dtype != torch.float32):
            logits = model(presets.normalize(images))
        topk = logits.float().topk(k, dim=1).indices
        counts[0] += len(labels)
        counts[1] += int((topk[:, 0] == labels).sum())
        counts[2] += int((topk == labels[:, None]).any(1).sum())
    if torch.distributed.is_initialized():
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    seen = max(float(counts[0]), 1.0)
    return {"val_images": int(counts[0]), "val_failed": int(counts[3]),
            "val_top1": 100.0 * float(counts[1]) / seen,
            "val_top5": 100.0 * float(counts[2]) / seen}, failures

RESUME_KEYS = ("weights", "model", "batch_size", "optimizer", "lr", "crop_size", "train_samples",
               "classes", "world_size", "seed")


def check_resumable(saved: dict, cfg: LoopConfig) -> None:
    """A rerun under the same name must be the same run (more epochs allowed): otherwise the
    restored optimizer and schedule would silently continue a different experiment."""
    now = cfg.saved_config()
    # a checkpoint from before --model trained ResNet-18
    saved = {"model": archlib.DEFAULT_MODEL, **saved}
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
    if changed:
        shown = [k if k in ("classes", "train_samples") else f"{k} {saved[k]!r} -> {now[k]!r}"
                 for k in changed]
        raise UsageError(f"run exists with different {', '.join(shown)}: use a new --name, "
                         f"or the same settings to resume")


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function: build, resume if a checkpoint exists, train, report.
    ``config``: {"loop": LoopConfig} (Ray Train hands workers a dict)."""
    import ray.train
    import ray.train.torch

    ray_compat.quiet_train_reports()  # its INFO line per report buried the epoch line
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cfg: LoopConfig = config["loop"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ray.train.torch.get_device()
    cfg = replace(cfg, world_size=ctx.get_world_size(),
                  amp_dtype=modellib.resolve_precision(cfg.precision, device))
    state = build_state(cfg, device)
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = load_state(d, device)
        check_resumable(saved["config"], cfg)
        state.load_state_dict(saved)
        start, history = saved["epoch"] + 1, list(saved.get("history", []))
    train_it, val_it = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    tracker = None
    if rank == 0 and cfg.tracking:  # one process logs each epoch: MLflow is imported here only
        from pipeline import tracking

        tracker = tracking.Tracker(*cfg.tracking)
    net_frozen = None
    for epoch in range(start, cfg.epochs):
        frozen = epoch < cfg.freeze_epochs
        if state.net is None or frozen != net_frozen:  # DDP is rebuilt when trainables change
            set_backbone_frozen(state.model, frozen)
            state.net = ray.train.torch.prepare_model(state.model, move_to_device=False)
            net_frozen = frozen
        m, train_failures = train_one_epoch(state, train_it, cfg, epoch)
        # Validate the bare module: DDP's forward syncs buffers collectively, and workers hold
        # unequal shares of val (every image exactly once), so a DDP forward would deadlock.
        # DDP broadcasts BatchNorm statistics from rank 0 *before* each forward, so after the
        # last step every rank holds different ones: take rank 0's (the checkpointed model) so
        # that all ranks validate the same model.
        _broadcast_buffers(state.model)
        val_metrics, val_failures = validate(state.model, val_it, cfg)
        m.update(val_metrics)
        failures = _gather_failures(train_failures + val_failures,
                                    m["train_failed"] + m["val_failed"])
        attempted = m["train_images"] + m["train_failed"] + m["val_images"] + m["val_failed"]
        m.update(epoch=epoch, lr=state.optimizer.param_groups[0]["lr"], backbone_frozen=frozen,
                 precision=modellib.precision_name(cfg.amp_dtype),  # what this worker ran
                 train_images_per_s=m["train_images"] / m["train_seconds"],
                 failed_fraction=len(failures) / max(attempted, 1))
        # Every rank computes the same verdict from reduced counts, so all stop together.
        allowed = cfg.max_failed_fraction
        m["stopped"] = (f"{len(failures)} of {attempted} samples failed to decode in epoch "
                        f"{epoch + 1} (allowed: {allowed:.2%})"
                        if failurelib.over_limit(len(failures), attempted, allowed) else "")
        history.append(m)
        if rank == 0:
            # A log record, not print: Ray Train patches print in its workers to log the line
            # and also prints it when sys.stdout is not sys.__stdout__: every line came twice.
            logging.getLogger(__name__).info(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {m['train_loss']:.3f} "
                f"top-1 {m['train_top1']:.1f}% | val top-1 {m['val_top1']:.1f}% top-5 "
                f"{m['val_top5']:.1f}% ({m['val_images']} images) | "
                f"{m['train_images_per_s']:.0f} train images/s | "
                + _wait_text(m["train_data_wait_share"])
                + (f" | {len(failures)} failed to decode" if failures else ""))
        _report(state, cfg, epoch, m, history, failures)
        if tracker is not None:  # after the checkpoint: a logged epoch is a recorded one
            tracker.metrics(m, step=epoch + 1)
        if m["stopped"]:
            break


def _report(state: TrainState, cfg: LoopConfig, epoch: int, metrics: dict, history: list,
            failures: list) -> None:
    """``ray.train.report`` the epoch's metrics; rank 0 with a checkpoint holding ``state.pt``
    (what ``load_state`` reads)."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({**state.state_dict(), "epoch": epoch, "config": cfg.saved_config(),
                    "metrics": metrics, "history": history, "failures": failures},
                   os.path.join(d, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

