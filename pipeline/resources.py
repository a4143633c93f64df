"""The resource plan of a job, worked out against the Ray cluster it runs on before it starts.

Ray schedules by declared resources: a task or actor whose CPUs or GPUs the cluster cannot give
waits, and a pipeline whose training workers hold every CPU waits forever for a decode task
(Ray only warns "The job may hang forever"). So each job plans its stages together:

* fine-tuning: N Ray Train workers (1 GPU each with ``use_gpu``) plus the Ray Data read/decode
  tasks that feed them. ``cpus_per_worker=0`` (auto) leaves a quarter of the cluster's CPUs (at
  least one, at most half) to the data stage; with GPUs a worker takes one CPU.
* prediction: the predictor actors (1 GPU each with ``use_gpu``) plus the decode tasks.

A plan that cannot run raises ``UsageError`` naming the flags and the cluster's CPUs/GPUs, at
once, before anything is written. A cluster that may grow (a job submitted to a cluster with
RAY_ADDRESS set, which the autoscaler of ``cluster.yaml`` can enlarge) is not refused: the plan
is logged as a warning and Ray waits for the nodes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline.errors import UsageError

log = logging.getLogger(__name__)

# Share of a CPU-only cluster's CPUs that auto-planned training leaves to decoding: a core
# decodes ~300 ImageNet images/s, ResNet-18 trains at ~15 images/s per core on CPU.
DATA_SHARE = 0.25
# With --decode-device cuda each decode task shares its node's GPU with a predictor actor.
DECODE_GPU_SHARE = 0.25
# --actors 0 (auto) on CPU: at most one predictor actor per this many bytes of Ray's memory
# resource. A ResNet-18 actor held 0.9 GB (torch, the bf16 model, a batch of 64 in flight;
# measured 2026-12-07); the rest is left to the decode tasks, the driver and larger models.
CPU_ACTOR_BYTES = 2 * 10**9
# --actors 0 (auto): never more actors than one per this many batches of the set (an actor that
# gets one batch or none costs its start-up and a model's memory for nothing).
MIN_BATCHES_PER_ACTOR = 2


@dataclass(frozen=True)
class Cluster:
    """What the cluster holds now: ``cpus``, ``gpus`` (counts, may be fractional), whether it
    may grow (an autoscaling cluster joined through RAY_ADDRESS) or is fixed (a local one), and
    ``memory``: the bytes Ray schedules tasks and actors with (its ``memory`` resource; 0:
    unknown)."""
    cpus: float
    gpus: float
    can_grow: bool = False
    memory: float = 0.0

    def describe(self) -> str:
        """One phrase naming the cluster's CPUs and GPUs, for error and warning messages."""
        return f"this Ray cluster has {count(self.cpus, 'CPU')} and {count(self.gpus, 'GPU')}"


def current_cluster() -> Cluster:
    """The running Ray cluster's resources (``ray.init`` must have been called)."""
    import ray

    res = ray.cluster_resources()
    return Cluster(float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                   can_grow=bool(os.environ.get("RAY_ADDRESS")),
                   memory=float(res.get("memory", 0)))


@dataclass(frozen=True)
class TrainPlan:
    """Ray Train workers and their data stage. ``data_cpus``: the CPUs left to Ray Data, set as
    its resource limit (None on a cluster that may grow); ``decode_cpus``: what one read/decode
    task reserves (<= data_cpus)."""
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    data_cpus: float | None
    decode_cpus: float
    decode_tasks: int = 1

    def describe(self) -> str:
        """One line for logs: workers x (CPUs, GPU each), the CPUs left to the data stage ("the
        rest" on a cluster that may grow), and how many decode tasks of how many CPUs."""
        gpu = ", 1 GPU" if self.use_gpu else ""
        data = "the rest" if self.data_cpus is None else f"{self.data_cpus:g} CPUs"
        return (f"{count(self.num_workers, 'Train worker')} x ({self.cpus_per_worker:g} CPU{gpu})"
                f" + "
                f"data stage {data} (up to {count(self.decode_tasks, 'decode task')} of "
                f"{self.decode_cpus:g} CPU)")

    def needs(self) -> tuple[float, float]:
        """(CPUs, GPUs) the plan holds at once to make progress: every worker and one decode
        task."""
        return (self.num_workers * self.cpus_per_worker + self.decode_cpus,
                float(self.num_workers) if self.use_gpu else 0.0)


