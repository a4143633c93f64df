"""The resource plan (pipeline/resources.py): every job's stages planned against the cluster
before anything starts; a plan that cannot run is refused at once, naming the flags and the
cluster, and the auto plans always fit."""

from __future__ import annotations

import pytest

from pipeline import resources
from pipeline.errors import UsageError

TWO_CPUS = resources.Cluster(cpus=2, gpus=0)


def test_default_training_plan_leaves_the_data_stage_a_cpu_on_two_cpus():
    plan = resources.plan_training(TWO_CPUS, num_workers=2, use_gpu=False)
    assert plan.cpus_per_worker == 0.5 and plan.data_cpus == 1.0 and plan.decode_cpus == 1.0


@pytest.mark.parametrize("cpus,workers", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2), (16, 2),
                                          (96, 8)])
def test_auto_training_plans_always_fit_and_leave_the_data_stage_room(cpus, workers):
    plan = resources.plan_training(resources.Cluster(cpus, 0), workers, use_gpu=False)
    used = workers * plan.cpus_per_worker + plan.decode_cpus
    assert plan.cpus_per_worker > 0 and plan.decode_cpus > 0 and used <= cpus + 1e-9


def test_gpu_training_takes_one_cpu_a_worker_and_leaves_the_rest_to_decoding():
    plan = resources.plan_training(resources.Cluster(96, 8), 8, use_gpu=True)
    assert plan.cpus_per_worker == 1.0 and plan.data_cpus == 88.0


@pytest.mark.parametrize("kw,flags", [
    (dict(num_workers=2, use_gpu=False, cpus_per_worker=1.0), "--cpus-per-worker 1"),
    (dict(num_workers=2, use_gpu=True), "--use-gpu with --num-workers 2 needs 2 GPUs"),
    (dict(num_workers=0, use_gpu=False), "--num-workers must be at least 1"),
])
def test_impossible_training_settings_are_refused_naming_flags_and_cluster(kw, flags):
    with pytest.raises(UsageError, match=flags) as e:
        resources.plan_training(TWO_CPUS, **kw)
    assert "--num-workers" in str(e.value)
    if kw["num_workers"]:
        assert "2 CPUs and 0 GPUs" in str(e.value)


def test_a_cluster_that_may_grow_waits_for_nodes_with_a_warning(caplog):
    growing = resources.Cluster(cpus=2, gpus=0, can_grow=True)
    plan = resources.plan_training(growing, 4, use_gpu=True)
    assert plan.num_workers == 4 and plan.data_cpus is None
    assert "Waiting for the autoscaler" in caplog.text


@pytest.mark.parametrize("actors,cpus_per_actor,ok", [(1, 0, True), (2, 0, True), (4, 0, True),
                                                      (1, 1.0, True), (2, 1.0, False),
                                                      (3, 0.5, True), (3, 0.65, False)])
def test_prediction_plans_on_two_cpus(actors, cpus_per_actor, ok):
    if not ok:
        with pytest.raises(UsageError, match=r"--actors .* leaves no CPU to decode.*2 CPUs"):
            resources.plan_prediction(TWO_CPUS, actors, False, cpus_per_actor)
        return
    plan = resources.plan_prediction(TWO_CPUS, actors, False, cpus_per_actor)
    assert actors * plan.cpus_per_actor + plan.decode_cpus <= 2 + 1e-9
    assert plan.decode_cpus != plan.cpus_per_actor  # equal resources would fuse the two


def test_gpu_decoding_leaves_a_share_of_each_gpu_to_the_decode_tasks():
    plan = resources.plan_prediction(resources.Cluster(16, 1), 1, True, decode_device="cuda")
    assert plan.gpus_per_actor + plan.decode_gpus <= 1.0 and plan.decode_gpus > 0
    with pytest.raises(UsageError, match="needs 2 GPUs"):
        resources.plan_prediction(resources.Cluster(16, 1), 2, True)


