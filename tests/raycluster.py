"""A real Ray cluster on loopback for the tests: `ray start --block` nodes with token
authentication, as docs/CLUSTER.md runs one, started once per test session and shared.

The head (2 logical CPUs, the dashboard's job API on 127.0.0.1) is started once, by the first
test that asks for it (``conftest.loopback_cluster``); each test then starts the worker node it
needs (``start_worker``: its CPUs, an environment for that node's processes only, e.g. a fault
armed there) and the fixture stops it after the test. Each node is a ``ray start --block``
subprocess started with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH pointing at a token
generated for the session, so neither ~/.ray/auth_token nor any other Ray on this machine is
touched. Everything Ray writes goes under a private --temp-dir, every port is picked free, and
stopping kills only the processes this session started (never `ray stop`, which would stop
every Ray on the machine).

The head checks its nodes every second and calls one dead after 5 missed checks (Ray's
defaults: every 3 s, 5 misses, after a 5 s initial delay), so a SIGKILLed node is noticed in
~5 s instead of ~20: the node-loss tests wait for that, and nothing else changes.
"""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: its `ray` and its `python`
RAY = BIN / "ray"
MARKER = "RESNET_PIPELINE_TEST_CLUSTER"  # env var tagging every process of our cluster
# Loopback addresses, one per node. Not 127.0.0.1: `ray start` replaces exactly "127.0.0.1" /
# "localhost" by the machine's routable address, and the tests must stay on loopback.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
HEAD_CPUS = 2
# GCS health checks of the nodes (Ray system config, read from RAY_<name> by the head)
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000",
                      "RAY_health_check_period_ms": "1000",
                      "RAY_health_check_timeout_ms": "5000",
                      "RAY_health_check_failure_threshold": "5"}


def dashboard_missing() -> str | None:
    """Why there is no job API (ray[default] missing), or None."""
    from ray._private.utils import get_dashboard_dependency_error

    err = get_dashboard_dependency_error()
    return None if err is None else (
        f"no Ray dashboard, so no job API for `ray job submit`: needs ray[default] ({err})")


def unavailable() -> str | None:
    """Why no loopback cluster can run here (a skip reason), or None."""
    if not RAY.exists():
        return f"no ray CLI next to {sys.executable}"
    if not sys.platform.startswith("linux"):
        return "uses /proc for cleanup"
    return dashboard_missing()


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


def _tagged(needle: bytes) -> dict[int, str]:
    """Processes whose environment carries ``needle`` (catches orphaned workers)."""
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


def _kill_all(victims: dict[int, str], timeout: float = 15.0) -> None:
    """SIGKILL ``victims`` and wait until they are gone."""
    for pid, st in victims.items():
        _kill_if_same(pid, st, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in victims.items()):
        time.sleep(0.1)