@dataclass(frozen=True)
class PredictPlan:
    """Predictor actors and their decode tasks (CPUs and GPUs each reserves in Ray)."""
    actors: int
    use_gpu: bool
    cpus_per_actor: float
    gpus_per_actor: float
    decode_cpus: float
    decode_gpus: float
    decode_tasks: int = 1
    threads: int = 0  # torch threads per CPU actor (0: its node's cores shared among its actors)

    def describe(self) -> str:
        """One line for logs: actors x (CPUs, GPU share each) and how many decode tasks of how
        many CPUs (and GPU share)."""
        gpu = f", {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        return (f"{count(self.actors, 'predictor actor')} x ({self.cpus_per_actor:g} CPU{gpu})"
                f" + up to {count(self.decode_tasks, 'decode task')} of "
                f"{self.decode_cpus:g} CPU"
                + (f", {self.decode_gpus:g} GPU" if self.decode_gpus else ""))

    def needs(self) -> tuple[float, float]:
        """(CPUs, GPUs) the plan holds at once to make progress: every actor and one decode
        task."""
        return (self.actors * self.cpus_per_actor + self.decode_cpus,
                self.actors * self.gpus_per_actor + self.decode_gpus)


def count(n: float, noun: str) -> str:
    """``n`` and ``noun``, plural when ``n`` is not 1: ``1 GPU``, ``2 GPUs``, ``0.5 CPUs``."""
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def _refuse_or_warn(cluster: Cluster, problem: str) -> None:
    if cluster.can_grow:
        log.warning("%s; %s now. Waiting for the autoscaler to add nodes, at most --max-wait",
                    problem, cluster.describe())
        return
    raise UsageError(f"{problem}; {cluster.describe()}")


WAIT_POLL_SECONDS = 5.0  # how often a waiting plan looks at the cluster again
WAIT_LINE_SECONDS = 60.0  # how often it says what it waits for


def await_resources(needs: tuple[float, float], max_wait: float, *, what: str = "this job",
                    cluster_now=None, clock=None, sleep=None, emit=None) -> Cluster:
    """Return the cluster once it holds ``needs`` (CPUs, GPUs) in all; on a cluster that may
    grow, wait for its nodes at most ``max_wait`` seconds (0: no limit), saying every
    WAIT_LINE_SECONDS what is missing. Raises ``deadline.ResourcesUnavailable`` (exit 7) naming
    the resources when they do not come. ``cluster_now``, ``clock``, ``sleep`` and ``emit``
    (default: ``current_cluster``, monotonic time, ``time.sleep``, this module's logger) are for
    tests."""
    import time

    from pipeline import deadline

    cluster_now = cluster_now or current_cluster
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    emit = emit or log.warning
    cpus, gpus = needs
    t0 = clock()
    last_line = None
    while True:
        cluster = cluster_now()
        missing = [count(n - have, noun) for n, have, noun in
                   ((cpus, cluster.cpus, "CPU"), (gpus, cluster.gpus, "GPU"))
                   if n - have > 1e-6]
        if not missing:
            return cluster
        waited = clock() - t0
        want = f"{what} needs {count(cpus, 'CPU')}" + (f" and {count(gpus, 'GPU')}" if gpus
                                                      else "")
        if max_wait > 0 and waited >= max_wait:
            raise deadline.ResourcesUnavailable(
                f"{want}, {cluster.describe()} after waiting "
                f"{deadline.duration_text(waited)} (--max-wait "
                f"{deadline.duration_text(max_wait)}): {' and '.join(missing)} short. Stopped "
                f"before any work; nothing written. Add nodes of that kind to the cluster, or "
                f"plan smaller (--actors, --num-workers, no --use-gpu)")
        if last_line is None or clock() - last_line >= WAIT_LINE_SECONDS:
            limit = deadline.duration_text(max_wait) if max_wait > 0 else "none"
            emit(f"waiting for resources: {want}; {cluster.describe()} ("
                 f"{' and '.join(missing)} short), {deadline.duration_text(waited)} of --max-wait "
                 f"{limit}")
            last_line = clock()
        sleep(WAIT_POLL_SECONDS if max_wait <= 0 else
              min(WAIT_POLL_SECONDS, max(0.0, max_wait - waited)))


