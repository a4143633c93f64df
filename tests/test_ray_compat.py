"""Ray's private parts the pipeline rests on (pipeline/ray_compat.py), each pinned to Ray 2.60:
an upgrade that changes one fails here, by name, instead of silently changing the train crops,
the val split or the resume point."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest

from pipeline import data, presets, ray_compat


def test_the_installed_ray_is_the_one_these_parts_were_read_from():
    import ray

    assert ray.__version__ == ray_compat.RAY_VERSION, (
        f"Ray {ray.__version__} is installed; pipeline/ray_compat.py was read from "
        f"{ray_compat.RAY_VERSION}: check each of its parts against the new Ray, then this pin")


def test_execution_count_is_the_number_of_earlier_passes_over_a_dataset(ray_local):
    """The train crops' epoch (presets.TrainTransform.epoch) comes from this count."""
    import ray

    def counted(batch):
        return {"n": np.full(len(batch["id"]), ray_compat.execution_count())}

    ds = ray.data.range(6, override_num_blocks=2).map_batches(counted, batch_format="numpy")
    passes = [sorted({int(r["n"]) for r in ds.take_all()}) for _ in range(3)]
    assert passes == [[0], [1], [2]]
    assert ray_compat.execution_count() == 0  # outside Ray Data


def test_the_exact_val_data_config_stands_on_ray_trains_data_config():
    import ray.train
    from ray.data import ExecutionOptions

    config = ray_compat.exact_val_data_config(ExecutionOptions(preserve_order=True))
    assert isinstance(config, ray.train.DataConfig)
    options = config._resolve_execution_options("val")
    assert isinstance(options, ExecutionOptions) and options.preserve_order
    params = list(inspect.signature(ray.train.DataConfig.configure).parameters)
    assert params[:5] == ["self", "datasets", "world_size", "worker_handles", "worker_node_ids"]


def test_the_checkpoint_snapshot_layout_is_ray_trains():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState, _TrainingResultState)

    assert CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == ray_compat.SNAPSHOT_FILE
    latest = _TrainingResultState(checkpoint_dir_name="checkpoint_2026-12-05_01-00-00.000001",
                                  metrics={"epoch": 3, "val_top1": 61.5})
    empty = dict(checkpoint_results=[], checkpoint_report_indices=[],
                 pending_training_results=[], pending_validation_specs=[],
                 current_report_index=0, validated_checkpoint_dir_names=[],
                 timed_out_validation_checkpoint_dir_names=[],
                 failed_validation_checkpoint_dir_names=[])
    written = _CheckpointManagerState(**{**empty, "checkpoint_results": [latest],
                                         "checkpoint_report_indices": [0]},
                                      latest_checkpoint_result=latest).json()
    assert ray_compat.latest_recorded_checkpoint(written) == (
        "checkpoint_2026-12-05_01-00-00.000001", {"epoch": 3, "val_top1": 61.5})
    assert ray_compat.latest_recorded_checkpoint(_CheckpointManagerState(**empty).json()) is None
    with pytest.raises(ValueError, match="cannot be read"):
        ray_compat.latest_recorded_checkpoint("")  # a snapshot caught mid-rewrite


def test_building_the_jobs_datasets_uses_no_argument_ray_calls_deprecated(shard_set, caplog):
    """Ray 2.60 warns on every map_batches given ``concurrency`` (deprecated in 2.51); the
    decode stage and the predictor pool say ``compute`` instead."""
    from pipeline import predict, resources

    manifest = str(shard_set / "val.json")
    with caplog.at_level(logging.WARNING):
        data.read_decoded(manifest, presets.TrainTransform(16), data.ReadPlan(concurrency=2))
        plan = resources.plan_prediction(resources.current_cluster(), 1, False, 0.0, "cpu")
        predict.prediction_dataset(manifest, "none", plan,
                                   predict.PredictOptions(decode_concurrency=1),
                                   presets.Preset(18, 16))
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], caplog.text


def test_the_train_report_logger_is_the_one_ray_train_logs_each_report_with():
    """Ray Train V2 logs every report at INFO from each worker, through a logger named by its
    module's file: quiet_train_reports must name that logger, or the lines come back."""
    from ray.train.v2._internal.execution import context

    source = inspect.getsource(context)
    assert "logger = logging.getLogger(__file__)" in source
    assert 'f"Reporting training result {report_call_index}: {training_report} "' in source
    name = ray_compat.quiet_train_reports()
    assert name == context.__file__ and context.logger.getEffectiveLevel() == logging.WARNING


