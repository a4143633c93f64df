"""Measurements for jobs.benchmark (its CPU table in bench/cpu_table.py, its ``--device cuda``
table in bench/gpu_table.py): each function times one stage or its reference; the timing and
the model-alone row are shared by both tables.

Ratios measured in one run on one machine are the figures that matter; absolute rates move with
the machine and whatever else it is doing.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import NamedTuple

import numpy as np
import torch

from pipeline import data, model as modellib, presets, timeshare
from pipeline.errors import InputError


class PeakMemory:
    """Samples the RSS of this process, or of process ``root`` and its children, plus every Ray
    worker process; keeps the peak (bytes).

    The process table is rescanned once a second (reading every command line is what costs);
    the RSS of the processes found is sampled every ``interval``. Kept cheap because it runs
    beside the job it measures, on the same cores."""

    def __init__(self, interval: float = 0.1, rescan: float = 1.0, root: int | None = None):
        self.interval, self.rescan, self.peak = interval, rescan, 0
        self.root = root
        self._stop = threading.Event()

    def _ray_processes(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.root)
            found = [root, *(root.children(recursive=True) if self.root else ())]
        except psutil.Error:
            found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("ray::") or "default_worker.py" in cmd:
                found.append(p)
        return found

    def _run(self):
        import psutil

        procs, scanned = [], 0.0
        while not self._stop.is_set():
            if time.monotonic() - scanned >= self.rescan:
                procs, scanned = self._ray_processes(), time.monotonic()
            total, seen = 0, set()
            for p in procs:
                if p.pid in seen:  # a child of root that is also a Ray worker
                    continue
                seen.add(p.pid)
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tar_seconds(src: str, dest: str, fsync: bool = False) -> float:
    """Wall seconds of `tar cf` over a folder; with ``fsync``, then an fsync of the tar file:
    the equal-work reference for jobs.shard, which fsyncs every shard before recording it
    (plain `tar cf` returns with its output still in the page cache)."""
    t0 = time.monotonic()
    subprocess.run(["tar", "cf", dest, "-C", src, "."], check=True)
    if fsync:
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - t0


def pil_decode_rate(files: list[str]) -> tuple[float, float]:
    """A plain PIL decode + eval preset loop over image files in this thread (one core):
    (images/s wall, CPU-seconds per image of this thread)."""
    from PIL import Image

    t0, c0 = time.monotonic(), time.thread_time()
    for f in files:
        with Image.open(f) as img:
            presets.eval_image(img.convert("RGB"))
    cpu = time.thread_time() - c0
    return len(files) / (time.monotonic() - t0), cpu / len(files)


def raw_batches(manifest_path: str, batch_size: int = 64) -> list[dict]:
    """A manifest's samples as each read task of the decode stage hands them to its decoder
    (``data.raw_columns`` over chunks of ``batch_size`` samples): dicts of equal-length lists
    (``__key__``, ``__url__``, ``cls``, the image members; None where a sample lacks a
    member)."""
    from pipeline import shards, tarindex

    manifest = shards.load_manifest(manifest_path)
    return [data.raw_columns(chunk)
            for path, rec in zip(manifest.shard_paths, manifest.shards)
            for chunk in tarindex.chunks_of(path, rec.samples, shards.shard_index(path, rec),
                                            batch_size)]


def decode_function_cpu(manifest_path: str, num_classes: int, batch_size: int = 64,
                        repeats: int = 2) -> float:
    """CPU-seconds per image inside the decode stage's function (``data.decode_batch``, eval
    transform), called in this thread on the raw batches of a manifest, without Ray: the per-image
    cost of the stage, apart from what Ray Data adds around it. Best of ``repeats`` passes."""
    batches = raw_batches(manifest_path, batch_size)
    n = sum(len(b["__key__"]) for b in batches)
    best = float("inf")
    for _ in range(repeats):
        c0 = time.thread_time()
        for b in batches:
            data.decode_batch(b, presets.EvalTransform(), num_classes=num_classes)
        best = min(best, (time.thread_time() - c0) / n)
    return best


# The process titles Ray gives a worker that runs (or waits for) tasks, not an actor: the
# decode stage's processes ("ray::ReadReadShards" while it reads and decodes a chunk).
TASK_WORKER_TITLES = ("ray::IDLE", "ray::ReadShards", "ray::ReadReadShards", "ray::MapBatches")


def family_cpu_by_process() -> dict[int, tuple[str, float]]:
    """User + system CPU-seconds so far of this process and every process it started (on a
    local cluster: Ray's raylet, GCS, workers and actors), whatever else runs on the machine,
    per process: pid -> (role, CPU-seconds). Roles:
    ``driver`` (this process: on a local cluster, the consumer of the stage's batches and Ray
    Data's executor), ``tasks`` (Ray's task workers: processes titled as in
    TASK_WORKER_TITLES, which run the read/decode tasks) and ``ray`` (everything else: raylet,
    GCS, dashboard, Ray Data's actors)."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            title = " ".join(p.cmdline())
        except psutil.Error:  # exited between the listing and the reading
            continue
        role = ("driver" if p.pid == me.pid
                else "tasks" if title.startswith(TASK_WORKER_TITLES) else "ray")
        out[p.pid] = (role, t.user + t.system)
    return out


def cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    """CPU-seconds per role between two ``family_cpu_by_process`` readings, process by process
    (a process started in between counts from 0; one that ended in between is not seen)."""
    out = {"driver": 0.0, "tasks": 0.0, "ray": 0.0}
    for pid, (role, cpu) in after.items():
        out[role] += cpu - before.get(pid, (role, 0.0))[1]
    return out


class StreamPass(NamedTuple):
    """One pass of the decode stage (``stream_seconds``): wall seconds, and CPU-seconds of the
    whole family (``cpu``) and of its task workers alone (``task_cpu``: the stage's own)."""
    wall: float
    cpu: float
    task_cpu: float


def stream_seconds(manifest: str, batch_size: int = 64) -> StreamPass:
    """One full pass of the Ray Data decode stage over a manifest, consumed in this process as
    numpy batches (``StreamPass``: CPU from ``family_cpu_by_process``, ``cpu_by_role``)."""
    t0, c0 = time.monotonic(), family_cpu_by_process()
    ds, _ = data.read_decoded(manifest, presets.EvalTransform(), data.ReadPlan(batch_size))
    for _ in ds.iter_batches(batch_size=None, batch_format="numpy"):
        pass
    wall, roles = time.monotonic() - t0, cpu_by_role(c0, family_cpu_by_process())
    return StreamPass(wall, sum(roles.values()), roles["tasks"])


def differential_rate(n_small: int, t_small: float, n_big: int, t_big: float) -> float:
    """Steady-state rate from two runs of different size: fixed start-up costs cancel out,
    and no guess about when "steady state" begins is needed. NaN (not measured) when the bigger
    run took no longer than the smaller one: noise larger than the work, which once printed a
    sharding rate of 2e10 MB/s as a met target."""
    if t_big <= t_small:
        return float("nan")
    return (n_big - n_small) / (t_big - t_small)


CEILING_REPEATS = 5


def seconds(fn, calls: int, device: torch.device) -> float:
    """Seconds for ``calls`` calls of ``fn`` on ``device``. On CUDA, events on the stream:
    kernels run asynchronously, so the host clock would time their launch, not their work."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize()  # start from an idle device
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()  # every stream done before the events are read
    return start.elapsed_time(end) / 1000


def best_rate(fn, images_per_call: int, device: torch.device, *, repeats: int, warmup: int,
              calls: int = 1) -> float:
    """Images/s of ``fn`` (``images_per_call`` images a call): ``warmup`` untimed calls (oneDNN
    and cuDNN pick their kernels on the first ones), then the best of ``repeats`` timed runs of
    ``calls`` calls (the best, because anything else on the machine only ever slows a run
    down). InputError for ``repeats`` < 1."""
    if repeats < 1:
        raise InputError(f"repeats must be at least 1, not {repeats}")
    for _ in range(warmup):
        fn()
    best = min(seconds(fn, calls, device) for _ in range(repeats))
    return images_per_call * calls / best


def model_alone_rate(device: torch.device, dtype: torch.dtype, batch_size: int, *,
                     repeats: int, warmup: int, calls: int, num_classes: int = 1000,
                     arch: str = "resnet18") -> float:
    """The "model alone" row of both tables (CPU and ``--device cuda``): images/s of torchvision
    model ``arch`` (default ResNet-18) as the predictor runs it (``model.for_inference``:
    BatchNorm folded, ``dtype`` weights, channels_last; normalize, softmax, top-5) on a uint8
    batch of ``batch_size`` at its DEFAULT weights' crop (224 for ResNets) already on
    ``device``; ``best_rate`` of ``calls`` calls a run. A ceiling: the fastest this model runs
    there. torch's thread count is the caller's."""
    from pipeline import architectures

    torch.manual_seed(0)
    model = modellib.for_inference(architectures.build(arch, num_classes), device, dtype)
    crop = architectures.default_preset(arch)["crop_size"]
    x = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8, device=device)
    k = min(5, num_classes)

    def step():
        model(presets.normalize(x, dtype)).float().softmax(1).topk(k)

    with torch.inference_mode():
        return best_rate(step, batch_size, device, repeats=repeats, warmup=warmup,
                         calls=calls)


def eval_ceiling_rate(dtype: torch.dtype, batch_size: int, threads: int, n: int,
                      num_classes: int = 1000, repeats: int = CEILING_REPEATS,
                      warmup: int = 3, arch: str = "resnet18") -> float:
    """The CPU table's ceiling: ``model_alone_rate`` of ``arch`` on the CPU with ``threads``
    torch threads, the best of ``repeats`` timed passes of at least ``n`` images each."""
    torch.set_num_threads(threads)
    return model_alone_rate(torch.device("cpu"), dtype, batch_size, repeats=repeats,
                            warmup=warmup, calls=-(-n // batch_size), num_classes=num_classes,
                            arch=arch)


class Ceiling(NamedTuple):
    """The CPU ceiling of a prediction job: the model alone in both of the layouts a job can
    run it in, on the same cores. ``one_actor``: one process with a thread per core;
    ``per_core``: one single-threaded process per core, all at once (summed); ``rate``: the
    better of the two (images/s); ``cores``: how many."""
    one_actor: float
    per_core: float
    cores: int

    @property
    def rate(self) -> float:
        return max(self.one_actor, self.per_core)


_PER_CORE_SCRIPT = ("import sys, torch; from pipeline import benchmark as b; "
                    "print(b.eval_ceiling_rate(getattr(torch, sys.argv[1]), int(sys.argv[2]), 1, "
                    "int(sys.argv[3]), int(sys.argv[4]), repeats=int(sys.argv[5]), "
                    "arch=sys.argv[6]))")


def per_core_rate(dtype: torch.dtype, batch_size: int, n: int, num_classes: int = 1000,
                  repeats: int = CEILING_REPEATS, arch: str = "resnet18",
                  cores: int | None = None) -> float:
    """Images/s of ``cores`` (default: this process's) single-threaded processes each running
    ``eval_ceiling_rate`` at once, summed: the model alone as ``--actors 0`` lays it out on a
    CPU node (``resources.auto_actors``)."""
    import sys

    cores = cores or len(os.sched_getaffinity(0))
    args = [str(dtype).removeprefix("torch."), str(batch_size), str(n), str(num_classes),
            str(repeats), arch]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _PER_CORE_SCRIPT, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(cores)]
    total = 0.0
    try:
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"a per-core model-alone process exited {p.returncode}: "
                                   f"{err[-1000:]}")
            total += float(out.strip().splitlines()[-1])
    finally:
        for p in procs:  # one failed: the others stop too, not run on beside the harness
            if p.poll() is None:
                p.kill()
                p.wait()
    return total


def cpu_ceiling(dtype: torch.dtype, batch_size: int, n: int, num_classes: int = 1000,
                repeats: int = CEILING_REPEATS, arch: str = "resnet18") -> Ceiling:
    """The model alone in both CPU layouts (``Ceiling``): ``eval_ceiling_rate`` with a thread per
    core, then ``per_core_rate``. A job's bound is the better one, whichever layout the job
    ran: a layout that wastes cores is the job's loss, not the ceiling's."""
    cores = len(os.sched_getaffinity(0))
    one = eval_ceiling_rate(dtype, batch_size, cores, n, num_classes, repeats, arch=arch)
    per = per_core_rate(dtype, batch_size, n, num_classes, repeats, arch, cores)
    return Ceiling(one, per, cores)


def eval_baseline_rate(root: str, batch_size: int, workers: int, threads: int,
                       num_classes: int = 1000) -> float:
    """Images/s of the seed notebook's loop: ImageFolder + DataLoader + plain fp32 model, at
    torch's default thread count (every core; set here, as other measurements change it)."""
    from torchvision.datasets import ImageFolder
    from torchvision.models import resnet18

    torch.set_num_threads(threads)
    loader = torch.utils.data.DataLoader(
        ImageFolder(root, presets.reference_eval_transform()), batch_size=batch_size,
        num_workers=workers)
    model = resnet18(num_classes=num_classes).eval()
    clock = timeshare.SteadyClock()  # steady state: after the first batch
    with torch.inference_mode():
        for x, _ in loader:
            model(x).softmax(1).topk(5)
            clock.mark(len(x))
    return clock.rate()


def plain_train_rate(files: list[str], labels: list[int], cfg, threads: int,
                     epochs: int = 1) -> float:
    """Images/s of a single-process loop with the job's settings and without Ray: PIL decode,
    the same RandomResizedCrop + flip (``presets.TrainTransform``), the job's model, optimizer
    and schedule (``train_worker.build_state`` from ``cfg``, a resolved ``LoopConfig`` with
    ``amp_dtype`` set) and its step (``train_worker.train_step``)."""
    from PIL import Image

    from pipeline import train_worker

    torch.set_num_threads(threads)
    state = train_worker.build_state(cfg, torch.device("cpu"))
    state.model.train()
    transform = presets.TrainTransform(cfg.crop_size, seed=0, min_scale=cfg.min_crop_scale)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")
    clock = timeshare.SteadyClock()  # steady state: after the first step
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(files))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = torch.from_numpy(np.stack([transform(Image.open(files[j]).convert("RGB"),
                                                     files[j], epoch) for j in idx]))
            train_worker.train_step(state, x, torch.tensor([labels[j] for j in idx]),
                                    torch.ones(len(idx), dtype=torch.bool), loss_fn,
                                    cfg.amp_dtype)
            state.scheduler.step()
            clock.mark(len(idx))
    return clock.rate()
