"""Every job against S3: a local S3-compatible endpoint (moto's server mode) on 127.0.0.1.

The endpoint and the credentials reach the jobs through the standard environment only
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION). Every job runs
as a subprocess that joins one Ray cluster started for this module with that environment (a
`ray start` head on loopback, tests/raycluster.py: every Ray process of it has the variables, as
every node of an AWS cluster has its instance profile's credentials); Ray Data's readers and
Ray Train's storage_path resolve s3:// with pyarrow's ``from_uri`` as the jobs do. The jobs of
the storage-fault test start their own local cluster instead: the fault's variable must reach
their Ray tasks, and only a cluster started with it gives it to them.
This test process never sets the variables in its own os.environ (other tests share a Ray
cluster); the in-process tests use monkeypatch, undone after each test.

Flow: tiny image folder -> s3://BUCKET/raw -> shard train/val (+ --classes-from on S3) ->
--verify -> fine-tune with --storage-path s3://... -> resume -> predict S3 -> S3 twice ->
nightly_eval twice. Plus the storage primitives on S3 and the publish protocol crashed at
every step (object store and local disk) and rolled back by ``recover``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import storage, synthetic
from tests.test_publish import _crash_every_step

# the module fixtures (moto, a Ray head, two fine-tuning runs) count in the first test's time
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "resnet-test"
S3_HEAD_IP = "127.0.0.4"  # the module's Ray head (tests/raycluster.py uses .2 and .3)
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """The moto server: endpoint, job environment, and a pyarrow client for this process."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update(CREDS, AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
                        RAY_ADDRESS="local",  # never join someone else's cluster
                        RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=ROOT)
        self.cluster_env: dict = {}  # RAY_ADDRESS and token of the module's cluster
        self.fs = pafs.S3FileSystem(access_key="testing", secret_key="testing",
                                    region="us-east-1", endpoint_override=endpoint,
                                    allow_bucket_creation=True)

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join((BUCKET,) + parts)

    def keys(self, prefix: str) -> list[str]:
        """Every object (file) under BUCKET/prefix, relative to it."""
        base = f"{BUCKET}/{prefix}".rstrip("/")
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        except FileNotFoundError:
            return []
        return sorted(i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.fs.open_input_file(f"{BUCKET}/{key}") as f:
            return f.read()

    def job(self, name: str, *args: str, timeout: int = 300, expect: int = 0,
            env: dict | None = None, own_cluster: bool = False) -> str:
        """Run ``python -m jobs.NAME ARGS`` on the module's cluster (``own_cluster``: on a
        local cluster of its own, started with ``env``); its output; asserts its exit code."""
        cluster = {} if own_cluster else self.cluster_env
        proc = subprocess.run([sys.executable, "-m", f"jobs.{name}", *args], cwd=ROOT,
                              env={**self.env, **cluster, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == expect, f"jobs.{name} {' '.join(args)} -> {proc.returncode}\n" \
                                          f"{out[-4000:]}"
        return out


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.moto_s3_server", "127.0.0.1",
                             str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    cluster = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not come up "
                                       f"(exit {proc.poll()}); see {log.name}")
                time.sleep(0.2)
        server = S3(endpoint)
        server.fs.create_dir(BUCKET)  # the jobs never create buckets (pyarrow's default)
        from tests import raycluster

        cluster = raycluster.start_head(
            tmp_path_factory.mktemp("s3-cluster"), ip=S3_HEAD_IP, dashboard=False,
            env={k: v for k, v in server.env.items()
                 if k.startswith("AWS_") or k == "PYTHONPATH"})
        server.cluster_env = {"RAY_ADDRESS": cluster.address,
                              **{k: v for k, v in cluster.env.items()
                                 if k.startswith("RAY_AUTH_")}}
        yield server
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The job environment in this process too, for one test (monkeypatch undoes it)."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k in list(CREDS) + ["AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED"]:
        monkeypatch.setenv(k, s3.env[k])
    return s3


# --- the storage layer on S3 -------------------------------------------------------------------

def test_storage_primitives_on_s3(s3_env):
    s3 = s3_env
    base = s3.uri("prims")
    assert not storage.exists(base) and not storage.is_dir(base)
    storage.makedirs(storage.join(base, "empty"))  # pyarrow's "empty/" marker: a folder now
    assert storage.is_dir(storage.join(base, "empty"))
    storage.write_text_atomic(storage.join(base, "a", "b", "c.txt"), "hi")
    # no marker objects for the parents of a written key, yet they are folders
    assert s3.keys("prims") == ["a/b/c.txt"]
    assert storage.exists(storage.join(base, "a")) and storage.is_dir(storage.join(base, "a"))
    assert storage.size(storage.join(base, "a", "b", "c.txt")) == 2
    assert storage.read_text(storage.join(base, "a", "b", "c.txt")) == "hi"
    assert sorted(storage.list_files(base)) == [("a/b/c.txt", 2)]
    assert sorted(storage.list_files(base + "/")) == [("a/b/c.txt", 2)]
    storage.check_writable(storage.join(base, "out"))
    assert not [k for k in s3.keys("prims") if "write-probe" in k]
    with pytest.raises(PermissionError, match="cannot be written"):
        storage.check_writable("s3://no-such-bucket-here/out")
    # move_tree: a whole prefix, and a single object
    storage.write_bytes_atomic(storage.join(base, "a", "d.bin"), b"\0" * 10)
    assert storage.move_tree(storage.join(base, "a"), storage.join(base, "z")) == "copy"
    assert not storage.exists(storage.join(base, "a"))
    assert sorted(storage.list_files(storage.join(base, "z"))) == [("b/c.txt", 2), ("d.bin", 10)]
    storage.move_tree(storage.join(base, "z", "d.bin"), storage.join(base, "d.bin"))
    assert storage.exists(storage.join(base, "d.bin"))
    assert not storage.exists(storage.join(base, "z", "d.bin"))
    storage.move_tree(storage.join(base, "empty"), storage.join(base, "empty2"))
    assert storage.is_dir(storage.join(base, "empty2"))
    with pytest.raises(FileNotFoundError):
        storage.move_tree(storage.join(base, "nothing"), storage.join(base, "x"))
    storage.delete_dir(base)
    assert not storage.exists(base) and s3.keys("prims") == []


# --- the publish protocol crashed at every step (the protocol and its local test: test_publish.py)

def test_publish_crashed_at_every_step_on_s3_is_rolled_back(s3_env, monkeypatch):
    # recover crashed at each of its steps after two of the publish crashes (moto is slow): with
    # today's order of steps, 5 = an old object in both places, 14 = half the new set in OUT
    old, new = _crash_every_step(s3_env.uri("crash"), monkeypatch, local=False,
                                 nested=lambda n: n in (5, 14))
    assert old > 10 and new >= 2  # rolled back mid-move, finished after the _SUCCESS switch


# --- every job against the bucket --------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(s3, tmp_path_factory):
    """Raw images uploaded to s3://BUCKET/raw, sharded by the job into s3://BUCKET/shards."""
    local = tmp_path_factory.mktemp("raw")
    # 8 train per class: 12 per worker, batches of 8 + 4 (a last training batch of 1 image
    # would fail BatchNorm)
    counts = synthetic.generate_image_folder(str(local), {"train": 8, "val": 3}, num_classes=3,
                                             seed=3, size_range=(64, 96))
    pafs.copy_files(str(local), f"{BUCKET}/raw", destination_filesystem=s3.fs)
    assert len(s3.keys("raw")) == sum(counts.values()) == 33
    shards_uri = s3.uri("shards")
    out = s3.job("shard", "--source", s3.uri("raw", "train"), "--split", "train", "--out",
                 shards_uri, "--samples-per-shard", "8", "--no-progress")
    assert "24 samples in 3 shards" in out
    out = s3.job("shard", "--source", s3.uri("raw", "val"), "--split", "val", "--out",
                 shards_uri, "--classes-from", s3.uri("shards", "train.json"),
                 "--samples-per-shard", "5", "--no-progress")
    assert "9 samples in 2 shards" in out
    return shards_uri


def test_shard_from_and_into_the_bucket_verifies(s3, sharded):
    keys = s3.keys("shards")
    assert {"train.json", "val.json", "train-000000.tar", "train-000002.tar",
            "val-000001.tar"} <= set(keys)
    assert not [k for k in keys if ".tmp" in k or "write-probe" in k]  # one PUT per shard
    train = json.loads(s3.read("shards/train.json"))
    val = json.loads(s3.read("shards/val.json"))
    assert train["source"] == s3.uri("raw", "train") and train["skipped"] == []
    assert val["classes"] == train["classes"] and val["total_samples"] == 9
    for split in ("train", "val"):
        out = s3.job("shard", "--verify", storage.join(sharded, f"{split}.json"))
        assert "OK: 0 bad shard(s)" in out
    # a rerun reuses every intact shard (the per-shard records are on S3 as well)
    out = s3.job("shard", "--source", s3.uri("raw", "val"), "--split", "val", "--out", sharded,
                 "--classes-from", s3.uri("shards", "train.json"), "--samples-per-shard", "5",
                 "--no-progress")
    assert "(2 reused)" in out


@pytest.fixture(scope="module")
def trained(s3, sharded):
    args = ["--train", storage.join(sharded, "train.json"), "--val",
            storage.join(sharded, "val.json"), "--storage-path", s3.uri("runs"), "--name", "t",
            "--num-workers", "2", "--cpus-per-worker", "0.5", "--threads", "1",
            "--crop-size", "32", "--batch-size", "8", "--weights", "none"]
    first = s3.job("finetune", *args, "--epochs", "1", timeout=400)
    first_ckpts = _checkpoint_epochs(s3)
    second = s3.job("finetune", *args, "--epochs", "2", timeout=400)
    return first, first_ckpts, second


def _checkpoint_epochs(s3) -> dict[str, int]:
    """{checkpoint folder: epoch} from Ray Train's own record on S3 (each folder holding our
    state.pt); reading the ~90 MB states through moto would cost more than the training."""
    snapshot = json.loads(s3.read("runs/t/checkpoint_manager_snapshot.json"))
    keys = set(s3.keys("runs/t"))
    epochs = {r["checkpoint_dir_name"]: r["metrics"]["epoch"]
              for r in snapshot["checkpoint_results"]}
    assert all(f"{d}/state.pt" in keys for d in epochs), sorted(keys)
    return epochs


def test_finetune_checkpoints_to_the_bucket_and_resumes(s3, trained):
    first, first_ckpts, second = trained
    # once: Ray Train's print patch used to print each epoch line twice
    assert first.count("epoch 1/1:") == 1
    assert json.loads(_last_json(first))["epochs_trained"] == 1
    assert sorted(first_ckpts.values()) == [0]
    # the rerun resumed from the S3 checkpoint: it trained epoch 2 only
    assert "epoch 2/2" in second and "epoch 1/2" not in second
    last = json.loads(_last_json(second))
    assert last == {**last, "epochs_trained": 2, "model": s3.uri("runs", "t", "model.pt")}
    ckpts = _checkpoint_epochs(s3)
    assert sorted(ckpts.values()) == [0, 1] and set(first_ckpts) < set(ckpts)
    keys = s3.keys("runs/t")
    assert "config.json" in keys and "model.pt" in keys
    assert json.loads(s3.read("runs/t/config.json"))["epochs"] == 2


def _last_json(text: str) -> str:
    start = text.rindex('{\n "epochs_trained"')
    return text[start:text.index("}", start) + 1]


def _read_predictions(s3, prefix: str):
    table = pads.dataset(f"{BUCKET}/{prefix}/predictions", filesystem=s3.fs,
                         format="parquet").to_table()
    return table.to_pandas()


def test_predict_from_and_into_the_bucket_and_rerun(s3, sharded, trained):
    args = ["--data", storage.join(sharded, "val.json"), "--weights",
            s3.uri("runs", "t", "model.pt"), "--out", s3.uri("eval"), "--batch-size", "8",
            "--no-progress"]
    s3.job("predict", *args)
    first_run = s3.read("eval/_SUCCESS").decode().strip()
    df = _read_predictions(s3, "eval")
    assert len(df) == df["key"].nunique() == 9
    summary = json.loads(s3.read("eval/summary.json"))
    assert summary["samples"] == 9 and summary["run_id"] == first_run
    assert summary["weights_sha256"]  # weights read from S3 are hashed like local ones
    assert summary["model_id"] == "resnet18-finetuned/t/epoch1"  # the resumed run's model
    assert pq.read_table(io.BytesIO(s3.read("eval/failures.parquet"))).num_rows == 0
    s3.job("predict", *args)  # rerun into the same --out: replaced, not appended
    second_run = s3.read("eval/_SUCCESS").decode().strip()
    assert second_run != first_run
    df = _read_predictions(s3, "eval")
    assert len(df) == df["key"].nunique() == 9
    assert json.loads(s3.read("eval/summary.json"))["run_id"] == second_run
    keys = s3.keys("eval")
    assert not [k for k in keys if k.startswith(("_previous", "_staging-"))], keys
    assert sorted(k for k in keys if not k.startswith("predictions/")) == [
        "_SUCCESS", "failures.parquet", "summary.json"]


def test_nightly_eval_twice_against_the_bucket(s3, sharded, trained):
    args = ["--data", storage.join(sharded, "val.json"), "--weights",
            s3.uri("runs", "t", "model.pt"), "--history", s3.uri("nightly"), "--batch-size", "8"]
    s3.job("nightly_eval", *args)
    out = s3.job("nightly_eval", *args)
    assert "verdict:" in out
    files = sorted(k for k in s3.keys("nightly/history") if k.endswith(".parquet"))
    assert len(files) == 2  # one file per run and set, each written once
    history = pd.concat([pq.read_table(io.BytesIO(s3.read(f"nightly/history/{f}"))).to_pandas()
                         for f in files]).sort_values("date", kind="stable")
    assert len(history) == 2 and history["run_id"].nunique() == 2
    assert history["verdict"].iloc[0] == "first run"
    assert history["previous_run_id"].iloc[1] == history["run_id"].iloc[0]
    for run_dir in history["predictions_dir"]:
        assert run_dir.startswith(s3.uri("nightly", "runs"))
        rel = run_dir[len(f"s3://{BUCKET}/"):]
        assert len(_read_predictions(s3, rel)) == 9
        assert {"_SUCCESS", "summary.json"} <= set(s3.keys(rel))
        assert {"nightly.json", "report.html"} <= set(s3.keys(rel.rsplit("/", 1)[0]))
    assert "latest.html" in s3.keys("nightly")


# --- the output lease on S3: conditional writes (If-None-Match / If-Match) ---------------------

def test_the_output_lease_on_s3_admits_one_run(s3_env):
    from pipeline import lease as leaselib
    from tests.test_lease import _race

    s3 = s3_env
    out = s3.uri("leased")
    first = leaselib.Lease(out, "first-run", seconds=30)
    assert isinstance(first.backend, leaselib._S3Backend)  # not the best-effort fallback
    with first:
        assert s3.keys("leased") == ["_LEASE"]
        with pytest.raises(leaselib.LeaseHeld, match="run first-run on host"):
            leaselib.Lease(out, "second-run", seconds=30).acquire()
        # another writer overwrites the lease (a taker after a long pause): noticed, not deleted
        storage.write_text_atomic(storage.join(out, "_LEASE"), json.dumps(
            {"run_id": "thief", "host": "h", "pid": 1, "process": "", "started": 0,
             "expires": time.time() + 60}))
        with pytest.raises(leaselib.LeaseLost, match="now held by run thief"):
            first.check()
    assert leaselib.read_holder(out).run_id == "thief"
    storage.delete_file(storage.join(out, "_LEASE"))
    for state in ("empty", "expired"):  # 8 runs at once: the store admits exactly one
        for round_ in range(4):
            prefix = f"race-{state}-{round_}"
            if state == "expired":
                storage.write_text_atomic(s3.uri(prefix, "_LEASE"), json.dumps(
                    {"run_id": "crashed", "host": "h", "pid": 1, "process": "", "started": 0,
                     "expires": time.time() - 5}))
            winners = _race(s3.uri(prefix))
            assert len(winners) == 1, (state, round_, [w.run_id for w in winners])
            assert leaselib.read_holder(s3.uri(prefix)).run_id == winners[0].run_id
            winners[0].release()
            assert s3.keys(prefix) == []


# --- an object store that fails a share of its requests (faults.storage_filesystem) ------------

def _faults(log, **kw) -> str:
    return ",".join([f"{k}={v}" for k, v in kw.items()] + [f"log={log}"])


def _published(s3, prefix: str) -> tuple[str, int]:
    """(the run id in _SUCCESS, rows) of the set published under prefix; checks it is whole:
    every item there, one row per image, the summary of the same run, no _previous."""
    run_id = s3.read(f"{prefix}/_SUCCESS").decode().strip()
    df = _read_predictions(s3, prefix)
    assert len(df) == df["key"].nunique() == 9
    assert json.loads(s3.read(f"{prefix}/summary.json"))["run_id"] == run_id
    assert pq.read_table(io.BytesIO(s3.read(f"{prefix}/failures.parquet"))).num_rows == 0
    assert not [k for k in s3.keys(prefix) if k.startswith(("_previous", "_LEASE"))]
    return run_id, len(df)


@pytest.mark.timeout(1500)  # two jobs starting their own local Ray
def test_jobs_on_a_store_that_fails_requests_retry_or_keep_the_old_set(s3, sharded, tmp_path,
                                                                        monkeypatch):
    from pipeline import faults, publish

    log = tmp_path / "injected.log"
    # shard: one call in 10 fails (in the driver and in the Ray tasks): retried, same shards
    flaky = {faults.STORAGE_FAULTS: _faults(log, rate=0.1, seed=1)}
    s3.job("shard", "--source", s3.uri("raw", "val"), "--split", "val", "--out",
           s3.uri("flaky-shards"), "--classes-from", s3.uri("shards", "train.json"),
           "--samples-per-shard", "5", "--no-progress", env=flaky, own_cluster=True)
    shard_faults = log.read_text().count("injected storage fault") if log.exists() else 0
    assert shard_faults > 0  # the faults really happened
    ours, clean = (json.loads(s3.read(f"{p}/val.json"))["shards"] for p in ("flaky-shards",
                                                                             "shards"))
    assert [r["sha256"] for r in ours] == [r["sha256"] for r in clean]
    # predict with one call in 10 failing: retried, published whole
    args = ["--data", storage.join(sharded, "val.json"), "--weights", "none", "--out",
            s3.uri("flaky-eval"), "--batch-size", "8", "--no-progress"]
    out = s3.job("predict", *args, env=flaky, own_cluster=True)
    new_run, _ = _published(s3, "flaky-eval")
    predict_faults = log.read_text().count("injected storage fault") - shard_faults
    assert predict_faults > 0 and "retrying in" in out
    # every copy after the publish's first fails (the store refuses them for good): the old
    # set is half moved out and cannot be moved back; a clear error, nothing of the run
    # published, and the next run's recover makes the set before it whole again
    # (the publish's copies are the driver's: this one runs on the module's cluster)
    out = s3.job("predict", *args, expect=1,
                 env={faults.STORAGE_FAULTS: _faults(log, rate=1.0, ops="copy_file", after=1)})
    error = out.strip().splitlines()[-1]
    assert error.startswith(f"error: publishing into {s3.uri('flaky-eval')} failed") and \
        "rolling it back failed too" in error and "restores the previous set" in error, out[-3000:]
    assert "_SUCCESS" not in s3.keys("flaky-eval")  # no reader trusts the folder meanwhile
    for k, v in s3.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    publish.recover(s3.uri("flaky-eval"))  # what the next run into --out does first
    assert _published(s3, "flaky-eval")[0] == new_run
