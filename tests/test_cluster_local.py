"""A real two-node Ray cluster on loopback with token authentication, driven like
docs/CLUSTER.md's "Running on a cluster": the jobs go in through the real `ray job submit` CLI.

The head and one worker node are `ray start --block` subprocesses (each 1 logical CPU; the
worker also advertises `node_b`), started with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH
pointing at a token generated into tmp_path, so neither ~/.ray/auth_token nor any other Ray on
this machine is touched. Everything Ray writes goes under a private --temp-dir, every port is
picked free, and teardown stops only the processes this test started (never `ray stop`, which
would stop every Ray on the machine).

The test shards generated images with `python -m jobs.shard`, runs `python -m jobs.predict` with
docs/CLUSTER.md's command line (paths and address changed, `--weights none` because nothing can be
downloaded), checks the published Parquet, and proves from Ray's state API that the prediction
job's work ran on both nodes: the single predictor actor (Ray Data fuses the decode into it)
holds one node's only CPU for the whole run, so the 1-CPU read tasks can only run on the other
node. It also checks that the job API refuses requests without the token or with a wrong one.

Needs the Ray dashboard (the job API), i.e. ray[default]; skipped, saying so, without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: its `ray` and its `python`
RAY = BIN / "ray"
MARKER = "RESNET_PIPELINE_TEST_CLUSTER"  # env var tagging every process of our cluster
# Loopback addresses, one per node. Not 127.0.0.1: `ray start` replaces exactly "127.0.0.1" /
# "localhost" by the machine's routable address, and this test must stay on loopback.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


def _dashboard_missing() -> str | None:
    from ray._private.utils import get_dashboard_dependency_error

    err = get_dashboard_dependency_error()
    return None if err is None else (
        f"no Ray dashboard, so no job API for `ray job submit`: needs ray[default] ({err})")


NO_DASHBOARD = _dashboard_missing()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not RAY.exists(), reason=f"no ray CLI next to {sys.executable}"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc for cleanup"),
    pytest.mark.skipif(NO_DASHBOARD is not None, reason=str(NO_DASHBOARD)),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # free on every interface (GCS listens on all)
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# processes: start, find, stop only our own
# --------------------------------------------------------------------------------------------


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time since boot


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    return children


def _descendants(pids: list[int]) -> dict[int, str]:
    """pid -> start time of every live descendant of ``pids`` (inclusive)."""
    children, out, todo = _children_map(), {}, list(pids)
    while todo:
        pid = todo.pop()
        st = _proc_start_time(pid)
        if st is None or pid in out:
            continue
        out[pid] = st
        todo += children.get(pid, [])
    return out


def _tagged(tag: str) -> dict[int, str]:
    """Processes whose environment carries our cluster's tag (catches orphaned workers)."""
    needle = f"{MARKER}={tag}".encode()
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "environ").read_bytes().split(b"\0"):
                st = _proc_start_time(int(p.name))
                if st:
                    out[int(p.name)] = st
        except OSError:
            continue
    return out


