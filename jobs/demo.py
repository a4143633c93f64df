"""The whole pipeline on generated data and a local Ray cluster, in a few minutes on a laptop."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from jobs import _cli, finetune, predict as predict_job
from pipeline import machine, metrics, readers, shards, sources, storage, synthetic


@dataclass(frozen=True)
class DemoConfig:
    """Generate a 10-class image set (shapes on noisy backgrounds, JPEGs of varied size), shard it,
    fine-tune ResNet-18 with Ray Train on a local Ray cluster, run batch inference over the
    held-out val split and print top-1/top-5. Everything goes under --workdir; DIR/eval is laid
    out as jobs.predict --out lays it out. With the default --weights none it trains from random
    init, because pretrained weights cannot be downloaded offline; --weights DEFAULT uses them."""
    workdir: str = _cli.option("", "folder for images, shards, the run and DIR/eval "
                                   "(default: ./demo-<time>)")
    weights: str = _cli.option("none", "none (random init), DEFAULT, IMAGENET1K_V1 or a file")
    classes: int = _cli.option(10, "number of shape classes (2..10)")
    train_per_class: int = _cli.option(120, "generated train images per class")
    val_per_class: int = _cli.option(30, "generated val images per class")
    epochs: int = _cli.option(14, "fine-tuning epochs")
    num_workers: int = _cli.option(2, "Ray Train workers")
    crop_size: int = _cli.option(64, "crop size (reduced from 224 for CPU speed)")
    batch_size: int = _cli.option(32, "batch size per worker")
    lr: float = _cli.option(0.012, "AdamW learning rate per 256 images")
    samples_per_shard: int = _cli.option(300, "images per shard")
    seed: int = _cli.option(0, "seed for data generation and training")
    precision: str = _cli.option("auto", "fine-tuning and inference precision (auto: bf16 where "
                                         "the CPU has it, else fp32: the figure differs by "
                                         "machine, README)", choices=["auto", "fp32", "bf16"])


def small_cpu_recipe(shard_dir: str, storage_path: str, name: str,
                     **flags) -> finetune.FinetuneConfig:
    """The demo's fine-tuning recipe on SHARD_DIR/{train,val}.json (AdamW, weight decay 0.05,
    1 warm-up epoch, RandomResizedCrop from half the area, 2 workers of half a CPU and one
    thread each): learnable in minutes on 2 cores from random init. ``flags`` are
    FinetuneConfig fields that override it."""
    recipe = dict(train=os.path.join(shard_dir, "train.json"),
                  val=os.path.join(shard_dir, "val.json"), num_workers=2, cpus_per_worker=0.5,
                  threads=1, storage_path=storage_path, name=name, optimizer="adamw",
                  warmup_epochs=1.0, shuffle_buffer=256, weight_decay=0.05, min_crop_scale=0.5)
    return finetune.FinetuneConfig(**{**recipe, **flags})


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(DemoConfig, argv, "demo")
    _cli.setup_logging()
    t0 = time.monotonic()
    work = os.path.abspath(cfg.workdir or time.strftime("demo-%Y%m%d-%H%M%S"))
    images, shard_dir = os.path.join(work, "images"), os.path.join(work, "shards")
    print(f"[1/5] generating {cfg.classes} classes x ({cfg.train_per_class} train + "
          f"{cfg.val_per_class} val) JPEGs in {images}")
    synthetic.generate_image_folder(images, {"train": cfg.train_per_class,
                                             "val": cfg.val_per_class},
                                    num_classes=cfg.classes, seed=cfg.seed)
    _cli.init_ray()
    print(f"[2/5] sharding into {shard_dir}")
    train_m = shards.write_shards(sources.scan_source(os.path.join(images, "train"), "train"),
                                  shard_dir, cfg.samples_per_shard, cfg.seed, progress=False)
    val_src = sources.with_classes(sources.scan_source(os.path.join(images, "val"), "val"),
                                   train_m.classes)
    val_m = shards.write_shards(val_src, shard_dir, cfg.samples_per_shard, cfg.seed,
                                progress=False)
    readers.write_hf_card(shard_dir)
    print(f"      train {train_m.total_samples} samples / {len(train_m.shards)} shards, "
          f"val {val_m.total_samples} / {len(val_m.shards)}")
    if cfg.weights.lower() == "none":
        print("[3/5] fine-tuning ResNet-18 FROM RANDOM INIT (pretrained weights cannot be "
              "downloaded here; pass --weights DEFAULT to use them)")
    else:
        print(f"[3/5] fine-tuning ResNet-18 from weights {cfg.weights}")
    trained = finetune.run(small_cpu_recipe(
        shard_dir, os.path.join(work, "runs"), "demo", weights=cfg.weights, epochs=cfg.epochs,
        num_workers=cfg.num_workers, batch_size=cfg.batch_size, lr=cfg.lr,
        crop_size=cfg.crop_size, seed=cfg.seed, precision=cfg.precision))
    print(f"      last epoch: train loss {trained['train_loss']:.3f}, val top-1 "
          f"{trained['val_top1']:.1f}%, {trained['train_images_per_s']:.0f} train images/s")
    eval_dir = os.path.join(work, "eval")
    print(f"[4/5] batch inference over val into {eval_dir}")
    summary = predict_job.run(predict_job.PredictConfig(
        data=os.path.join(shard_dir, "val.json"), weights=trained["model"], out=eval_dir,
        batch_size=64, progress=False, precision=cfg.precision))
    print("[5/5] results (measured by this run)")
    print(metrics.format_table(summary))
    print(json.dumps({"workdir": work, "shards": shard_dir, "run": trained["run_dir"],
                      "model": trained["model"],
                      "predictions": storage.join(eval_dir, "predictions"),
                      "summary": storage.join(eval_dir, "summary.json"),
                      "wall_seconds": round(time.monotonic() - t0, 1)}, indent=1))
    # as pytest's last line: what ran, where (the top-1 differs by CPU kind and precision)
    print(f"demo: top-1 {summary['top1']:.1f}% in {summary['precision']} (--precision "
          f"{cfg.precision}) on {machine.describe()}, {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