def test_the_output_budget_policy_joins_rays_own_backpressure_policies(ray_local):
    """Ray Data builds its policies from this config key and calls these two methods: the
    budget holds the decode stage's output while no consumer has started (data.py), and one
    block per CPU actor while those start."""
    from types import SimpleNamespace as NS

    from ray.data import DataContext
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES, ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
        BackpressurePolicy)
    from ray.data._internal.execution.resource_manager import ResourceManager

    from pipeline import resources

    data.configure_context()
    ctx = DataContext.get_current()
    policies = ctx.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY)
    assert policies == [*ENABLED_BACKPRESSURE_POLICIES, ray_compat.OutputBudgetPolicy]
    assert issubclass(ray_compat.OutputBudgetPolicy, BackpressurePolicy)
    assert ctx.get_config(ray_compat.OUTPUT_BUDGET_KEY) == int(
        data.OUTPUT_STORE_SHARE * resources.node_object_store_bytes())
    assert "include_ineligible_downstream" in inspect.signature(
        ResourceManager.get_mem_op_outputs).parameters

    class Usage:  # what the policy reads of Ray's resource manager
        def __init__(self, used):
            self.used = used

        def get_mem_op_outputs(self, op, include_ineligible_downstream):
            return self.used

    budget = ctx.get_config(ray_compat.OUTPUT_BUDGET_KEY)
    under = ray_compat.OutputBudgetPolicy(ctx, {}, Usage(budget - 1))
    over = ray_compat.OutputBudgetPolicy(ctx, {}, Usage(budget))
    op = NS(output_dependencies=[])  # the last operator: no actor pool after it
    assert under.can_add_input(op) and under.max_task_output_bytes_to_read(op) is None
    assert not over.can_add_input(op) and over.max_task_output_bytes_to_read(op) == 0
    starting = NS(get_actor_info=lambda: NS(running=0, pending=2),
                  min_max_resource_requirements=lambda: (None, NS(gpu=0.0)))
    feeding = NS(output_dependencies=[starting], metrics=NS(average_bytes_per_output=1000))
    assert not ray_compat.OutputBudgetPolicy(ctx, {}, Usage(2000)).can_add_input(feeding)
    assert ray_compat.OutputBudgetPolicy(ctx, {}, Usage(1999)).can_add_input(feeding)


def test_while_its_cpu_actors_start_a_decode_stage_holds_one_block_for_each():
    """``startup_bytes`` on stand-ins for Ray Data's operators, and the members it reads on
    Ray's own classes."""
    from types import SimpleNamespace as NS

    from ray.data._internal.actor_autoscaler.autoscaling_actor_pool import ActorPoolInfo
    from ray.data._internal.execution.interfaces.op_runtime_metrics import OpRuntimeMetrics
    from ray.data._internal.execution.interfaces.physical_operator import PhysicalOperator
    from ray.data._internal.execution.operators.actor_pool_map_operator import (
        ActorPoolMapOperator)
    from ray.data._internal.execution.operators.task_pool_map_operator import (
        TaskPoolMapOperator)

    def pool(running, pending, gpus=0.0):
        return NS(get_actor_info=lambda: ActorPoolInfo(running=running, pending=pending,
                                                       restarting=0),
                  min_max_resource_requirements=lambda: (None, NS(gpu=gpus)))

    def decode(after, block=9.6e6):
        return NS(output_dependencies=after, metrics=NS(average_bytes_per_output=block))

    assert ray_compat.startup_bytes(decode([pool(0, 2)])) == 2 * 9.6e6  # both starting
    # one runs: Ray hands it several blocks at once, and a cap would starve the other
    assert ray_compat.startup_bytes(decode([pool(1, 1)])) is None
    assert ray_compat.startup_bytes(decode([pool(0, 2, gpus=1.0)])) is None  # GPU: head start
    assert ray_compat.startup_bytes(decode([pool(0, 2)], block=None)) is None  # no block yet
    assert ray_compat.startup_bytes(decode([])) is None  # the last operator (Ray Train's feed)
    tasks = NS(get_actor_info=PhysicalOperator.get_actor_info.__get__(NS()))
    assert ray_compat.startup_bytes(decode([tasks])) is None  # a task pool has no actors
    # what it reads, on the installed Ray
    assert {"running", "pending"} <= set(ActorPoolInfo.__dataclass_fields__)
    assert isinstance(OpRuntimeMetrics.average_bytes_per_output, property)
    for cls in (ActorPoolMapOperator, TaskPoolMapOperator):
        assert callable(cls.get_actor_info) and callable(cls.min_max_resource_requirements)
    assert isinstance(PhysicalOperator.output_dependencies, property)