def check_decode_device(decode_device: str, use_gpu: bool) -> None:
    """UsageError for --decode-device cuda without --use-gpu: the decode tasks take their share
    of the actors' GPUs, and without --use-gpu there are none (it decoded with PIL, silently)."""
    if decode_device == "cuda" and not use_gpu:
        raise UsageError("--decode-device cuda decodes on the predictor actors' GPUs: add "
                         "--use-gpu (without it the actors hold no GPU)")


def _warn_unused_gpus(cluster: Cluster, use_gpu: bool, what: str) -> None:
    """A warning when the cluster has GPUs that the job, without --use-gpu, leaves idle."""
    if cluster.gpus and not use_gpu:
        log.warning("%s and --use-gpu is not given: %s (add --use-gpu to use the GPUs)",
                    cluster.describe(), what)


def plan_training(cluster: Cluster, num_workers: int, use_gpu: bool,
                  cpus_per_worker: float = 0.0) -> TrainPlan:
    """Plan ``num_workers`` Ray Train workers and their data stage on ``cluster``.

    ``cpus_per_worker``: CPUs each worker reserves; 0 (auto) is 1 with GPUs, else what leaves
    the data stage DATA_SHARE of the CPUs (at least 1, at most half). Raises ``UsageError`` when
    the plan cannot run on a fixed cluster (see the module doc)."""
    if num_workers < 1:
        raise UsageError(f"--num-workers must be at least 1, not {num_workers}")
    if cpus_per_worker < 0:
        raise UsageError(f"--cpus-per-worker must be >= 0 (0: auto), not {cpus_per_worker:g}")
    _warn_unused_gpus(cluster, use_gpu, "the Train workers run on CPUs")
    if use_gpu and cluster.gpus < num_workers:
        _refuse_or_warn(cluster, f"--use-gpu with --num-workers {num_workers} needs "
                                 f"{count(num_workers, 'GPU')}")
    cpus = cluster.cpus
    reserve = min(max(1.0, DATA_SHARE * cpus), cpus / 2)
    if cpus_per_worker == 0:
        room = (cpus - reserve) / num_workers
        cpus_per_worker = min(1.0, room) if use_gpu else room
        if cpus_per_worker <= 0:
            cpus_per_worker = 1.0  # no CPU at all now: a growing cluster brings them
        cpus_per_worker = _round_down(cpus_per_worker)
    data_cpus = _round_down(cpus - num_workers * cpus_per_worker) \
        if cpus - num_workers * cpus_per_worker >= 0.01 else 0.0
    if data_cpus == 0:
        _refuse_or_warn(cluster, f"--num-workers {num_workers} x --cpus-per-worker "
                                 f"{cpus_per_worker:g} = {num_workers * cpus_per_worker:g} CPUs "
                                 f"leaves no CPU to read and decode the shards: lower "
                                 f"--cpus-per-worker (0: auto) or --num-workers")
    # On a cluster that may grow, Ray Data gets no fixed limit: nodes still to come add CPUs.
    limit = None if cluster.can_grow else data_cpus
    decode_cpus = min(1.0, data_cpus) if data_cpus else 1.0
    return TrainPlan(num_workers, use_gpu, cpus_per_worker, limit, decode_cpus,
                     decode_slots(data_cpus, decode_cpus))


