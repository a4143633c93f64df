"""Throughput of each stage side by side with its baseline and the machine's ceiling."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from jobs import _cli, finetune, predict as predict_job
from pipeline import benchmark as bench, model as modellib, shards, sources, synthetic
from pipeline import predict as predict_lib
from pipeline.errors import PipelineError, UsageError

TARGETS = {"eval_vs_ceiling": (">=", 0.8), "eval_vs_baseline": (">=", 2.0),
           "train_vs_plain": (">=", 0.8), "shard_vs_tar": (">=", 0.5),
           "eval_time_ratio_4x": ("<=", 4.4), "eval_mem_ratio_4x": ("<=", 1.25)}


MIN_TRAIN_STEPS = 3


@dataclass(frozen=True)
class BenchmarkConfig:
    """Generate ImageNet-like JPEGs (~500x375, ~110 KB) and measure, in one run on this machine:
    evaluation (the prediction job at its defaults and in fp32, against the model alone on
    pre-decoded tensors and against an ImageFolder + DataLoader + fp32 loop), training (the Ray
    Train job against a plain single-process loop), decoding (the Ray Data stage against a PIL
    loop), sharding (against `tar cf`) and growth (the prediction job at N and 4N images). Prints
    a table; --json writes the figures."""
    quick: bool = _cli.option(False, "small sizes (under ~3 minutes on 2 cores)")
    images: int = _cli.option(0, "N, images for the evaluation runs (0: 160, or 64 with --quick)")
    train_images: int = _cli.option(0, "images for the training runs (0: 6 batches, or 4 with "
                                       "--quick; at least 3 batches)")
    train_crop: int = _cli.option(112, "training crop size (reduced from 224 for CPU speed)")
    batch_size: int = _cli.option(32, "batch size for evaluation and training")
    json: str = _cli.option("", "write the figures to this JSON file")
    workdir: str = _cli.option("", "scratch folder (default: a temporary one, deleted)")


def _copy_subset(files: list[str], src: str, dest: str, origin: str) -> None:
    """Copy the first files (named relative to ``src``) from ``origin`` into ``dest``."""
    for f in files:
        out = os.path.join(dest, os.path.relpath(f, src))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy(os.path.join(origin, os.path.relpath(f, src)), out)


def _row(name, value, base, ratio_key, results, unit="img/s", ratio=None):
    results[ratio_key] = ratio if ratio is not None else (value / base if base else float("nan"))
    op, target = TARGETS.get(ratio_key, ("", None))
    ok = "" if target is None else ("met" if (results[ratio_key] >= target if op == ">="
                                              else results[ratio_key] <= target) else "MISSED")
    goal = f"{op} {target}" if target is not None else ""
    return f"| {name} | {value:.1f} {unit} | {base:.1f} {unit} | {results[ratio_key]:.2f} | {goal} {ok} |"


def train_images(cfg: BenchmarkConfig) -> int:
    """Images for the training rows. Their steady rate leaves out each epoch's first step, so
    an epoch needs several steps (--quick once trained 48 images at batch 32: one step, and the
    row read 0.0). One worker takes the whole split."""
    n = cfg.train_images or (4 if cfg.quick else 6) * cfg.batch_size
    if n // cfg.batch_size < MIN_TRAIN_STEPS:
        raise UsageError(f"--train-images {n} at --batch-size {cfg.batch_size} is "
                         f"{n // cfg.batch_size} steps an epoch; the steady training rate needs "
                         f"at least {MIN_TRAIN_STEPS}")
    return n


def run(cfg: BenchmarkConfig, work: str) -> tuple[dict, list[str]]:
    """Every measurement, in one run; returns (figures, table rows)."""
    n = cfg.images or (64 if cfg.quick else 160)
    n_train = train_images(cfg)
    r, rows = {}, []
    src, big, small = (os.path.join(work, d) for d in ("jpeg", "src4n", "srcn"))
    files = synthetic.generate_photo_folder(src, 4 * n, num_classes=10)
    os.rename(src, big)
    _copy_subset(files[:n], src, small, big)  # the N-image set is the first N of the 4N set
    _cli.init_ray()
    manifest, manifest4 = _bench_shard_and_decode(work, small, big, n, r, rows)
    dtype = modellib.resolve_precision("auto", torch.device("cpu"))
    _bench_eval(cfg, work, big, manifest, manifest4, n, dtype, r, rows)
    train_src = os.path.join(work, "train")
    _copy_subset(files[:n_train], src, train_src, big)
    _bench_train(cfg, work, train_src, dtype, r, rows)
    r["machine"] = {"cores": os.cpu_count(), "cpu": _cpu_name(),
                    "torch_threads": torch.get_num_threads(),
                    "precision": modellib.precision_name(dtype),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "images": n, "train_images": n_train}
    return r, rows


def _bench_shard_and_decode(work, small, big, n, r, rows) -> tuple[str, str]:
    def shard(src, out):
        t0 = time.monotonic()
        m = shards.write_shards(sources.scan_source(src, "val"), os.path.join(work, out),
                                samples_per_shard=max(8, n // 2), progress=False)
        return m["_stats"]["source_bytes"] / 1e6, time.monotonic() - t0

    # Like the decode and eval rows: a steady-state rate from the N and 4N runs (start-up, and
    # the Ray workers' first import of the code, cancel out); the cold first run is reported
    # apart. tar gets the same treatment.
    mb, cold_s = shard(small, "sn_cold")
    mb, small_s = shard(small, "sn")
    mb4, big_s = shard(big, "s4n")
    shard_mb_s = bench.differential_rate(mb, small_s, mb4, big_s)
    tar_small = bench.tar_seconds(small, os.path.join(work, "plain.tar"))
    tar_big = bench.tar_seconds(big, os.path.join(work, "plain4.tar"))
    tar_mb_s = bench.differential_rate(mb, tar_small, mb4, tar_big)
    r.update(shard_cold_mb_s=mb / cold_s, shard_cold_s=cold_s, tar_mb_s=tar_mb_s,
             tar_small_mb_s=mb / tar_small)
    rows.append(_row("sharding (jobs.shard vs tar cf)", shard_mb_s, tar_mb_s, "shard_vs_tar", r,
                     "MB/s"))
    manifest, manifest4 = os.path.join(work, "sn", "val.json"), os.path.join(work, "s4n", "val.json")
    cores = os.cpu_count()
    bench.stream_seconds(manifest)  # warm-up: Ray starts its data workers on the first pass
    stream = bench.differential_rate(n, bench.stream_seconds(manifest), 4 * n,
                                     bench.stream_seconds(manifest4))
    pil = bench.pil_decode_rate(sorted(os.path.join(dp, f) for dp, _, fs in os.walk(small)
                                       for f in fs))
    r.update(decode_img_s=stream, pil_img_s=pil, decode_img_s_per_core=stream / cores)
    rows.append(_row(f"decode (Ray Data, {cores} cores vs PIL, 1 core)", stream, pil,
                     "decode_vs_pil", r))
    return manifest, manifest4


def _bench_eval(cfg, work, big, manifest, manifest4, n, dtype, r, rows) -> None:
    def predict(manifest_path, precision, out):
        with bench.PeakMemory() as mem:  # "none": random init with the data's 10 classes
            s = predict_job.run(predict_job.PredictConfig(
                data=manifest_path, weights="none", out=os.path.join(work, out),
                precision=precision, batch_size=cfg.batch_size,
                progress=False))
        return s, mem.peak

    # Steady-state images/s from the N and 4N runs: start-up (cluster, actors, first batch)
    # cancels out. The N-run's start-up is reported apart.
    s_def, mem_n = predict(manifest, "auto", "e_def")
    s4, mem_4n = predict(manifest4, "auto", "e_4n")
    s_fp32, _ = predict(manifest, "fp32", "e_fp32")
    s4_fp32, _ = predict(manifest4, "fp32", "e_4n_fp32")
    rate = bench.differential_rate(n, s_def["wall_seconds"], 4 * n, s4["wall_seconds"])
    rate32 = bench.differential_rate(n, s_fp32["wall_seconds"], 4 * n, s4_fp32["wall_seconds"])
    # The predictor actor runs as many torch threads as the machine has cores (the job's
    # default with one actor): so does the ceiling.
    threads = predict_lib.cpu_threads(1)
    ceiling = bench.eval_ceiling_rate(dtype, cfg.batch_size, threads, 8 * cfg.batch_size, 10)
    ceiling32 = bench.eval_ceiling_rate(torch.float32, cfg.batch_size, threads,
                                        4 * cfg.batch_size, 10)
    baseline = bench.eval_baseline_rate(big, cfg.batch_size, os.cpu_count(), threads, 10)
    r.update(eval_img_s=rate, eval_fp32_img_s=rate32,
             eval_ceiling_img_s=ceiling, eval_ceiling_fp32_img_s=ceiling32,
             eval_baseline_img_s=baseline, eval_startup_s=s_def["wall_seconds"] - n / rate)
    prec = modellib.precision_name(dtype)
    rows.append(_row(f"eval, job default ({prec}) vs model alone", r["eval_img_s"], ceiling,
                     "eval_vs_ceiling", r))
    rows.append(_row(f"eval, job default ({prec}) vs ImageFolder+DataLoader fp32",
                     r["eval_img_s"], baseline, "eval_vs_baseline", r))
    rows.append(_row("eval, job fp32 vs model alone fp32", r["eval_fp32_img_s"], ceiling32,
                     "eval_fp32_vs_ceiling_fp32", r))
    r.update(eval_peak_mem_n_mb=mem_n / 1e6, eval_peak_mem_4n_mb=mem_4n / 1e6)
    rows.append(_row(f"growth: job wall time, {4 * n} vs {n} images", s4["wall_seconds"],
                     s_def["wall_seconds"], "eval_time_ratio_4x", r, "s"))
    rows.append(_row("growth: peak memory (driver + Ray workers), 4N vs N", mem_4n / 1e6,
                     mem_n / 1e6, "eval_mem_ratio_4x", r, "MB"))


def _bench_train(cfg, work, train_src, dtype, r, rows) -> None:
    tm = shards.write_shards(sources.scan_source(train_src, "train"), os.path.join(work, "st"),
                             samples_per_shard=8, progress=False)
    # Throughput only: the same images serve as the (required) val split.
    shards.write_shards(sources.with_classes(sources.scan_source(train_src, "val"),
                                             tm["classes"]),
                        os.path.join(work, "st"), samples_per_shard=64, progress=False)
    # The same settings as the plain loop: one process of batch B on every core (the plain loop
    # has no DDP, so neither does this row: it measures what Ray Train's streaming and
    # reporting cost, not gloo on one machine). Steady state, like the plain loop: from the end
    # of each epoch's first step; the first step's wait is reported apart.
    cores = os.cpu_count()
    out = finetune.run(finetune.FinetuneConfig(
        train=os.path.join(work, "st", "train.json"), val=os.path.join(work, "st", "val.json"),
        weights="none", epochs=3, num_workers=1, cpus_per_worker=max(1, cores - 1), threads=cores,
        storage_path=os.path.join(work, "runs"), name="bench", batch_size=cfg.batch_size,
        crop_size=cfg.train_crop, shuffle_buffer=64))
    steady = [h["train_steady_images_per_s"] for h in out["history"][1:]]  # epoch 1: warm-up
    train_img_s = sum(steady) / len(steady)
    if not train_img_s > 0:
        raise PipelineError(f"the training row measured no steady step ({steady}): "
                            f"{out['history'][-1]['train_images']} images an epoch")
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(train_src) for f in fs)
    classes = sorted({os.path.basename(os.path.dirname(f)) for f in files})
    labels = [classes.index(os.path.basename(os.path.dirname(f))) for f in files]
    plain = bench.plain_train_rate(files, labels, len(classes), cfg.train_crop, cfg.batch_size,
                                   dtype, cores, epochs=2)
    r.update(train_img_s=train_img_s, train_plain_img_s=plain,
             train_epoch_img_s=out["history"][-1]["train_images_per_s"],
             train_first_step_s=out["history"][-1]["train_first_step_seconds"])
    rows.append(_row(f"train (Ray Train, 1 worker x {cores} threads vs 1 process, batch "
                     f"{cfg.batch_size}), crop {cfg.train_crop}",
                     train_img_s, plain, "train_vs_plain", r))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(BenchmarkConfig, argv, "benchmark")
    _cli.setup_logging()
    work = cfg.workdir or tempfile.mkdtemp(prefix="bench-")
    t0 = time.monotonic()
    try:
        results, rows = run(cfg, work)
    finally:
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nbenchmark on {results['machine']['cores']} cores ({results['machine']['cpu']}), "
          f"{time.strftime('%Y-%m-%d')}, `python -m jobs.benchmark"
          f"{' --quick' if cfg.quick else ''}`, {time.monotonic() - t0:.0f} s\n")
    print("| measure | pipeline | baseline / ceiling | ratio | target |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\neval start-up (cluster and actors, excluded above): "
          f"{results['eval_startup_s']:.1f} s; sharding N images from cold (first Ray tasks of "
          f"the run): {results['shard_cold_s']:.2f} s, {results['shard_cold_mb_s']:.1f} MB/s "
          f"(tar cf: {results['tar_small_mb_s']:.0f} MB/s); training: each epoch's first step "
          f"waits {results['train_first_step_s']:.1f} s for its data (excluded above; the whole "
          f"last epoch ran at {results['train_epoch_img_s']:.1f} img/s)")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
