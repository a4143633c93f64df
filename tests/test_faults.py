"""Faults on a local Ray cluster, and the failed-sample thresholds; the fault table in
docs/RELIABILITY.md.

Each test injects one fault into a real job (a worker or actor SIGKILLed from inside, a job's
process killed, damaged samples), asserts that nothing is lost or duplicated, and records what
was observed. The last test renders the rows and checks that docs/RELIABILITY.md carries that table
(``make readme-tables`` rewrites it from a fresh run). All slow: run by `make test-slow` and CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from jobs import finetune
from pipeline import faults, metrics, ray_compat, shards, sources, train
from tests.conftest import (check_readme_table, corrupt_one_member, finetune_config,
                            last_checkpoint_state, render_table)

pytestmark = pytest.mark.slow
ROWS: list[tuple[str, str, str]] = []


def record(case: str, job: str, outcome: str) -> None:
    ROWS.append((case, job, " ".join(outcome.split())))


def test_a_train_worker_killed_mid_epoch_is_recovered(shard_set, tmp_path, armed_fault):
    marker = tmp_path / "killed-once"
    armed_fault("train_step", str(marker), epoch=1, step=1, rank=1)
    out = finetune.run(finetune_config(shard_set, tmp_path, epochs=2, name="kill"))
    assert marker.exists()  # the SIGKILL happened
    assert [h["epoch"] for h in out["history"]] == [0, 1]  # each epoch reported once
    assert last_checkpoint_state(tmp_path, "kill")["epoch"] == 1
    assert out["val_images"] == 16 and out["train_images"] == 32
    record("Ray Train worker (rank 1) SIGKILLed at step 2 of epoch 2", "jobs.finetune",
           "the worker group restarts from the epoch-1 checkpoint; the run finishes with "
           "epochs [1, 2] reported once each, all 32 train and 16 val images in the last epoch")


def _wait_for(predicate, proc, timeout=300.0):
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, "the job ended before the fault: " + proc.stdout.read()[-2000:]
        assert time.monotonic() - t0 < timeout, "the fault point was never reached"
        time.sleep(0.2)


def _wait_for_other_jobs_actors_to_die(ray_local, class_names, timeout=120.0):
    """Wait until no actor of these classes is alive outside this test process's own job (its
    earlier in-process runs may keep theirs)."""
    from ray.util.state import list_actors

    ours, t0 = ray_local.get_runtime_context().get_job_id(), time.monotonic()
    # This test's cluster by address: with none, Ray looks for *the* local instance and fails
    # when another one (another checkout's tests) runs on the same machine.
    address = ray_local.get_runtime_context().gcs_address
    while alive := [a.class_name for a in list_actors(address=address,
                                                      filters=[("state", "=", "ALIVE")])
                    if a.class_name in class_names and a.job_id != ours]:
        assert time.monotonic() - t0 < timeout, f"still alive after {timeout:.0f} s: {alive}"
        time.sleep(0.5)


def _resume_epoch_now(storage_path: str, name: str) -> int:
    """``train.resume_epoch`` while the job runs: Ray Train rewrites its snapshot in place (a
    poll once read it empty, mid-write), so a snapshot that cannot be read yet counts as none."""
    try:
        return train.resume_epoch(storage_path, name)
    except ValueError:
        return 0


def test_finetune_job_killed_after_a_checkpoint_resumes_on_rerun(shard_set, tmp_path,
                                                                 ray_local, armed_fault):
    """The job's own process is SIGKILLed (a lost driver) while its Train workers are held at
    the start of epoch 2, after epoch 1's checkpoint (faults.arm_hold: without the hold, the
    workers train on until Ray reaps them, and a fast machine could finish the run first); the
    rerun continues the run from epoch 2."""
    cfg = finetune_config(shard_set, tmp_path, epochs=3, name="crash")
    gate = tmp_path / "never"  # never created: the held workers die with the job
    faults.arm_hold("train_epoch_1", str(gate))
    args = [sys.executable, "-m", "jobs.finetune", "--train", cfg.train, "--val", cfg.val,
            "--weights", "none", "--epochs", "3", "--num-workers", "2", "--cpus-per-worker",
            "0.5", "--threads", "1", "--storage-path", cfg.storage_path, "--name", "crash",
            "--batch-size", "8", "--crop-size", "32", "--precision", "fp32"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for(lambda: (tmp_path / "never.reached").exists()
                  and _resume_epoch_now(cfg.storage_path, "crash") >= 1, proc)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    faults.disarm()  # the rerun's workers must not hold
    # The controller and workers are actors, not children of the driver: Ray kills them when it
    # sees the job's driver gone.
    _wait_for_other_jobs_actors_to_die(ray_local, ("TrainController", "RayTrainWorker"))
    resume_at = train.resume_epoch(cfg.storage_path, "crash")
    killed_history = last_checkpoint_state(tmp_path, "crash")["history"]
    assert resume_at == 1 and proc.returncode == -signal.SIGKILL
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    history = json.loads((tmp_path / "runs/crash/history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # The epochs before the kill were not redone: same records, to the last float.
    assert [(h["epoch"], h["train_loss"]) for h in history[:resume_at]] == \
        [(h["epoch"], h["train_loss"]) for h in killed_history[:resume_at]], rerun.stdout[-3000:]
    record("fine-tuning job's process SIGKILLed after its epoch-1 checkpoint", "jobs.finetune",
           "the rerun with the same --name resumes after the last checkpoint Ray Train recorded; "
           "history.json holds epochs 1-3 once each, those before the kill unchanged")


def test_undecodable_train_samples_over_the_threshold_stop_the_run(shard_set, tmp_path,
                                                                  ray_local):
    shutil.copytree(shard_set, tmp_path / "s")
    key, shard = corrupt_one_member(tmp_path / "s",
                                    shards.load_manifest(str(tmp_path / "s" / "train.json")))
    with pytest.raises(RuntimeError, match=r"1 of 48 samples failed to decode in epoch 1 "
                                           r"\(allowed: 0.00%\)") as stopped:
        finetune.run(finetune_config(tmp_path / "s", tmp_path, epochs=2, name="bad"))
    failures = pd.read_parquet(tmp_path / "runs/bad/failures.parquet")
    assert failures[["key", "shard", "split"]].values.tolist() == [[key, shard, "train"]]
    assert not (tmp_path / "runs/bad/model.pt").exists()
    # The stopped epoch's checkpoint is kept: a rerun that allows the failure goes on from it.
    out = finetune.run(finetune_config(tmp_path / "s", tmp_path, epochs=2, name="bad",
                                       max_failed_fraction=0.05))
    assert [h["epoch"] for h in out["history"]] == [0, 1]
    assert out["train_failed"] == 1 and out["train_images"] == 31  # 32 rows, one undecodable
    assert len(pd.read_parquet(out["failures"])) == 1 and os.path.exists(out["model"])
    message = str(stopped.value).replace(str(tmp_path) + "/", "")
    record("a train JPEG cut short inside a valid shard", "jobs.finetune",
           f"exit 1 after epoch 1: {message.split(': ', 1)[1][:150]}...; "
           f"`--max-failed-fraction 0.05` resumes at epoch 2, the sample listed with its error")


def test_a_killed_predictor_actor_still_gives_exactly_one_row_per_image(shard_set, tmp_path,
                                                                        armed_fault):
    from pipeline import predict

    marker = tmp_path / "killed"
    armed_fault("predictor_batch", str(marker), batch=2)
    summary = predict.run_prediction(str(shard_set / "val.json"), "none", str(tmp_path / "out"),
                                     batch_size=4, precision="fp32", progress=False)
    assert marker.exists()  # the actor really died mid-run
    df = metrics.read_predictions(str(tmp_path / "out"))
    assert len(df) == df["key"].nunique() == summary["manifest_samples"] == 16
    record("predictor actor SIGKILLed at its 3rd batch", "jobs.predict",
           "Ray restarts the actor and retries its batches: exactly one row per image (16 of "
           "16, no duplicate key)")


def _normalized(message: str, tmp_path) -> str:
    """An error line with what changes between runs (ids, host, pid, times, paths) named."""
    message = message.replace(str(tmp_path) + "/", "")
    message = re.sub(r"run \d{8}T\d{6}Z-[0-9a-f]{6}", "run RUN_ID", message)
    message = re.sub(r"host \S+ \(pid \d+\)", "host HOST (pid PID)", message)
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", message)


def test_two_predictions_into_one_out_give_one_publish_and_one_refusal(shard_set, tmp_path,
                                                                       ray_local):
    """The first job is held just before its publish (faults.hold), holding OUT's lease, while a
    second one starts into the same --out: the second stops at once, the first publishes."""
    from pipeline import lease

    out, gate = tmp_path / "eval", tmp_path / "go"
    args = [sys.executable, "-m", "jobs.predict", "--data", str(shard_set / "val.json"),
            "--weights", "none", "--out", str(out), "--no-progress", "--batch-size", "8"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    first = subprocess.Popen(args, env={**env, faults.HOLD: f"before_publish:{gate}"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        _wait_for((tmp_path / "go.reached").exists, first)
        holder = lease.read_holder(str(out))
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert not (out / "_SUCCESS").exists()  # the second touched nothing
        gate.touch()
        first_log = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
    refusal = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 1, second.stderr[-3000:]
    assert holder.pid == first.pid and refusal.startswith("error: ") and (
        f"is being written by run {holder.run_id} on host {holder.host} (pid {first.pid})"
        in refusal), refusal
    assert first.returncode == 0, first_log[-3000:]
    assert (out / "_SUCCESS").read_text().strip() == holder.run_id  # the first one published
    df = metrics.read_predictions(str(out))
    assert len(df) == df["key"].nunique() == 16
    assert not [p.name for p in out.iterdir() if p.name.startswith(("_LEASE", "_staging"))]
    record("a second `jobs.predict` into the same --out while the first runs", "jobs.predict",
           f"exit 1 before touching OUT: {_normalized(refusal, tmp_path)[len('error: '):]}; the "
           f"first publishes exactly one row per image (16 of 16) and releases its lease")


def test_shard_job_killed_after_its_first_shard_gives_the_same_shards_on_rerun(image_tree,
                                                                               tmp_path,
                                                                               ray_local):
    def shard(out, fault=None):
        return subprocess.run(
            [sys.executable, "-m", "jobs.shard", "--source", str(image_tree / "train"),
             "--out", str(out), "--samples-per-shard", "4", "--no-progress"],
            env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
                 **({"RESNET_PIPELINE_FAULT": fault} if fault else {})},
            capture_output=True, text=True, timeout=300)

    assert shard(tmp_path / "clean").returncode == 0
    killed = shard(tmp_path / "crashed", "shard_after_first_shard")
    assert killed.returncode == faults.EXIT_STATUS
    assert not (tmp_path / "crashed" / "train.json").exists()  # no manifest for a partial set
    rerun = shard(tmp_path / "crashed")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    clean = json.loads((tmp_path / "clean" / "train.json").read_text())
    again = json.loads((tmp_path / "crashed" / "train.json").read_text())
    assert [(s["file"], s["sha256"], s["samples"]) for s in again["shards"]] == \
        [(s["file"], s["sha256"], s["samples"]) for s in clean["shards"]]
    record("sharding job killed after its first shard was written", "jobs.shard",
           f"no manifest is left behind; the rerun writes {len(again['shards'])} shards "
           f"byte-identical (sha256) to an uninterrupted run, {again['total_samples']} samples")


def _job_status(c, submission_id: str) -> str:
    status, body = c.http(f"/api/jobs/{submission_id}")
    assert status == 200, body
    return json.loads(body)["status"]


def _wait_job(c, submission_id: str, timeout: float = 480.0) -> str:
    t0 = time.monotonic()
    while (status := _job_status(c, submission_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() - t0 < timeout, f"job {submission_id} still {status}"
        time.sleep(2)
    return status


def _job_logs(c, submission_id: str) -> str:
    return c.ray("job", "logs", "--address", c.dashboard, submission_id, check=False).stdout


def _shard_in_process(images, split: str, out, per_shard: int, classes_from=None) -> str:
    """Shard with the library in this process: the node-loss tests are about the job that
    loses the node, not about sharding (tests/test_cluster_local.py submits jobs.shard)."""
    src = sources.scan_source(str(images / split), split)
    if classes_from:
        src = sources.with_classes(src, shards.load_manifest(classes_from).classes)
    shards.write_shards(src, str(out), samples_per_shard=per_shard, progress=False)
    return str(out / f"{split}.json")


@pytest.mark.timeout(1200)
def test_predict_on_two_nodes_survives_losing_the_worker_node(loopback_cluster, tmp_path):
    """The session's two-node cluster on loopback (tests/raycluster.py). A decode task on the
    worker node is held (faults.hold, armed in that node's environment only) so the loss lands
    mid-run, with work on that node; then the node (its `ray start`, raylet, object store and
    Ray workers) is SIGKILLed. The job must finish on the head with one row per image."""
    from tests import raycluster

    from pipeline import synthetic

    gate = tmp_path / "never"  # never created: the held task dies with its node
    c = loopback_cluster
    c.start_worker(cpus=2, env={faults.HOLD: f"decode_batch:{gate}"})
    images, shard_dir, out = tmp_path / "images", tmp_path / "shards", tmp_path / "eval"
    # 32 shards of 3: 32 decode tasks, so while the head's one free CPU is busy some must go
    # to the worker node (with 8 tasks the head once decoded them all before any got there,
    # and the job ended before the node could be lost)
    synthetic.generate_image_folder(str(images), {"val": 32}, num_classes=3, seed=5,
                                    size_range=(48, 96))
    manifest = _shard_in_process(images, "val", shard_dir, 3)
    job = c.job_id("predict")
    c.ray("job", "submit", "--address", c.dashboard, "--working-dir", raycluster.ROOT,
          "--submission-id", job, "--no-wait", "--", "python", "-m", "jobs.predict",
          "--data", manifest, "--weights", "none", "--out", str(out),
          "--actors", "1", "--cpus-per-actor", "1", "--batch-size", "4", "--no-progress")
    t0 = time.monotonic()
    while not (tmp_path / "never.reached").exists():
        assert _job_status(c, job) in ("PENDING", "RUNNING"), _job_logs(c, job)[-4000:]
        assert time.monotonic() - t0 < 300, "no decode task reached the worker node"
        time.sleep(0.5)
    killed = c.kill_node("worker")
    lost_at = time.monotonic()
    status = _wait_job(c, job)
    recovered_s = time.monotonic() - lost_at
    log = _job_logs(c, job)
    assert status == "SUCCEEDED", log[-6000:]
    assert len(c.nodes()) == 1  # only the head is left
    df = metrics.read_predictions(str(out))
    assert len(df) == df["key"].nunique() == 96, log[-3000:]
    assert json.loads((out / "summary.json").read_text())["manifest_samples"] == 96
    print(f"node loss: {killed} processes killed; job finished {recovered_s:.0f} s later")
    record("the worker node of a two-node cluster (its raylet, object store and Ray workers) "
           "SIGKILLed while one of its decode tasks runs", "jobs.predict",
           "Ray marks the node dead and reruns its tasks on the head; the job succeeds with "
           "exactly one row per image (96 of 96, no duplicate key)")


BLOCKER = """
import os, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_b" not in n["Resources"])
@ray.remote(num_cpus=1.5)
class Blocker:
    def ready(self):
        return True
b = Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
ray.get(b.ready.remote())
open(sys.argv[1] + ".ready", "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.2)
"""


@pytest.mark.timeout(1500)
def test_finetune_on_two_nodes_resumes_after_losing_the_worker_node(loopback_cluster, tmp_path):
    """The Train worker group is placed on the worker node (a blocker actor holds the head's
    CPUs while it starts), held there at the start of epoch 2, after epoch 1's checkpoint; the
    blocker goes, the worker node is SIGKILLed, and the run must go on on the head from the
    recorded checkpoint."""
    from tests import raycluster

    from pipeline import synthetic

    gate, unblock = tmp_path / "never", tmp_path / "unblock"
    c = loopback_cluster
    c.start_worker(cpus=2, env={faults.HOLD: f"train_epoch_1:{gate}"})
    images, shard_dir, runs = tmp_path / "images", tmp_path / "shards", tmp_path / "runs"
    synthetic.generate_image_folder(str(images), {"train": 8, "val": 4}, num_classes=4,
                                    seed=1, size_range=(64, 128))
    train_manifest = _shard_in_process(images, "train", shard_dir, 12)
    val_manifest = _shard_in_process(images, "val", shard_dir, 10, classes_from=train_manifest)
    (tmp_path / "blocker.py").write_text(BLOCKER)
    blocker = c.job_id("blocker")
    c.ray("job", "submit", "--address", c.dashboard, "--submission-id", blocker,
          "--no-wait", "--", "python", str(tmp_path / "blocker.py"), str(unblock))
    t0 = time.monotonic()
    while not (tmp_path / "unblock.ready").exists():
        assert time.monotonic() - t0 < 180, _job_logs(c, blocker)[-3000:]
        time.sleep(0.5)
    job = c.job_id("finetune")
    c.ray("job", "submit", "--address", c.dashboard, "--working-dir", raycluster.ROOT,
          "--submission-id", job, "--no-wait", "--", "python", "-m", "jobs.finetune",
          "--train", train_manifest, "--val", val_manifest,
          "--weights", "none", "--epochs", "2", "--num-workers", "2", "--cpus-per-worker",
          "0.5", "--threads", "1", "--storage-path", str(runs), "--name", "n",
          "--batch-size", "8", "--crop-size", "32", "--precision", "fp32")
    t0 = time.monotonic()
    while not (tmp_path / "never.reached").exists():
        assert _job_status(c, job) in ("PENDING", "RUNNING"), _job_logs(c, job)[-4000:]
        assert time.monotonic() - t0 < 600, "no Train worker reached epoch 2 on the worker"
        time.sleep(0.5)
    t0 = time.monotonic()  # the controller records epoch 1's checkpoint
    while train.resume_epoch(str(runs), "n") < 1:
        assert time.monotonic() - t0 < 120, "epoch 1's checkpoint was never recorded"
        time.sleep(0.5)
    before = train.recorded_state(str(runs), "n")["history"]
    before_dir = train.recorded_checkpoint(str(runs), "n")[0]
    unblock.touch()
    assert _wait_job(c, blocker, timeout=120) == "SUCCEEDED"
    killed = c.kill_node("worker")
    lost_at = time.monotonic()
    status = _wait_job(c, job, timeout=900)
    recovered_s = time.monotonic() - lost_at
    log = _job_logs(c, job)
    assert status == "SUCCEEDED", log[-6000:]
    assert len(c.nodes()) == 1
    history = json.loads((runs / "n" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1], log[-3000:]
    # resumed from the recorded checkpoint, not from scratch: epoch 1's checkpoint from before
    # the loss is still one of the two kept (a rerun from scratch would have replaced it)
    snapshot = json.loads((runs / "n" / ray_compat.SNAPSHOT_FILE).read_text())
    kept = {r["checkpoint_dir_name"]: r["metrics"]["epoch"]
            for r in snapshot["checkpoint_results"]}
    assert kept.get(before_dir) == 0 and sorted(kept.values()) == [0, 1], (before_dir, kept)
    assert [(h["epoch"], h["train_loss"]) for h in before] == \
        [(h["epoch"], h["train_loss"]) for h in history[:1]], log[-3000:]
    assert history[-1]["train_images"] == 32 and history[-1]["val_images"] == 16
    print(f"node loss: {killed} processes killed; fine-tuning finished {recovered_s:.0f} s later")
    record("the worker node holding the Train workers (two-node cluster) SIGKILLed at the "
           "start of epoch 2", "jobs.finetune",
           "Ray Train restarts the worker group on the head from the epoch-1 checkpoint; the "
           "run finishes with epochs [1, 2] reported once each, all 32 train and 16 val images "
           "in the last epoch")


def test_readme_fault_table_is_the_one_these_tests_produce():
    if len(ROWS) < 8:  # a partial run of this module cannot judge the whole table
        pytest.skip("run the whole module to compare the table")
    check_readme_table("fault-table", render_table(ROWS, "fault"))
