"""The CPU table of ``python -m jobs.benchmark`` (``--device cpu``, the default): each stage of
the pipeline side by side with its baseline and the machine's ceiling, in one run.

Generates ImageNet-like JPEGs (~500x375, ~110 KB) and measures evaluation (the prediction job at
its defaults and in fp32, against the model alone on pre-decoded tensors and against an
ImageFolder + DataLoader + fp32 loop), training (the Ray Train job against a plain
single-process loop), decoding per core (the Ray Data stage's images/s over the cores it used,
and the decode function's CPU per image, against a PIL loop on one core), sharding (against
`tar cf`, and `tar cf` then an fsync of its output: the equal work, as jobs.shard fsyncs each
shard) and growth (the prediction job at N and 4N images). The measurements themselves are in
``pipeline.benchmark``; the ``--device cuda`` table is ``bench.gpu_table``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING

import torch

from jobs import _cli, finetune, predict as predict_job
from pipeline import benchmark as measure, machine, model as modellib, shards
from pipeline import predictor, sources, synthetic
from pipeline.errors import PipelineError, UsageError

if TYPE_CHECKING:
    from bench.config import BenchmarkConfig

# ratio key -> (op, target). Ratios are pipeline / reference, except decode_fn_vs_pil (PIL's
# CPU-seconds per image over the decode function's: higher is better there too).
TARGETS = {"decode_per_core_vs_pil": (">=", 0.8), "decode_fn_vs_pil": (">=", 0.9),
           "decode_stage_cpu_vs_fn": ("<=", 1.1),
           "eval_vs_ceiling": (">=", 0.9), "eval_vs_baseline": (">=", 3.0),
           "train_vs_plain": (">=", 0.9), "shard_vs_tar_fsync": (">=", 0.5),
           "eval_time_ratio_4x": ("<=", 4.4), "eval_mem_ratio_4x": ("<=", 1.25),
           "embed_vs_eval": (">=", 0.9), "embed_mem_ratio_4x": ("<=", 1.25),
           # a heavier model leaves decoding a smaller share of the cores: the job should keep
           # ResNet-18's share of its bound (a ratio of two ratios: read it within a few %)
           "heavy_share_vs_resnet18": (">=", 1.0)}
# A pipeline that runs faster than the model alone means the ceiling was not measured as one.
CEILING_KEYS = ("eval_vs_ceiling", "eval_fp32_vs_ceiling_fp32", "eval_heavy_vs_ceiling")
MAX_VS_CEILING = 1.02


MIN_TRAIN_STEPS = 3
DECODE_REPEATS = 2  # the decode rows: the best of this many passes, stage and PIL loop alike


def _copy_subset(files: list[str], src: str, dest: str, origin: str) -> None:
    """Copy the first files (named relative to ``src``) from ``origin`` into ``dest``."""
    for f in files:
        out = os.path.join(dest, os.path.relpath(f, src))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy(os.path.join(origin, os.path.relpath(f, src)), out)


def _row(name, value, base, ratio_key, results, unit="img/s", ratio=None):
    results[ratio_key] = ratio if ratio is not None else (value / base if base else float("nan"))
    op, target = TARGETS.get(ratio_key, ("", None))
    ok = "" if target is None else ("met" if target_met(ratio_key, results[ratio_key])
                                    else "MISSED")
    goal = f"{op} {target}" if target is not None else ""
    return f"| {name} | {value:.1f} {unit} | {base:.1f} {unit} | {results[ratio_key]:.2f} | {goal} {ok} |"


def target_met(key: str, value: float) -> bool:
    """Whether a ratio meets its target in TARGETS (KeyError for a ratio without one); a NaN
    ratio (not measured) never does."""
    op, target = TARGETS[key]
    return value >= target if op == ">=" else value <= target


def target_summary(results: dict) -> dict:
    """{ratio key: {"op", "target", "value", "met"}} for every target a run measured."""
    return {k: {"op": op, "target": t, "value": results[k], "met": target_met(k, results[k])}
            for k, (op, t) in TARGETS.items() if k in results}


def check_ceilings(results: dict) -> None:
    """Raise PipelineError naming every "vs ceiling" ratio above MAX_VS_CEILING: the pipeline
    cannot beat the model alone, so such a figure means the ceiling was mismeasured (a noisy
    machine, too short a pass) and no ratio against it can be trusted."""
    bad = [f"{k} = {results[k]:.2f}" for k in CEILING_KEYS
           if k in results and results[k] > MAX_VS_CEILING]
    if bad:
        raise PipelineError(f"{', '.join(bad)} {'exceeds' if len(bad) == 1 else 'exceed'} "
                            f"{MAX_VS_CEILING}: the job ran faster than "
                            f"its ceiling, so the ceiling was not measured as one (another load "
                            f"on the machine while it ran?); rerun on a quiet machine")


def render_docs_section(header: str, rows: list[str], notes: str) -> str:
    """The Markdown the harness writes between the benchmark markers."""
    return "\n".join([header, "", "| measure | pipeline | baseline / ceiling | ratio | target |",
                      "|---|---|---|---|---|", *rows, "", notes])


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
    src, huge, big, small = (os.path.join(work, d) for d in ("jpeg", "src16n", "src4n", "srcn"))
    files = synthetic.generate_photo_folder(src, 16 * n, num_classes=10)
    os.rename(src, huge)
    # the N- and 4N-image sets are the first N and 4N of the 16N set
    _copy_subset(files[:4 * n], src, big, huge)
    _copy_subset(files[:n], src, small, huge)
    _cli.init_ray()
    manifest, manifest4 = _bench_shard(work, small, big, n, r, rows)
    _bench_decode(work, small, big, huge, manifest, n, r, rows)
    # The evaluation runs keep shards of N/2, 32 at 16N: in the decode rows' 8 larger shards
    # the first batch reached the driver seconds later (start-up 9.9 s against 5.9), with more
    # of the run done before it than the two runs' difference cancels (the job read 1.01 of the
    # CPU bound). So the 16N set is sharded twice.
    manifest16 = os.path.join(work, "s16n", "val.json")
    shards.write_shards(sources.scan_source(huge, "val"), os.path.dirname(manifest16),
                        samples_per_shard=max(8, n // 2), progress=False)
    dtype = modellib.resolve_precision("auto", torch.device("cpu"))
    _bench_eval(cfg, work, big, (manifest4, manifest16), 4 * n, dtype, r, rows)
    train_src = os.path.join(work, "train")
    _copy_subset(files[:n_train], src, train_src, big)
    _bench_train(cfg, work, train_src, dtype, r, rows)
    r["machine"] = {**machine.summary(), "torch_threads": torch.get_num_threads(),
                    "precision": modellib.precision_name(dtype),
                    "images": n, "train_images": n_train}
    return r, rows


def _bench_shard(work, small, big, n, r, rows) -> tuple[str, str]:
    """The sharding row (N and 4N images, N/2 a shard); returns the two manifests."""
    def shard(src, out):
        t0 = time.monotonic()
        m = shards.write_shards(sources.scan_source(src, "val"), os.path.join(work, out),
                                samples_per_shard=max(8, n // 2), progress=False)
        return m.stats.source_bytes / 1e6, time.monotonic() - t0

    # Like the decode and eval rows: a steady-state rate from the N and 4N runs (start-up, and
    # the Ray workers' first import of the code, cancel out); the cold first run is reported
    # apart. tar gets the same treatment.
    mb, cold_s = shard(small, "sn_cold")
    mb, small_s = shard(small, "sn")
    mb4, big_s = shard(big, "s4n")
    shard_mb_s = measure.differential_rate(mb, small_s, mb4, big_s)
    tar_small = measure.tar_seconds(small, os.path.join(work, "plain.tar"))
    tar_big = measure.tar_seconds(big, os.path.join(work, "plain4.tar"))
    tar_mb_s = measure.differential_rate(mb, tar_small, mb4, tar_big)
    # The equal work: jobs.shard fsyncs every shard before it records it; plain tar leaves its
    # output in the page cache. The target is judged on this row.
    sync_small = measure.tar_seconds(small, os.path.join(work, "sync.tar"), fsync=True)
    sync_big = measure.tar_seconds(big, os.path.join(work, "sync4.tar"), fsync=True)
    tar_fsync_mb_s = measure.differential_rate(mb, sync_small, mb4, sync_big)
    r.update(shard_cold_mb_s=mb / cold_s, shard_cold_s=cold_s, tar_mb_s=tar_mb_s,
             tar_small_mb_s=mb / tar_small, tar_fsync_mb_s=tar_fsync_mb_s)
    rows.append(_row("sharding (jobs.shard vs tar cf)", shard_mb_s, tar_mb_s, "shard_vs_tar", r,
                     "MB/s"))
    rows.append(_row("sharding (jobs.shard vs tar cf + fsync of its output: the same work)",
                     shard_mb_s, tar_fsync_mb_s, "shard_vs_tar_fsync", r, "MB/s"))
    return os.path.join(work, "sn", "val.json"), os.path.join(work, "s4n", "val.json")


def _bench_decode(work, small, big, huge, manifest, n, r, rows) -> None:
    """The decode rows: the Ray Data stage over 4N and 16N images in shards of 2N (8 shards at
    16N: 320 images each by default; at N/2 a shard, 80 images, a task's fixed cost showed: 730
    against 780-870 images/s at 320), against the PIL loop over the N set; the function over
    N."""
    import ray

    d4, d16 = (os.path.join(work, d) for d in ("d4n", "d16n"))
    for src, out in ((big, d4), (huge, d16)):
        shards.write_shards(sources.scan_source(src, "val"), out, samples_per_shard=2 * n,
                            progress=False)
    m4, m16 = os.path.join(d4, "val.json"), os.path.join(d16, "val.json")
    # The cores the stage may use: Ray's CPUs (one decode task each), at most one per shard.
    cores = min(int(ray.cluster_resources().get("CPU", os.cpu_count())),
                len(shards.load_manifest(m16).shards))
    measure.stream_seconds(m4)  # warm-up: Ray starts its data workers on the first pass
    # The better of two 4N / 16N pairs, as the PIL loop is the best of its passes: one pass of
    # either read 15% apart from the next on a quiet machine.
    pairs = [(measure.stream_seconds(m4), measure.stream_seconds(m16))
             for _ in range(DECODE_REPEATS)]
    stream, p4, p16 = max(
        ((measure.differential_rate(4 * n, a.wall, 16 * n, b.wall), a, b) for a, b in pairs),
        key=lambda t: -1.0 if math.isnan(t[0]) else t[0])  # NaN: that pair measured nothing
    # CPU-seconds per image, steady state, whatever else shares the machine: of the stage's own
    # processes (the task workers that read and decode), and of everything the pass ran (with
    # the driver, which consumes the batches here, and Ray's daemons and actors).
    stage_cpu = (p16.task_cpu - p4.task_cpu) / (12 * n)
    family_cpu = (p16.cpu - p4.cpu) / (12 * n)
    pil, pil_cpu = max(measure.pil_decode_rate(sorted(os.path.join(dp, f) for dp, _, fs in
                                                    os.walk(small) for f in fs))
                       for _ in range(DECODE_REPEATS))
    fn_cpu = measure.decode_function_cpu(manifest, len(shards.load_manifest(manifest).classes))
    r.update(decode_img_s=stream, decode_cores=cores, pil_img_s=pil,
             decode_img_s_per_core=stream / cores, pil_cpu_ms_per_img=pil_cpu * 1e3,
             decode_fn_cpu_ms_per_img=fn_cpu * 1e3,
             decode_stage_core_ms_per_img=cores / stream * 1e3,
             decode_stage_cpu_ms_per_img=stage_cpu * 1e3,
             decode_family_cpu_ms_per_img=family_cpu * 1e3)
    rows.append(_row(f"decode per core (Ray Data stage on {cores} cores / {cores} vs PIL loop, "
                     f"1 core)", stream / cores, pil, "decode_per_core_vs_pil", r))
    rows.append(_row("decode function CPU per image (ratio: PIL's / the function's)",
                     fn_cpu * 1e3, pil_cpu * 1e3, "decode_fn_vs_pil", r, "ms",
                     ratio=pil_cpu / fn_cpu))
    rows.append(_row("decode stage core-time per image (cores x wall / images) vs inside the "
                     "function", cores / stream * 1e3, fn_cpu * 1e3, "decode_stage_vs_fn", r,
                     "ms"))
    rows.append(_row("decode stage CPU per image (its task workers: read, decode, Ray's "
                     "blocks) vs inside the function", stage_cpu * 1e3, fn_cpu * 1e3,
                     "decode_stage_cpu_vs_fn", r, "ms"))
    rows.append(_row("decode pass CPU per image (task workers + driver consuming the batches + "
                     "Ray's daemons and actors) vs inside the function", family_cpu * 1e3,
                     fn_cpu * 1e3, "decode_family_cpu_vs_fn", r, "ms"))


def _bench_eval(cfg, work, big, manifests: tuple[str, str], n, dtype, r, rows) -> None:
    """The evaluation rows, from runs over ``manifests``: one of ``n`` images (4N of the run)
    and one of 4 ``n``, runs long enough that the images the predictor finishes before the
    driver sees its first batch (~200 at batch 32 on 2 cores) are fewer than either holds."""
    from pipeline import resources

    manifest, manifest4 = manifests
    # --actors 0's count without the cap by set size, so that both runs of a difference (N and
    # 4N images) run the same actors
    actors = resources.auto_actors(resources.current_cluster(), use_gpu=False)

    def predict(manifest_path, precision, out, embeddings=False, arch=""):
        with measure.PeakMemory() as mem:  # "none": random init with the data's 10 classes
            s = predict_job.run(predict_job.PredictConfig(
                data=manifest_path, weights="none", out=os.path.join(work, out),
                precision=precision, batch_size=cfg.batch_size, actors=actors,
                progress=False, embeddings=embeddings, model=arch))
        return s, mem.peak

    # The ceiling: the model alone in the better of the two layouts a job runs it in (one
    # process of a thread per core; one single-threaded process per core, the job's default
    # with --actors 0), measured before the jobs run (for seconds after a job its actors and
    # workers wind down on the same cores: 190 -> 160 img/s).
    threads = predictor.cpu_threads(1)
    ceilings = measure.cpu_ceiling(dtype, cfg.batch_size, 4 * cfg.batch_size, 10)
    ceiling = ceilings.rate
    ceiling32 = measure.cpu_ceiling(torch.float32, cfg.batch_size, 2 * cfg.batch_size, 10).rate
    heavy = "" if cfg.quick else cfg.heavier_model
    ceiling_heavy = (measure.cpu_ceiling(dtype, cfg.batch_size, 2 * cfg.batch_size, 10,
                                         arch=heavy).rate if heavy else 0.0)
    r.update(eval_ceiling_one_actor_img_s=ceilings.one_actor,
             eval_ceiling_per_core_img_s=ceilings.per_core)
    # Steady-state images/s from the two runs; the smaller run's start-up is reported apart.
    # The job lets Ray Data decode while the predictor actors load the model (seconds of free
    # work on a long run), which on a run of a few hundred images is most of the decoding: the
    # rate would be the model's alone, not the job's. Here the data stage starts once the
    # actors are up, as it runs on hour 1 of a 50,000-image evaluation.
    from ray.data import DataContext

    ctx = DataContext.get_current()
    wait = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = 600
    try:
        s_def, mem_n = predict(manifest, "auto", "e_def")
        s4, mem_4n = predict(manifest4, "auto", "e_4n")
        s_fp32, _ = predict(manifest, "fp32", "e_fp32")
        s4_fp32, _ = predict(manifest4, "fp32", "e_4n_fp32")
        s_emb, mem_emb_n = predict(manifest, "auto", "e_emb", embeddings=True)
        s4_emb, mem_emb_4n = predict(manifest4, "auto", "e_4n_emb", embeddings=True)
        if heavy:
            s_h, _ = predict(manifest, "auto", "e_heavy", arch=heavy)
            s4_h, _ = predict(manifest4, "auto", "e_4n_heavy", arch=heavy)
    finally:
        ctx.wait_for_min_actors_s = wait
    # From each run's first batch out to its end: start-up, whose spread between runs (~1 s)
    # was most of the difference of their wall times, is left out; the images the predictor
    # finished before the driver saw the first batch are as many in both runs and cancel out.
    def steady_s(summary):
        return summary["wall_seconds"] - summary["startup_seconds"]

    cores = ceilings.cores
    rate = measure.differential_rate(n, steady_s(s_def), 4 * n, steady_s(s4))
    rate32 = measure.differential_rate(n, steady_s(s_fp32), 4 * n, steady_s(s4_fp32))
    rate_emb = measure.differential_rate(n, steady_s(s_emb), 4 * n, steady_s(s4_emb))
    baseline = measure.eval_baseline_rate(big, cfg.batch_size, os.cpu_count(), threads, 10)
    r.update(eval_img_s=rate, eval_fp32_img_s=rate32,
             eval_ceiling_img_s=ceiling, eval_ceiling_fp32_img_s=ceiling32,
             eval_baseline_img_s=baseline, eval_startup_s=s_def["startup_seconds"])
    prec = modellib.precision_name(dtype)
    rows.append(_row(f"eval, job default ({prec}, {s_def['actors']} actor"
                     f"{'' if s_def['actors'] == 1 else 's'}) vs model alone (best of "
                     f"{measure.CEILING_REPEATS}, the better of {ceilings.cores} threads in one "
                     f"process and {ceilings.cores} single-threaded processes)", r["eval_img_s"],
                     ceiling,
                     "eval_vs_ceiling", r))
    # Where decoding and the model share the cores (CPU nodes), the job cannot beat the model
    # alone plus the PIL decode of every image on the same cores: cores / (cores / model + PIL
    # CPU-seconds per image).
    bound = 1 / (1 / ceiling + r["decode_fn_cpu_ms_per_img"] / 1e3 / cores)
    r["eval_cpu_bound_img_s"] = bound
    rows.append(_row(f"eval, job default ({prec}) vs model alone + decode on the same "
                     f"{cores} cores", r["eval_img_s"], bound, "eval_vs_cpu_bound", r))
    rows.append(_row(f"eval, job default ({prec}) vs ImageFolder+DataLoader fp32",
                     r["eval_img_s"], baseline, "eval_vs_baseline", r))
    rows.append(_row(f"eval, job fp32 vs model alone fp32 (best of {measure.CEILING_REPEATS})",
                     r["eval_fp32_img_s"], ceiling32,
                     "eval_fp32_vs_ceiling_fp32", r))
    r.update(eval_peak_mem_n_mb=mem_n / 1e6, eval_peak_mem_4n_mb=mem_4n / 1e6)
    rows.append(_row(f"growth: job wall time, {4 * n} vs {n} images", s4["wall_seconds"],
                     s_def["wall_seconds"], "eval_time_ratio_4x", r, "s"))
    rows.append(_row(f"growth: peak memory (driver + Ray workers), {4 * n} vs {n} images",
                     mem_4n / 1e6, mem_n / 1e6, "eval_mem_ratio_4x", r, "MB"))
    r.update(eval_embed_img_s=rate_emb, eval_embed_peak_mem_n_mb=mem_emb_n / 1e6,
             eval_embed_peak_mem_4n_mb=mem_emb_4n / 1e6)
    rows.append(_row(f"eval with --embeddings (512-d float16 column) vs without, job default "
                     f"({prec})", rate_emb, rate, "embed_vs_eval", r))
    rows.append(_row(f"growth: peak memory with --embeddings, {4 * n} vs {n} images",
                     mem_emb_4n / 1e6, mem_emb_n / 1e6, "embed_mem_ratio_4x", r, "MB"))
    if heavy:
        rate_h = measure.differential_rate(n, steady_s(s_h), 4 * n, steady_s(s4_h))
        _heavier_rows(heavy, rate_h, ceiling_heavy, prec, r, rows)


def _heavier_rows(arch: str, rate: float, ceiling: float, prec: str, r: dict,
                  rows: list) -> None:
    """The rows of a heavier model (``--heavier-model``, ResNet-50 by default) next to
    ResNet-18's: its model-alone rate, the job's steady rate against it and against its own CPU
    bound (the model alone plus ResNet-18's PIL decode per image on the same cores: ResNet-50's
    preset resizes to 232, not 256, so its decode is a little cheaper and its bound a little
    low), and whether the job keeps ResNet-18's share of its bound (``r`` holds ResNet-18's
    figures already)."""
    cores = os.cpu_count()
    bound = 1 / (1 / ceiling + r["decode_fn_cpu_ms_per_img"] / 1e3 / cores)
    r.update(eval_heavy_model=arch, eval_heavy_img_s=rate, eval_heavy_ceiling_img_s=ceiling,
             eval_heavy_cpu_bound_img_s=bound)
    rows.append(_row(f"{arch}: model alone ({prec}) vs resnet18's", ceiling,
                     r["eval_ceiling_img_s"], "heavy_ceiling_vs_resnet18", r))
    rows.append(_row(f"{arch}: eval, job default ({prec}) vs model alone", rate, ceiling,
                     "eval_heavy_vs_ceiling", r))
    rows.append(_row(f"{arch}: eval, job default ({prec}) vs model alone + decode on the same "
                     f"{cores} cores", rate, bound, "eval_heavy_vs_cpu_bound", r))
    rows.append(_row(f"{arch} vs resnet18: the job's share of its CPU bound", 100 * rate / bound,
                     100 * r["eval_vs_cpu_bound"], "heavy_share_vs_resnet18", r, "%",
                     ratio=(rate / bound) / r["eval_vs_cpu_bound"]))


def _bench_train(cfg, work, train_src, dtype, r, rows) -> None:
    tm = shards.write_shards(sources.scan_source(train_src, "train"), os.path.join(work, "st"),
                             samples_per_shard=8, progress=False)
    # Throughput only: the same images serve as the (required) val split.
    shards.write_shards(sources.with_classes(sources.scan_source(train_src, "val"),
                                             tm.classes),
                        os.path.join(work, "st"), samples_per_shard=64, progress=False)
    # The same settings as the plain loop: one process of batch B on every core (the plain loop
    # has no DDP, so neither does this row: it measures what Ray Train's streaming and
    # reporting cost, not gloo on one machine). Steady state, like the plain loop: from the end
    # of each epoch's first step; the first step's wait is reported apart.
    cores = os.cpu_count()
    job = finetune.FinetuneConfig(
        train=os.path.join(work, "st", "train.json"), val=os.path.join(work, "st", "val.json"),
        weights="none", epochs=3, num_workers=1, cpus_per_worker=max(1, cores - 1), threads=cores,
        storage_path=os.path.join(work, "runs"), name="bench", batch_size=cfg.batch_size,
        crop_size=cfg.train_crop, shuffle_buffer=64)
    out = finetune.run(job)
    steady = [h["train_steady_images_per_s"] for h in out["history"][1:]]  # epoch 1: warm-up
    train_img_s = sum(steady) / len(steady)
    if not train_img_s > 0:
        raise PipelineError(f"the training row measured no steady step ({steady}): "
                            f"{out['history'][-1]['train_images']} images an epoch")
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(train_src) for f in fs)
    classes = sorted({os.path.basename(os.path.dirname(f)) for f in files})
    labels = [classes.index(os.path.basename(os.path.dirname(f))) for f in files]
    loop = dataclasses.replace(  # the job's recipe, resolved as its one worker resolves it
        finetune.loop_config(job), classes=tuple(tm.classes), num_classes=len(classes),
        train_samples=len(files), world_size=1, amp_dtype=dtype)
    plain = measure.plain_train_rate(files, labels, loop, cores, epochs=2)
    r.update(train_img_s=train_img_s, train_plain_img_s=plain,
             train_epoch_img_s=out["history"][-1]["train_images_per_s"],
             train_first_step_s=out["history"][-1]["train_first_step_seconds"])
    rows.append(_row(f"train (Ray Train, 1 worker x {cores} threads vs 1 process, batch "
                     f"{cfg.batch_size}), crop {cfg.train_crop}",
                     train_img_s, plain, "train_vs_plain", r))




def measure_table(cfg: BenchmarkConfig, command: str) -> tuple[dict, str]:
    """The whole CPU table in one run, in ``cfg.workdir`` (or a temporary folder, deleted
    after): (every figure, with "machine" and "targets"; the Markdown section, its header
    naming the date, the machine, ``command`` and the load while it ran)."""
    work = cfg.workdir or tempfile.mkdtemp(prefix="bench-")
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    try:
        results, rows = run(cfg, work)
    finally:
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)
    m = results["machine"]
    m.update(load_avg_1min_start=load0, load_avg_1min_end=os.getloadavg()[0],
             date_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             wall_s=time.monotonic() - t0, command=command)
    results["targets"] = target_summary(results)
    header = (f"Measured {m['date_utc']} on {machine.describe(m)} (torch {m['torch']}, "
              f"{m['precision']}), `{m['command']}`, {m['wall_s']:.0f} s, "
              f"N = {m['images']} images (evaluation: {4 * m['images']} and "
              f"{16 * m['images']}); 1-minute load average {m['load_avg_1min_start']:.1f} "
              f"at the start and {m['load_avg_1min_end']:.1f} at the end (a load above the core "
              f"count means something else shared the machine). Written by the harness: do not "
              f"edit.")
    notes = (f"Eval start-up (cluster and actors, excluded above): "
             f"{results['eval_startup_s']:.1f} s; sharding N images from cold (first Ray tasks "
             f"of the run): {results['shard_cold_s']:.2f} s, {results['shard_cold_mb_s']:.1f} "
             f"MB/s (tar cf: {results['tar_small_mb_s']:.0f} MB/s); training: each epoch's "
             f"first step waits {results['train_first_step_s']:.1f} s for its data (excluded "
             f"above; the whole last epoch ran at {results['train_epoch_img_s']:.1f} img/s). "
             f"Targets missed: "
             + (", ".join(k for k, t in results["targets"].items() if not t["met"]) or "none")
             + ".")
    return results, render_docs_section(header, rows, notes)