@dataclass
class Cluster:
    tag: str
    temp_dir: str
    env: dict
    token: str
    gcs_port: int = 0
    dashboard_port: int = 0
    address: str = ""  # the GCS address a driver joins with (RAY_ADDRESS)
    procs: list = field(default_factory=list)  # (name, Popen, log path)

    @staticmethod
    def job_id(prefix: str) -> str:
        """A submission id no other test's job on the shared cluster has."""
        return f"{prefix}-{secrets.token_hex(4)}"

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
        log = Path(self.temp_dir) / f"{name}-{len(self.procs)}.log"
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

    def start_worker(self, cpus: int, env: dict | None = None) -> None:
        """Start the worker node (``cpus`` logical CPUs, resource ``node_b``; ``env`` for its
        processes only) and wait until the head lists it with the head alone beside it."""
        assert not self.has("worker"), "a worker node is already running"
        self.start_node("worker", [
            f"--address={self.address}", f"--node-ip-address={WORKER_IP}",
            '--resources={"node_b": 1}', f"--num-cpus={cpus}",
            f"--dashboard-agent-listen-port={free_port()}",
            *self.common_args(os.path.join(self.temp_dir, f"w{len(self.procs)}"))],
            extra_env=env)
        self.wait_for_nodes(2)

    def common_args(self, temp_dir: str | None = None) -> list[str]:
        """Each node's own ``--temp-dir`` (the head's ``temp_dir``; each worker a fresh one
        beneath it), as on separate machines. Nodes sharing one share ``runtime_resources``, and
        Ray 2.60's working_dir plugin unpacks a job's package with ``overwrite=True`` (``rmtree``
        first): the worker node's first task of a job deleted the files under the head's running
        driver (a CI run: ``[Errno 2] No such file or directory: .../pipeline/data.py``)."""
        return [f"--temp-dir={temp_dir or self.temp_dir}", "--object-store-memory=200000000",
                "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]

    def has(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p, _ in self.procs)

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        """Until the dashboard answers and exactly ``count`` nodes are alive."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.http("/api/version")[0] == 200 and len(self.nodes()) == count:
                    return
            except (OSError, AssertionError, ValueError):
                pass
            assert time.monotonic() < deadline, f"not {count} nodes alive:\n{self.logs()}"
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
        proc = next(p for n, p, _ in self.procs if n == name and p.poll() is None)
        victims = _descendants([proc.pid])
        _kill_all(victims)
        proc.wait(timeout=30)
        return len(victims)

    def stop_worker(self) -> None:
        """Take the worker node away (killed: nothing of the test that used it is kept) and
        wait until the head no longer lists it, so the next test starts from the head alone."""
        if self.has("worker"):
            self.kill_node("worker")
        self.wait_for_nodes(1)

    def nodes(self) -> list[dict]:
        proc = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json",
                        "--detail")
        return [n for n in json.loads(proc.stdout) if n["state"] == "ALIVE"]

    def stop(self) -> None:
        """Kill every process of ours: the nodes' descendants, their process groups, tagged
        orphans. (SIGTERM to `ray start --block` took ~30 s a node on 2 cores, and nothing of
        a test cluster needs a clean shutdown: its temp dir is removed after.)"""
        ours = _descendants([p.pid for _, p, _ in self.procs if p.poll() is None])
        for _, p, _ in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # start_new_session: pgid == pid, ours only
            except (ProcessLookupError, PermissionError):
                pass
        ours.update(_tagged(f"{MARKER}={self.tag}".encode()))
        _kill_all(ours)
        for _, p, _ in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def start_head(token_dir: Path, ip: str = HEAD_IP, cpus: int = HEAD_CPUS,
               env: dict | None = None, dashboard: bool = True) -> Cluster:
    """A head node on loopback address ``ip`` (``cpus`` CPUs, token auth on, fast node health
    checks; with ``dashboard``, the dashboard and job API on 127.0.0.1); ``env`` reaches every
    process of the cluster (its Ray workers: a store's credentials, as an instance profile
    gives them on AWS). ``Cluster.stop`` ends it."""
    from ray._private.utils import get_ray_client_dependency_error

    # Short path: Ray's unix sockets live under it (108-byte limit); unique, so ours only.
    temp_dir = tempfile.mkdtemp(prefix="rtc-", dir="/tmp")
    token_path = token_dir / "auth_token"
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_path.write_text(token)
    token_path.chmod(0o600)
    tag = secrets.token_hex(16)
    extra = env
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
    env.update(extra or {})
    c = Cluster(tag=tag, temp_dir=temp_dir, env=env, token=token, gcs_port=free_port(),
                dashboard_port=free_port())
    head = ["--head", f"--node-ip-address={ip}", f"--port={c.gcs_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={cpus}",
            *c.common_args()]
    if dashboard:
        head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={c.dashboard_port}"]
    else:
        head.append("--include-dashboard=false")
    if get_ray_client_dependency_error() is None:  # else no client server is started
        head.append(f"--ray-client-server-port={free_port()}")  # not the default 10001
    c.address = f"{ip}:{c.gcs_port}"
    try:
        c.start_node("head", head, extra_env=FAST_HEALTH_CHECKS)
        if dashboard:
            c.wait_for_nodes(1)
    except BaseException:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return c


def submit(c: Cluster, submission_id: str, *entrypoint: str) -> str:
    """`ray job submit` exactly as in docs/CLUSTER.md (waits, streams the logs); returns its
    output."""
    proc = c.ray("job", "submit", "--address", c.dashboard, "--working-dir", ROOT,
                 "--submission-id", submission_id, "--", *entrypoint, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, (
        f"job {submission_id} -> {proc.returncode}\n{out[-6000:]}\n{c.logs()}")
    return out