def auto_actors(cluster: Cluster, use_gpu: bool, threads: int = 0, images: int = 0,
                batch_size: int = 64, cpus_per_actor: float = 0.0) -> int:
    """The predictor actors of ``--actors 0`` (auto), at least 1: with ``use_gpu`` one per GPU
    of the cluster; on CPU one per ``threads`` CPUs (``--threads``; 0: one per CPU, each actor
    then single-threaded), at most one per CPU_ACTOR_BYTES of the cluster's ``memory``. Either
    way at most one per MIN_BATCHES_PER_ACTOR batches of ``batch_size`` in a set of ``images``
    (0: unknown, no cap), and with ``cpus_per_actor`` (``--cpus-per-actor``; 0: auto) no more
    than leave a CPU to decoding. Counts what the cluster holds now: on a cluster still
    growing, say ``--actors``.

    Why one single-threaded actor per core on CPU: oneDNN's threads meet at a barrier after
    every layer, and the decode tasks time-share the same cores. Each time a decode task took
    a core from one of a 2-thread actor's threads, the other waited idle: on 2 cores 0.08-0.19
    of a core went unused and the scale row read 0.88 of the CPU bound. With one
    single-threaded actor per core a decode task delays one actor and no other core waits
    (2.0 cores busy; 42.8 against 40.7 images/s side by side, 2026-12-07, bench/scale.py's
    head)."""
    if use_gpu:
        n = int(cluster.gpus + 1e-6)
    else:
        n = int(cluster.cpus / max(1, threads) + 1e-6)
        if cluster.memory > 0:
            n = min(n, int(cluster.memory // CPU_ACTOR_BYTES))
    if images > 0:
        n = min(n, -(-images // max(1, batch_size)) // MIN_BATCHES_PER_ACTOR)
    if cpus_per_actor > 0:
        n = min(n, int((cluster.cpus - 1.0) / cpus_per_actor + 1e-6))
    return max(1, n)


def plan_prediction(cluster: Cluster, actors: int, use_gpu: bool, cpus_per_actor: float = 0.0,
                    decode_device: str = "cpu", decode_in: str = "tasks", *, threads: int = 0,
                    images: int = 0, batch_size: int = 64) -> PredictPlan:
    """Plan ``actors`` predictor actors (0: ``auto_actors`` with ``threads``, ``images`` and
    ``batch_size``) and their decode tasks on ``cluster``.

    On CPU an actor reserves half a CPU by default (its torch threads use the node's cores
    whatever it reserves) and a decode task one CPU. Ray Data fuses operators whose resources
    are equal, and fused, an actor decodes and infers in turn, so the two never reserve the
    same amount. With ``decode_device="cuda"`` a decode task takes DECODE_GPU_SHARE of a GPU
    and each actor the rest of its own; with ``decode_in="actor"`` the actors decode on their
    own GPU (whole) and the tasks only read the shards. Raises ``UsageError`` when the plan
    cannot run on a fixed cluster."""
    if actors < 0:
        raise UsageError(f"--actors must be at least 1 (0: auto), not {actors}")
    if cpus_per_actor < 0:
        raise UsageError(f"--cpus-per-actor must be >= 0 (0: auto), not {cpus_per_actor:g}")
    check_decode_device(decode_device, use_gpu)
    _warn_unused_gpus(cluster, use_gpu, "the predictor actors run on CPUs")
    flag = f"--actors {actors}"
    if actors == 0:
        actors = auto_actors(cluster, use_gpu, threads, images, batch_size, cpus_per_actor)
        flag = f"--actors 0 (auto: {actors})"
        if not use_gpu and not threads and 1 <= cluster.cpus < actors + 1:
            threads = 1  # one a CPU: single-threaded wherever Ray places them
        counted = cluster.gpus if use_gpu else cluster.cpus
        if cluster.can_grow and counted < 1:  # e.g. cluster.yaml's head before any worker
            log.warning("--actors 0 (auto): %d predictor actor, as %s now; on a cluster that "
                        "is still scaling up, pass --actors", actors, cluster.describe())
    gpu_decode = use_gpu and decode_device == "cuda" and decode_in == "tasks"
    gpus_per_actor = (1.0 - DECODE_GPU_SHARE if gpu_decode else 1.0) if use_gpu else 0.0
    if use_gpu and cluster.gpus < actors:
        _refuse_or_warn(cluster, f"--use-gpu with {flag} needs {count(actors, 'GPU')}")
    if cpus_per_actor == 0:
        want = 1.0 if use_gpu else 0.5
        cpus_per_actor = _round_down(max(0.01, min(want, (cluster.cpus - 1.0) / actors)))
    decode_cpus = 0.5 if cpus_per_actor == 1.0 and not use_gpu else 1.0
    left = cluster.cpus - actors * cpus_per_actor
    if 0.1 <= left < decode_cpus:  # a share of a CPU, never the actors' share (fusion)
        decode_cpus = _round_down(left)
        if decode_cpus == cpus_per_actor:
            decode_cpus -= 0.01
    if left < decode_cpus:
        _refuse_or_warn(cluster, f"{flag} x --cpus-per-actor {cpus_per_actor:g} = "
                                 f"{actors * cpus_per_actor:g} CPUs leaves no CPU to decode the "
                                 f"images: lower --cpus-per-actor (0: auto) or --actors")
    tasks = decode_slots(left, decode_cpus)
    if gpu_decode:  # each decode task also takes DECODE_GPU_SHARE of a GPU: one a GPU
        tasks = min(tasks, max(1, int(cluster.gpus)))
    return PredictPlan(actors, use_gpu, cpus_per_actor, gpus_per_actor, decode_cpus,
                       DECODE_GPU_SHARE if gpu_decode else 0.0, tasks,
                       0 if use_gpu else threads)


def decode_slots(cpus: float, decode_cpus: float) -> int:
    """How many decode tasks of ``decode_cpus`` the ``cpus`` left to decoding hold at once (at
    least 1): the most the read/decode stage runs, and so submits, at a time.

    Ray Data's per-operator reservation is off (``data.configure_context``), and without it
    nothing else caps how many read tasks it submits: it submitted every chunk of a set at once,
    they queued for CPUs ahead of the predictor actor's start, and their decoded output ran
    ahead of the model until it spilled (590 MiB at 5,000 images, 5.9 GB at 50,000). With the
    cap, Ray Data's downstream-capacity backpressure holds the next task back while the
    consumers have enough queued (``data.configure_context``). On a cluster that may grow, the
    count is the CPUs it has now; --decode-concurrency sets it."""
    return max(1, int(cpus / decode_cpus + 1e-6)) if decode_cpus > 0 else 1


def _round_down(cpus: float) -> float:
    """To a hundredth: Ray's resource arithmetic is exact to 1e-4, and 0.333 + 0.333 + 0.333
    must fit in 1 where 1/3 * 3 may not."""
    return max(0.01, int(cpus * 100) / 100)


# The share of a node's object store the local shuffle buffers of the Train workers on it may
# hold: the buffer keeps its rows as zero-copy views of the decoded blocks, so a buffer holds
# object store memory, and buffers the size of the store made the rest of the epoch spill.
SHUFFLE_STORE_SHARE = 0.25


def node_object_store_bytes() -> int | None:
    """The smallest object store of the cluster's live nodes (bytes); None without Ray
    running or where no node reports one."""
    import ray

    if not ray.is_initialized():
        return None
    stores = [n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n["Alive"]]
    stores = [s for s in stores if s > 0]
    return int(min(stores)) if stores else None


def shuffle_buffer_cap(store_bytes: int | None, num_workers: int, crop_size: int) -> int | None:
    """The most rows each Train worker's local shuffle buffer may hold so that ``num_workers``
    buffers of uint8 3 x crop x crop images on one node take at most SHUFFLE_STORE_SHARE of its
    object store (``store_bytes``); None when the store is not known."""
    if not store_bytes:
        return None
    row = 3 * crop_size * crop_size
    return max(1, int(SHUFFLE_STORE_SHARE * store_bytes / max(num_workers, 1) / row))
