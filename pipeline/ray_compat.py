"""Ray's private parts the pipeline rests on, all in this one module.

Each is pinned to the Ray it was written against (``RAY_VERSION``, what pyproject.toml installs)
by a test in tests/test_ray_compat.py, so an upgrade that changes one fails there, loudly, instead
of silently changing the train crops, the val split or the resume point:

- ``execution_count``: how many times Ray Data executed a dataset before, kept in the
  ``DataContext`` each task gets (``_execution_idx``; Ray reseeds ``FileShuffleConfig`` from it).
  The train crops' epoch is drawn from it (``presets.TrainTransform.epoch``).
- ``exact_val_data_config``: a ``ray.train.DataConfig`` whose "val" split is exact, built on its
  ``_resolve_execution_options``.
- ``latest_recorded_checkpoint``: the layout of Ray Train V2's ``checkpoint_manager_snapshot.json``
  (``_CheckpointManagerState``), the record of which checkpoint a rerun resumes from.

- ``bound_operator_outputs``: a Ray Data backpressure policy of the pipeline's own
  (``OutputBudgetPolicy``, on ``BackpressurePolicy``, ``ResourceManager.get_mem_op_outputs`` and
  the ``backpressure_policies.enabled`` config key), which caps the bytes an operator's output
  holds in the object store. Ray's own policies leave it unbounded while the per-operator
  reservation is off and no consumer has started (data.configure_context says why).
- ``spilled_bytes``: Ray's spill counter, as ``ray memory --stats-only`` prints it.

- ``quiet_train_reports``: the logger through which each Ray Train V2 worker logs every
  ``ray.train.report`` at INFO (the whole metrics dict and checkpoint, named by its module's
  file path), which buried the jobs' own epoch lines.

- ``quiet_ray_logs``: Ray Data's logging configuration (``ray.data._internal.logging``'s
  ``DEFAULT_CONFIG``, read from the file ``RAY_DATA_LOGGING_CONFIG`` names) and the names of the
  loggers of Ray's token-auth notice and Ray Data's "progress bars disabled" notice.

Everything else the pipeline uses of Ray is public API (``ray.data``, ``ray.train``).
"""

from __future__ import annotations

import json
import logging

from pipeline.errors import InputError

RAY_VERSION = "2.60.0"  # what these were read from and the tests pin

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of reported checkpoints


def execution_count(context=None) -> int:
    """How many times Ray Data has executed the dataset whose task calls this, before this
    execution (0 outside Ray Data, and where Ray is not installed): the epoch of a dataset that
    is iterated once per epoch, counted from 0 in every new driver run. ``context``: the
    ``DataContext`` to read (a datasource's ``get_read_tasks`` is handed the one of the
    execution it plans); default: the current one."""
    if context is None:
        try:
            from ray.data import DataContext
        except ImportError:
            return 0
        context = DataContext.get_current()
    return int(getattr(context, "_execution_idx", 0) or 0)


def exact_val_data_config(execution_options=None):
    """A ``ray.train.DataConfig`` that splits "train" equally among the workers (lockstep DDP
    needs equal step counts) and "val" with ``streaming_split(world_size, equal=False)``, so no
    val image is dropped or seen twice. ``execution_options`` (a ``ray.data.ExecutionOptions``
    or None) apply to both. Imports Ray when called."""
    import ray.train

    class _ExactValDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kw):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kw)
            if "val" in datasets:
                ds = datasets["val"].copy(datasets["val"])
                ds.context.execution_options = self._resolve_execution_options("val")
                for i, it in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i]["val"] = it
            return out

    return _ExactValDataConfig(datasets_to_split=["train"], execution_options=execution_options)