def _alive(pid: int, start_time: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[19] == start_time and stat[0] != "Z"


def _kill_if_same(pid: int, start_time: str, sig: int) -> None:
    if _proc_start_time(pid) == start_time:  # not a recycled pid
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class Cluster:
    tag: str
    temp_dir: str
    env: dict
    token: str
    gcs_port: int = 0
    dashboard_port: int = 0
    procs: list = field(default_factory=list)  # (name, Popen, log path)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args, env=None, timeout=120, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(RAY), *map(str, args)], env=env or self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, (
                f"ray {' '.join(map(str, args))} -> {proc.returncode}\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def http(self, path: str, token: str | None = "") -> tuple[int, str]:
        """GET the dashboard; token '' = ours, None = no Authorization header."""
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def start_node(self, name: str, args: list[str], extra_env: dict | None = None) -> None:
        """``ray start --block`` a node; ``extra_env`` reaches that node's processes only."""
        log = Path(self.temp_dir) / f"{name}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen([str(RAY), "start", "--block", *args],
                                 env={**self.env, **(extra_env or {})}, cwd=ROOT,
                                 stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        self.procs.append((name, p, log))
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert p.poll() is None, f"{name} exited {p.returncode}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"{name} did not start:\n{self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        out = []
        for name, _, log in self.procs:
            text = log.read_text(errors="replace") if log.exists() else ""
            out.append(f"--- {name} ({log}) ---\n{text[-3000:]}")
        return "\n".join(out)

    def kill_node(self, name: str) -> int:
        """SIGKILL a node as a machine loss would: its `ray start`, raylet, object store, Ray
        workers and agents (every descendant of its `ray start --block`); return how many."""
        proc = next(p for n, p, _ in self.procs if n == name)
        victims = _descendants([proc.pid])
        for pid, st in victims.items():
            _kill_if_same(pid, st, signal.SIGKILL)
        proc.wait(timeout=30)
        return len(victims)

    def nodes(self) -> list[dict]:
        proc = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json",
                        "--detail")
        return [n for n in json.loads(proc.stdout) if n["state"] == "ALIVE"]

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its own Ray processes), then SIGKILL
        whatever of ours is left: descendants, their process groups, tagged orphans."""
        ours = _descendants([p.pid for _, p, _ in self.procs])
        for _, p, _ in reversed(self.procs):  # worker first, then head
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        for _, p, _ in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # start_new_session: pgid == pid, ours only
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        ours.update(_tagged(self.tag))
        for pid, st in ours.items():
            _kill_if_same(pid, st, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid, st) for pid, st in ours.items()):
            time.sleep(0.2)


@contextlib.contextmanager
def running_cluster(tmp_path: Path, head_cpus: int = 1, worker_cpus: int = 1,
                    worker_env: dict | None = None):
    """Head + worker node, token auth on; stopped (ours only) on exit, whatever happened.
    ``worker_env`` goes to the worker node's processes only (e.g. a fault armed there)."""
    from ray._private.utils import get_ray_client_dependency_error

    # Short path: Ray's unix sockets live under it (108-byte limit); unique, so ours only.
    temp_dir = tempfile.mkdtemp(prefix="rtc-", dir="/tmp")
    token_path = tmp_path / "auth_token"
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_path.write_text(token)
    token_path.chmod(0o600)
    tag = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS…
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in a job = the venv's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "PYTHONUNBUFFERED": "1",
        MARKER: tag,
    })
    env.pop("VIRTUAL_ENV", None)
    c = Cluster(tag=tag, temp_dir=temp_dir, env=env, token=token, gcs_port=free_port(),
                dashboard_port=free_port())
    common = [f"--temp-dir={temp_dir}",
              "--object-store-memory=200000000", "--min-worker-port=0", "--max-worker-port=0",
              "--disable-usage-stats"]
    try:
        head = ["--head", f"--node-ip-address={HEAD_IP}", f"--port={c.gcs_port}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={c.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={head_cpus}",
                *common]
        if get_ray_client_dependency_error() is None:  # else no client server is started
            head.append(f"--ray-client-server-port={free_port()}")  # not the default 10001
        c.start_node("head", head)
        c.start_node("worker", [
            f"--address={HEAD_IP}:{c.gcs_port}", f"--node-ip-address={WORKER_IP}",
            '--resources={"node_b": 1}', f"--num-cpus={worker_cpus}",
            f"--dashboard-agent-listen-port={free_port()}", *common], extra_env=worker_env)
        deadline = time.monotonic() + 120
        while True:  # the dashboard answers and both nodes are registered
            try:
                if c.http("/api/version")[0] == 200 and len(c.nodes()) == 2:
                    break
            except (OSError, AssertionError, ValueError):
                pass
            assert time.monotonic() < deadline, f"cluster not up:\n{c.logs()}"
            time.sleep(1)
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    with running_cluster(tmp_path) as c:
        yield c


# --------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------


def submit(c: Cluster, submission_id: str, *entrypoint: str) -> str:
    """`ray job submit` exactly as in docs/CLUSTER.md (waits, streams the logs); returns its output."""
    proc = c.ray("job", "submit", "--address", c.dashboard, "--working-dir", ROOT,
                 "--submission-id", submission_id, "--", *entrypoint, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, (
        f"job {submission_id} -> {proc.returncode}\n{out[-6000:]}\n{c.logs()}")
    return out


def test_two_node_cluster_with_token_auth(cluster, tmp_path):
    import pandas as pd

    from pipeline import sources, synthetic

    c = cluster
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
    submit(c, f"shard-{c.tag[:8]}", "python", "-m", "jobs.shard", "--source", str(images / "val"),
           "--split", "val", "--out", str(shard_dir), "--samples-per-shard", "3", "--no-progress")
    manifest = shard_dir / "val.json"
    assert json.loads(manifest.read_text())["total_samples"] == n_images

    # The README's predict command. One predictor actor of 1 CPU fills one node (1 CPU each),
    # so the 1-CPU read tasks can only run on the other node.
    predict_id = f"predict-{c.tag[:8]}"
    log = submit(c, predict_id, "python", "-m", "jobs.predict", "--data", str(manifest),
                 "--weights", "none", "--out", str(out), "--actors", "1",
                 "--cpus-per-actor", "1", "--no-progress")
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
    assert len(predictors) == 1 and predictors[0]["required_resources"].get("CPU") == 1, actors
    assert reads and work == {head, worker}, (
        f"job {job_id}: read tasks on {reads}, predictor on "
        f"{[a['node_id'] for a in predictors]}; head {head}, worker {worker}; {where}")
    assert all(where.values()), where  # and both nodes show tasks of the job


@pytest.fixture(autouse=True)
def _users_token_untouched():
    """The cluster uses its own token file: ~/.ray/auth_token is neither created nor changed."""
    path = Path.home() / ".ray" / "auth_token"
    before = path.read_bytes() if path.exists() else None
    yield
    assert (path.read_bytes() if path.exists() else None) == before, path
