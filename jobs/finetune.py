"""Fine-tune ResNet-18 with Ray Train on WebDataset shards; writes STORAGE/NAME/model.pt."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import architectures, deadline, presets, resources, storage, timeshare, tracking
from pipeline import train


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune a torchvision classifier (ResNet-18 by default, --model for any other) with Ray
    Train (TorchTrainer): a new head when the data's classes differ from the weights' classes. Checkpoints go to STORAGE/NAME; rerunning with the
    same --storage-path and --name resumes from the last one; the final model is
    STORAGE/NAME/model.pt (loadable by jobs.predict --weights)."""
    train: str = _cli.option("", "train manifest (OUT/train.json from jobs.shard)", required=True)
    val: str = _cli.option("", "val manifest (OUT/val.json from jobs.shard)", required=True)
    weights: str = _cli.option("DEFAULT", "DEFAULT, a member of the model's weights enum "
                                          "(IMAGENET1K_V1, IMAGENET1K_V2, ...), none (random "
                                          "init) or a file (state_dict or model.pt)")
    model: str = _cli.option("", architectures.MODEL_HELP)
    epochs: int = _cli.option(10, "epochs to train")
    num_workers: int = _cli.option(2, "Ray Train workers (one GPU each with --use-gpu)")
    use_gpu: bool = _cli.option(False, "train on GPUs (NCCL); without it CPUs (gloo)")
    cpus_per_worker: float = _cli.option(0.0, "CPUs each worker reserves in Ray (0: auto: 1 "
                                              "with a GPU; on CPUs what leaves a quarter of the "
                                              "cluster's CPUs, at least one, to the decode "
                                              "tasks). A setting that leaves the decode tasks no "
                                              "CPU is refused")
    threads: int = _cli.option(0, "torch threads per worker (0: Ray's default, the reserved CPUs)")
    storage_path: str = _cli.option("runs", "where runs live (shared storage on a cluster: "
                                            "s3://... or an NFS mount)")
    name: str = _cli.option("resnet18-finetune", "run name; the same name resumes")
    mode: str = _cli.option("finetune", "finetune: train everything; probe: train the head only "
                                        "(backbone frozen, BatchNorm in eval mode)",
                            choices=["finetune", "probe"])
    unfreeze_after: int = _cli.option(0, "with --mode probe: unfreeze the backbone after this "
                                         "many epochs (0: never)")
    batch_size: int = _cli.option(64, "batch size per worker (lowered, with a warning, to a "
                                      "worker's share of the train split when that is smaller)")
    optimizer: str = _cli.option("sgd", "sgd (momentum, as torchvision's reference) or adamw "
                                        "(faster from random init on small data)",
                                 choices=["sgd", "adamw"])
    lr: float = _cli.option(0.1, "learning rate per 256 images (scaled by the global batch)")
    head_lr_mult: float = _cli.option(1.0, "head learning rate = lr x this")
    momentum: float = _cli.option(0.9, "SGD momentum")
    nesterov: bool = _cli.option(True, "Nesterov momentum")
    weight_decay: float = _cli.option(1e-4, "weight decay (none on BatchNorm and biases)")
    label_smoothing: float = _cli.option(0.1, "label smoothing")
    warmup_epochs: float = _cli.option(1.0, "linear warmup epochs before the cosine decay")
    crop_size: int = _cli.option(presets.CROP_SIZE, "training and validation crop size")
    min_crop_scale: float = _cli.option(0.08, "RandomResizedCrop's smallest area fraction")
    precision: str = _cli.option("auto", "autocast precision (auto: bf16 where supported)",
                                 choices=["auto", "fp32", "bf16", "fp16"])
    shuffle_buffer: int = _cli.option(1000, "local shuffle buffer (rows) on each worker, capped at "
                                            "a quarter of its share of an epoch")
    seed: int = _cli.option(0, "seed for init, shard order and augmentation")
    max_failures: int = _cli.option(2, "worker-group restarts from the last checkpoint")
    num_to_keep: int = _cli.option(2, "checkpoints kept")
    decode_concurrency: int = _cli.option(0, "decode tasks at once (0: the CPUs the plan leaves "
                                             "to decoding, one task each)")
    max_failed_fraction: float = _cli.option(
        0.0, "stop (exit 1) after an epoch in which more than this fraction of train+val "
             "samples failed to decode; they are listed in STORAGE/NAME/failures.parquet")
    max_wait: str = _cli.option("15m", deadline.MAX_WAIT_HELP)
    mlflow_uri: str = _cli.option("", tracking.URI_HELP, recorded=False)
    deadline: str = _cli.deadline_option("0")  # after max_wait: it hides the module here