def test_decoding_in_the_actor_gives_it_the_whole_gpu_and_the_tasks_none():
    plan = resources.plan_prediction(resources.Cluster(16, 1), 1, True, decode_device="cuda",
                                     decode_in="actor")
    assert plan.gpus_per_actor == 1.0 and plan.decode_gpus == 0.0


def test_gpu_decoding_without_use_gpu_is_refused_instead_of_decoding_with_pil():
    """The decode tasks' GPU share is a share of the actors' GPUs: without --use-gpu there is
    none, and each task fell back to PIL without a word."""
    with pytest.raises(UsageError, match="--decode-device cuda .* add --use-gpu"):
        resources.plan_prediction(resources.Cluster(16, 1), 1, False, decode_device="cuda")


@pytest.mark.parametrize("plan", [
    lambda c, gpu: resources.plan_prediction(c, 1, gpu),
    lambda c, gpu: resources.plan_training(c, 1, gpu)])
def test_a_gpu_cluster_left_idle_without_use_gpu_is_warned_about(plan, caplog):
    gpus = resources.Cluster(16, 2)
    plan(gpus, False)
    assert "this Ray cluster has 16 CPUs and 2 GPUs and --use-gpu is not given" in caplog.text
    caplog.clear()
    plan(gpus, True)
    plan(resources.Cluster(16, 0), False)
    assert "--use-gpu" not in caplog.text


@pytest.mark.parametrize("cluster,actors,tasks", [(TWO_CPUS, 1, 1), (TWO_CPUS, 2, 1),
                                                 (resources.Cluster(16, 0), 1, 15),
                                                 (resources.Cluster(16, 1), 1, 15)])
def test_prediction_plans_cap_the_decode_tasks_at_the_cpus_left_to_decoding(cluster, actors,
                                                                             tasks):
    # Without a cap Ray Data submitted every read task at once: they queued ahead of the
    # predictor actor and their output ran ahead of the model until it spilled.
    plan = resources.plan_prediction(cluster, actors, cluster.gpus > 0)
    assert plan.decode_tasks == tasks
    assert actors * plan.cpus_per_actor + tasks * plan.decode_cpus <= cluster.cpus + 1e-9
    assert f"up to {tasks} decode task" in plan.describe()


def test_training_plans_cap_the_decode_tasks_at_the_data_stages_cpus():
    plan = resources.plan_training(resources.Cluster(16, 0), 1, False)
    assert plan.decode_tasks == int(plan.data_cpus / plan.decode_cpus) >= 1
    assert resources.plan_training(TWO_CPUS, 1, False).decode_tasks == 1


def test_the_shuffle_buffers_are_capped_at_a_quarter_of_a_nodes_object_store():
    # 2 workers of 224-pixel rows (150,528 bytes) on a 300 MB store: 75 MB for both buffers
    assert resources.shuffle_buffer_cap(300_000_000, 2, 224) == 249
    assert resources.shuffle_buffer_cap(None, 2, 224) is None
    # a default store (30% of 24 GB) leaves the default 1,000 rows as they are
    assert resources.shuffle_buffer_cap(int(0.3 * 24e9), 2, 224) > 1000


@pytest.mark.parametrize("cluster,use_gpu,threads,images,expected", [
    (TWO_CPUS, False, 0, 0, 2),  # one single-threaded actor per CPU
    (resources.Cluster(16, 0), False, 4, 0, 4),  # --threads 4: one per 4 CPUs
    (resources.Cluster(16, 0, memory=7e9), False, 0, 0, 3),  # one per 2 GB of Ray's memory
    (resources.Cluster(1.5, 0), False, 0, 0, 1),
    (resources.Cluster(16, 4), True, 0, 0, 4),  # one per GPU, whatever the CPUs
    (resources.Cluster(16, 0, can_grow=True), True, 0, 0, 1),  # never none
    (resources.Cluster(0, 0, can_grow=True), False, 0, 0, 1),
    (TWO_CPUS, False, 0, 64 * 3, 1),  # 3 batches: one actor per 2 batches at most
    (TWO_CPUS, False, 0, 64 * 4, 2),
    (resources.Cluster(16, 4), True, 0, 64 * 5, 2),
    (TWO_CPUS, False, 0, 1, 1)])
