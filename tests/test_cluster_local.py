"""A real two-node Ray cluster on loopback with token authentication, driven like
docs/CLUSTER.md's "Running on a cluster": the jobs go in through the real `ray job submit` CLI.

The cluster is the session's (tests/raycluster.py: the head started once, 2 logical CPUs, with
the job API on 127.0.0.1); this test adds a worker node of 1 logical CPU that also advertises
`node_b`. RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH point at a token generated for the
session, so neither ~/.ray/auth_token nor any other Ray on this machine is touched.

The test shards generated images with `python -m jobs.shard`, runs `python -m jobs.predict` with
docs/CLUSTER.md's command line (paths and address changed, `--weights none` because nothing can be
downloaded, and one predictor actor of 2 CPUs), checks the published Parquet, and proves from
Ray's state API that the prediction job's work ran on both nodes: the single predictor actor
holds all of the head's CPUs for the whole run, so the read tasks can only run on the worker
node. It also checks that the job API refuses requests without the token or with a wrong one.

Needs the Ray dashboard (the job API), i.e. ray[default]; skipped, saying so, without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests import raycluster
from tests.raycluster import submit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(raycluster.unavailable() is not None,
                       reason=str(raycluster.unavailable())),
]


@pytest.mark.timeout(1200)
def test_two_node_cluster_with_token_auth(loopback_cluster, tmp_path):
    import pandas as pd

    from pipeline import sources, synthetic

    c = loopback_cluster
    c.start_worker(cpus=1)
    nodes = c.nodes()
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker = next(n["node_id"] for n in nodes if "node_b" in n["resources_total"])
    assert head != worker

    # Token auth is on: no token -> 401, a wrong one -> 403, ours -> 200; the CLI likewise.
    assert c.http("/api/jobs/", token=None)[0] == 401
    assert c.http("/api/jobs/", token="0" * 64)[0] == 403
    assert c.http("/api/jobs/")[0] == 200
    no_token = {k: v for k, v in c.env.items() if not k.startswith("RAY_AUTH_")}
    wrong = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    for env in ({**no_token, "RAY_AUTH_MODE": "disabled"}, wrong):
        proc = c.ray("job", "list", "--address", c.dashboard, env=env, timeout=60, check=False)
        assert proc.returncode != 0, proc.stdout + proc.stderr
    c.ray("job", "list", "--address", c.dashboard, timeout=60)

    # Tiny data; sharded by the project's shard job on the cluster.
    images = tmp_path / "images"
    synthetic.generate_image_folder(str(images), {"val": 3}, num_classes=3, seed=7,
                                    size_range=(48, 96))
    n_images = len(sources.scan_source(str(images / "val"), "val").items)
    assert n_images == 9
    shard_dir, out = tmp_path / "shards", tmp_path / "eval"
    submit(c, c.job_id("shard"), "python", "-m", "jobs.shard", "--source", str(images / "val"),
           "--split", "val", "--out", str(shard_dir), "--samples-per-shard", "3", "--no-progress")
    manifest = shard_dir / "val.json"
    assert json.loads(manifest.read_text())["total_samples"] == n_images

    # The README's predict command. One predictor actor of 2 CPUs fills the head (2 CPUs), so
    # the 1-CPU read tasks can only run on the worker node (1 CPU).
    predict_id = c.job_id("predict")
    log = submit(c, predict_id, "python", "-m", "jobs.predict", "--data", str(manifest),
                 "--weights", "none", "--out", str(out), "--actors", "1",
                 "--cpus-per-actor", str(raycluster.HEAD_CPUS), "--no-progress")
    assert "images/s overall" in log

    df = pd.read_parquet(out / "predictions")
    assert len(df) == n_images and df["key"].is_unique
    assert {"key", "label", "pred", "pred_name", "topk_index", "topk_prob"} <= set(df.columns)
    assert (out / "_SUCCESS").read_text().strip()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["manifest_samples"] == n_images and summary["failures"] == 0
    assert not list(out.glob("_staging-*"))

    # Where did the prediction job's work run? Ray's state API, through the CLI, by job id.
    status, body = c.http(f"/api/jobs/{predict_id}")
    assert status == 200, body
    job_id = json.loads(body)["job_id"]

    def state(kind: str) -> list[dict]:
        return json.loads(c.ray("list", kind, "--address", c.dashboard, "--filter",
                                f"job_id={job_id}", "--detail", "--format", "json",
                                "--limit", "10000").stdout)

    deadline = time.monotonic() + 60
    while True:  # task events reach the GCS a second or so after the tasks ran
        tasks, actors = state("tasks"), state("actors")
        reads = {t["node_id"] for t in tasks if t["name"].startswith("Read") and t["node_id"]}
        predictors = [a for a in actors if "Predictor" in (a["class_name"] or "")]
        work = reads | {a["node_id"] for a in predictors}
        if work == {head, worker} or time.monotonic() > deadline:
            break
        time.sleep(2)
    where = {n: sorted({t["name"] for t in tasks if t["node_id"] == n}) for n in (head, worker)}
    assert len(predictors) == 1 and \
        predictors[0]["required_resources"].get("CPU") == raycluster.HEAD_CPUS, actors
    assert reads and work == {head, worker}, (
        f"job {job_id}: read tasks on {reads}, predictor on "
        f"{[a['node_id'] for a in predictors]}; head {head}, worker {worker}; {where}")
    assert all(where.values()), where  # and both nodes show tasks of the job

    # Each node unpacked the job's working_dir in a runtime_resources of its own, as separate
    # machines do (a shared one let the worker node's unpack delete the head driver's files).
    unpacked = {p.parents[5].name for p in Path(c.temp_dir).glob(
        "**/session_*/runtime_resources/working_dir_files/_ray_pkg_*/pipeline/data.py")}
    assert len(unpacked) == 2 and Path(c.temp_dir).name in unpacked, unpacked


@pytest.fixture(autouse=True)
def _users_token_untouched():
    """The cluster uses its own token file: ~/.ray/auth_token is neither created nor changed."""
    path = Path.home() / ".ray" / "auth_token"
    before = path.read_bytes() if path.exists() else None
    yield
    assert (path.read_bytes() if path.exists() else None) == before, path


def _job(c, *args, max_seconds: float) -> tuple[int, str, float]:
    """``python -m jobs...`` as a driver joined to the session's cluster through RAY_ADDRESS
    (a cluster that may grow, as jobs submitted to cluster.yaml's are): exit code, output and
    seconds taken."""
    import subprocess
    import sys

    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", *map(str, args)],
                          env={**c.env, "RAY_ADDRESS": c.address}, cwd=raycluster.ROOT,
                          capture_output=True, text=True, timeout=max_seconds)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


@pytest.mark.timeout(900)
def test_plans_the_cluster_cannot_hold_stop_after_max_wait(loopback_cluster, tmp_path):
    """Issue 37: on a cluster joined through RAY_ADDRESS a plan is accepted and waits for the
    autoscaler, but at most --max-wait: a GPU plan on this CPU-only cluster (the pre-flight wait
    for the cluster's resources), and a Train worker group of 3 CPUs on two nodes of 2 (enough
    CPUs in all, no node to place it: Ray Train's own group-start retries, bounded through
    FailureConfig.controller_failure_limit). Both exit 7 naming what they waited for."""
    from pipeline import synthetic

    c = loopback_cluster
    c.start_worker(cpus=2)
    c.wait_for_nodes(2)
    images, shard_dir = tmp_path / "images", tmp_path / "shards"
    synthetic.generate_image_folder(str(images), {"train": 4, "val": 2}, num_classes=2, seed=3,
                                    size_range=(48, 64))
    for split in ("train", "val"):
        code, log, _ = _job(c, "jobs.shard", "--source", images / split, "--split", split,
                            "--out", shard_dir, "--no-progress", max_seconds=300)
        assert code == 0, log[-3000:]

    code, log, took = _job(c, "jobs.predict", "--data", shard_dir / "val.json", "--weights",
                           "none", "--out", tmp_path / "eval", "--use-gpu", "--max-wait", "8s",
                           max_seconds=300)
    assert code == 7, log[-3000:]
    assert "1 GPU short" in log and "--max-wait 8s" in log and "nothing written" in log, log
    assert "waiting for resources:" in log  # said what it waits for, before giving up
    assert not (tmp_path / "eval").exists()

    code, log, took = _job(c, "jobs.finetune", "--train", shard_dir / "train.json", "--val",
                           shard_dir / "val.json", "--weights", "none", "--epochs", "1",
                           "--num-workers", "1", "--cpus-per-worker", "3", "--max-wait", "20s",
                           "--storage-path", tmp_path / "runs", "--name", "t",
                           max_seconds=400)
    assert code == 7, log[-4000:]
    assert "could not start the worker group" in log and "--max-wait 20s" in log, log[-3000:]
    print(f"finetune with a worker group no node can hold stopped after {took:.0f} s")