def loop_config(cfg: FinetuneConfig) -> train.LoopConfig:
    """The workers' typed config: every LoopConfig recipe field takes the flag of its name."""
    freeze = 0 if cfg.mode == "finetune" else (cfg.unfreeze_after or cfg.epochs)
    recipe = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(train.LoopConfig)
              if hasattr(cfg, f.name)}
    return train.LoopConfig(**recipe, freeze_epochs=freeze)


def run(cfg: FinetuneConfig) -> dict:
    """Check the run (``train.plan_run``: nothing is written when it is refused), train, export
    model.pt, and return the last epoch's metrics with the output paths."""
    loop = loop_config(cfg)
    workers = resources.plan_training(resources.current_cluster(), cfg.num_workers, cfg.use_gpu,
                                      cfg.cpus_per_worker)
    plan = train.plan_run(loop, workers, train_manifest=cfg.train, val_manifest=cfg.val,
                          storage_path=cfg.storage_path, name=cfg.name)
    for note in plan.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"resources: {plan.resources.describe()}")
    if plan.first_epoch == 0 and cfg.weights.lower() == "none":
        print("weights: none -> a random init (no pretrained weights) for a new run")
    if plan.first_epoch >= cfg.epochs:
        print(f"run {cfg.name} has already trained {plan.first_epoch} of {cfg.epochs} epochs: "
              f"nothing to train (rerun with a higher --epochs to go on)")
    elif plan.first_epoch:
        print(f"resuming run {cfg.name} at epoch {plan.first_epoch + 1} of {cfg.epochs}, from the "
              f"last checkpoint Ray Train recorded")
    job_config = _cli.to_dict(cfg)
    tracker, plan = train.start_tracking(plan, tracking.uri_of(cfg.mlflow_uri), job_config)
    ok = False
    try:
        out = train.run_planned(plan, job_config=job_config,
                                max_failures=cfg.max_failures, num_to_keep=cfg.num_to_keep,
                                decode_concurrency=cfg.decode_concurrency or None,
                                max_wait=deadline.parse_duration("--max-wait", cfg.max_wait))
        ok = True
        return out
    except deadline.DeadlineExceeded as e:
        kept = train.recorded_checkpoint(cfg.storage_path, cfg.name)
        raise deadline.DeadlineExceeded(
            f"{e}. " + (f"{kept[1] + 1} of {cfg.epochs} epochs were done; the last "
                        f"checkpoint ({kept[0]}) is kept: the same command resumes from it"
                        if kept else
                        "No epoch had finished, so no checkpoint: the same command starts "
                        "over")) from None
    finally:  # what there is, whatever happened: the run's own files are the record
        for name in ("model.pt", "history.json"):
            path = storage.join(plan.run_dir, name)
            if tracker.enabled and storage.exists(path):
                tracker.artifact(path)
        tracker.end(ok)


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(FinetuneConfig, argv, "finetune")
    budget = deadline.parse_duration("--deadline", cfg.deadline)
    deadline.parse_duration("--max-wait", cfg.max_wait)
    train.check_inputs(cfg.train, cfg.val, cfg.weights, cfg.model)  # before Ray starts
    with deadline.job_deadline(budget):  # DeadlineExceeded: exit 6, the checkpoints kept
        _cli.setup_logging()
        _cli.init_ray()
        out = run(cfg)
    # history.json counts epochs from 0; the epoch lines and this summary from 1
    print(json.dumps({"epochs_trained": out["epoch"] + 1,
                      **{k: out.get(k) for k in ("train_loss", "train_top1", "val_top1",
                                                 "val_top5", "train_images_per_s",
                                                 "train_data_wait_share", "model")}}, indent=1))
    # a run resumed from a checkpoint written before the data wait was timed has none
    if "train_data_wait_share" in out:
        print(f"last epoch: {timeshare.train_text(out['train_data_wait_share'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