def test_auto_actors_one_per_core_or_gpu_within_memory_and_the_sets_batches(
        cluster, use_gpu, threads, images, expected):
    assert resources.auto_actors(cluster, use_gpu, threads, images, 64) == expected


def test_the_default_prediction_plan_on_two_cpus_is_two_actors_and_a_decode_task():
    plan = resources.plan_prediction(TWO_CPUS, 0, False)
    assert (plan.actors, plan.cpus_per_actor, plan.decode_cpus, plan.decode_tasks) == (
        2, 0.5, 1.0, 1)
    assert plan.describe().startswith("2 predictor actors x (0.5 CPU)")
    assert resources.plan_prediction(TWO_CPUS, 0, False, images=100, batch_size=64).actors == 1
    with pytest.raises(UsageError, match=r"--actors must be at least 1 \(0: auto\), not -1"):
        resources.plan_prediction(TWO_CPUS, -1, False)


def test_auto_actors_are_single_threaded_wherever_ray_places_them_unless_capped():
    """One actor a CPU: each runs one torch thread, not its node's cores over the actors Ray put
    there (uneven on a cluster of unequal nodes). Capped below one a CPU (memory, --threads), the
    node's cores are shared as with an explicit --actors."""
    assert resources.plan_prediction(resources.Cluster(36, 0), 0, False).threads == 1
    assert resources.plan_prediction(resources.Cluster(16, 0, memory=7e9), 0, False).threads == 0
    assert resources.plan_prediction(resources.Cluster(16, 0), 0, False, threads=4).threads == 4
    assert resources.plan_prediction(TWO_CPUS, 2, False).threads == 0
    assert resources.plan_prediction(resources.Cluster(16, 2), 0, True).threads == 0
    # cluster.yaml's head before a worker joins: the one actor gets the worker's cores
    assert resources.plan_prediction(resources.Cluster(0, 0, can_grow=True), 0, False
                                     ).threads == 0
    assert resources.plan_prediction(resources.Cluster(2.5, 0), 0, False).threads == 1


def test_auto_actors_with_cpus_per_actor_leave_a_cpu_to_decoding():
    """--cpus-per-actor 1 alone ran one actor before --actors 0; auto must not turn it into two
    that hold both CPUs and be refused for a flag the user never gave."""
    plan = resources.plan_prediction(TWO_CPUS, 0, False, 1.0)
    assert (plan.actors, plan.cpus_per_actor, plan.decode_cpus) == (1, 1.0, 0.5)
    assert resources.plan_prediction(resources.Cluster(16, 0), 0, False, 2.0).actors == 7
    with pytest.raises(UsageError, match=r"--actors 0 \(auto: 1\) x --cpus-per-actor 2 = 2 CPUs"):
        resources.plan_prediction(TWO_CPUS, 0, False, 2.0)


def test_auto_actors_on_a_growing_cluster_say_what_they_counted(caplog):
    """cluster.yaml's head has no CPU for jobs: before a worker joins, auto has nothing to
    count, and says so (a fixed cluster joined through RAY_ADDRESS gets no line each run)."""
    plan = resources.plan_prediction(resources.Cluster(0, 0, can_grow=True), 0, False)
    assert plan.actors == 1
    assert ("--actors 0 (auto): 1 predictor actor, as this Ray cluster has 0 CPUs and 0 GPUs "
            "now; on a cluster that is still scaling up, pass --actors") in caplog.text
    caplog.clear()
    assert resources.plan_prediction(resources.Cluster(8, 0, can_grow=True), 0, False).actors == 8
    assert resources.plan_prediction(resources.Cluster(8, 0, can_grow=True), 0, True,
                                     ).actors == 1
    assert caplog.text.count("--actors 0 (auto)") == 1  # the GPUs it counted: none