def latest_recorded_checkpoint(snapshot_text: str, where: str = SNAPSHOT_FILE
                               ) -> tuple[str, dict] | None:
    """From the text of a ``checkpoint_manager_snapshot.json``: the checkpoint a rerun resumes
    from, as (its folder name, the metrics reported with it), or None when none was recorded.
    Raises InputError (naming ``where``) for text that is not this layout: another Ray
    version's, or a file caught mid-rewrite."""
    try:
        latest = json.loads(snapshot_text)["latest_checkpoint_result"]
        if latest is None:
            return None
        return str(latest["checkpoint_dir_name"]), dict(latest["metrics"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{where} cannot be read ({type(e).__name__}: {e}): this Ray version "
                         f"writes another format, or the file is damaged") from e


def quiet_train_reports() -> str:
    """Raise to WARNING the logger that logs each ``ray.train.report`` in a Ray Train V2
    worker ("Reporting training result N: TrainingReport(...)", ``ray/train/v2/_internal/
    execution/context.py``, ``logging.getLogger(__file__)``): the epoch line says the same in
    words. Call it in the worker; returns the logger's name."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    return context.__file__


def spilled_bytes() -> int:
    """Bytes the connected Ray cluster has spilled from its object store to disk since it
    started, to the MiB: the counter `ray memory --stats-only` prints ("Spilled N MiB, M
    objects"), through the same private call (``memory_summary``). 0 when the summary names no
    spill (Ray prints the line only once something spilled); a summary without its "Plasma
    memory usage" heading raises, so a changed format cannot read as 0 forever."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    if "Plasma memory usage" not in text:
        raise RuntimeError(f"Ray's memory summary changed form (ray_compat.spilled_bytes): "
                           f"{text[:300]!r}")
    m = re.search(r"Spilled (\d+) MiB", text)
    return int(m.group(1)) * 2**20 if m else 0


OUTPUT_BUDGET_KEY = "resnet_pipeline.output_budget_bytes"


try:  # the base of the policy below; this module imports without Ray too
    from ray.data._internal.execution.backpressure_policy import (
        BackpressurePolicy as _PolicyBase)
except ImportError:  # pragma: no cover - Ray is a dependency; the GPU bundle strips no Data
    _PolicyBase = object


class OutputBudgetPolicy(_PolicyBase):
    """No new task, and no more of its tasks' output read, while an operator's output (queued,
    and held by the operators after it) holds the context's ``OUTPUT_BUDGET_KEY`` bytes; or,
    while the CPU actors of the pool it feeds all start (none running yet), one output block
    (its average so far) per starting actor (``startup_bytes``)."""

    @property
    def name(self) -> str:
        return "OutputBudget"

    def _over(self, op) -> bool:
        budget = self._data_context.get_config(OUTPUT_BUDGET_KEY)
        if not budget:
            return False
        startup = startup_bytes(op)
        if startup is not None:
            budget = min(budget, startup)
        used = self._resource_manager.get_mem_op_outputs(op, include_ineligible_downstream=True)
        return used >= budget

    def can_add_input(self, op) -> bool:
        return not self._over(op)

    def max_task_output_bytes_to_read(self, op):
        return 0 if self._over(op) else None


def startup_bytes(op) -> float | None:
    """What ``op`` (a Ray Data physical operator) may hold of output while the CPU actors of
    the pool after it start (none of them running yet): one of its output blocks (their average
    so far) for each; None when no such pool waits on it, or before ``op``'s first block. The
    actors share the node's cores with ``op``'s tasks, and decoding further ahead took cores
    from their start-up (the imports, the model) while the decoded images waited for them
    anyway (measured 2026-12-07 on 2 cores: the decode tasks used about one core of two while
    the two actors started; capped, start-up to the first batch went from 11.5 to 10.4 s and
    from 12.4 to 11.6 s in two pairs of runs over 5,000 ImageNet-size images). Once an
    actor runs the cap is off: Ray's pool hands a running actor several blocks at once (its
    tasks in flight), and a cap that outlasted the start-up left the other actor without input.
    A pool of GPU actors keeps the whole budget: its decode stage is the limit, and a head start
    counts."""
    for after in op.output_dependencies:
        actors = after.get_actor_info()
        if actors.running or not actors.pending:
            continue
        if after.min_max_resource_requirements()[1].gpu:
            continue
        block = op.metrics.average_bytes_per_output
        return block * actors.pending if block else None
    return None


def bound_operator_outputs(context, budget_bytes: int | None) -> None:
    """Add ``OutputBudgetPolicy`` with ``budget_bytes`` (None: leave Ray's policies as they
    are) to the backpressure policies of ``context`` (a ``DataContext``: the datasets built
    from it carry it, also into Ray Train's split coordinator). Ray's escape hatch for a
    starved pipeline (``OutputBackpressureGuard``) still releases one block at a time, so the
    cap cannot deadlock."""
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES, ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY)

    if not budget_bytes:
        return
    context.set_config(OUTPUT_BUDGET_KEY, int(budget_bytes))
    context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                       [*ENABLED_BACKPRESSURE_POLICIES, OutputBudgetPolicy])


# --- quiet by default: Ray's own progress lines in its session logs, not on the terminal ------

QUIET = {"on": False}
# Ray's notices that say nothing about the job: "Token authentication is enabled for this Ray
# cluster" (a local cluster the job starts itself) and "Progress bars disabled" (the jobs print
# their own progress lines, pipeline.progress)
NOTICE_LOGGERS = ("ray._private.authentication.authentication_token_setup",
                  "ray.data._internal.progress")


def quiet_ray_logs(local: bool) -> None:
    """Keep Ray's own INFO lines (Ray Data's "Starting execution of Dataset ...", "Execution
    plan ...", "... execution finished"; Ray Train's "Checkpoint successfully created") off the
    terminal, in Ray's session logs: Ray Data's console handler at WARNING and its file handler
    (``ray-data.log``) as Ray has it, in this process and, on a cluster the job starts itself
    (``local``), in its Ray workers (the environment variable ``RAY_DATA_LOGGING_CONFIG``, which
    they inherit, names a config file written here; Ray Train's preemption watcher, which no
    local cluster needs, is off there). Ray Train's level is set per run
    (``train_logging_config``). Warnings and errors still reach the terminal. Call before
    ``ray.init``."""
    import atexit
    import copy
    import json
    import logging
    import os
    import tempfile

    from ray.data._internal import logging as data_logging

    QUIET["on"] = True
    for name in NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    config = copy.deepcopy(data_logging.DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "WARNING"
    # the workers' "Progress bars disabled" notice (SplitCoordinator), as in this process
    config["loggers"]["ray.data._internal.progress"] = {"level": "ERROR"}
    fd, path = tempfile.mkstemp(prefix="ray-data-logging-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)  # JSON is YAML
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    if local:  # a cluster's other nodes cannot read this file: their workers keep Ray's default
        os.environ[data_logging.RAY_DATA_LOGGING_CONFIG_ENV_VAR_NAME] = path
        data_logging.configure_logging()
        # nothing preempts a cluster on this one machine; Ray Train's preemption watcher actor
        # only added an error-level core_worker line about its own restart arguments
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    else:
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ == "PlainRayHandler":  # the console one
                handler.setLevel(logging.WARNING)


def train_logging_config():
    """Ray Train's ``RunConfig(logging_config=...)``: WARNING while ``quiet_ray_logs`` is on
    (Ray applies it to Train's log files too), else None (Ray's default, INFO)."""
    if not QUIET["on"]:
        return None
    import ray

    return ray.LoggingConfig(log_level="WARNING")
