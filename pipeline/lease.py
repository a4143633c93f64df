"""One publisher per output folder: a lease in ``OUT/_LEASE`` (contract 3 in docs/DESIGN.md).

A prediction run takes the lease before it touches OUT (before ``publish.recover`` and the
staging folder), renews it from a background thread while it lives, checks it right before the
publish switch, and releases it at the end, also when it fails. The lease is one small JSON
object: the holder's run id, host, process id and identity, start time, and expiry (Unix
seconds, UTC). A second run into the same OUT finds it and stops at once (``LeaseHeld``, exit 1,
one line naming the holder). A lease whose expiry has passed, or whose holder is known dead (a
process on this very machine and pid namespace that no longer exists), is taken over, with a
log line naming the run it came from.

How "only one can take it" is made true depends on where OUT is:

* local disk (and NFS, where ``link`` is atomic): the lease is a generation ``_LEASE.<n>``,
  written to a private temporary file and hard-linked into place; ``link`` fails when the name
  exists, so of two creators exactly one wins. Taking over an expired generation n means
  creating n + 1, so of two takers exactly one wins too; the highest generation holds.
* S3 (``s3://``, with boto3): create-only and compare-and-swap writes, ``PutObject`` with
  ``If-None-Match: *`` to create and ``If-Match: <ETag>`` to renew or take over, and
  ``DeleteObject`` with ``If-Match`` to release: the store itself refuses a second holder.
* any other object store (GCS through pyarrow, an S3 store that refuses conditional requests):
  no create-only write is available, so the lease is written, read back after
  ``SETTLE_SECONDS``, and kept only if it is still ours. Two runs that start within that
  window can both believe they hold it; the holder's renewals and the check before the switch
  catch a lease another run overwrote, but not every interleaving. Best effort, said so in a
  warning.

A holder that cannot renew for a whole lease period (a stopped process, storage down) can lose
the lease to a taker; it learns so at its next renewal or at the check before the switch
(``LeaseLost``), and publishes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid

from pipeline import storage
from pipeline.errors import InputError, PipelineError

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE"  # OUT/_LEASE.<generation> on local disks, OUT/_LEASE on object stores
DEFAULT_SECONDS = 60.0  # lease period; renewed every third of it
SETTLE_SECONDS = 1.0  # read-back delay on stores without conditional writes


class LeaseHeld(PipelineError):
    """Another live run holds the lease on this output folder (exit 1)."""


class LeaseLost(PipelineError):
    """This run's lease was taken over or could not be renewed: it must not publish (exit 1)."""


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _process_identity(pid: int) -> str | None:
    """'<boot id>/<pid namespace>/<start time>' of process ``pid`` on this machine, or None
    when it does not exist (or this is no Linux). Two processes with the same pid on one
    machine (recycled pids, other containers) have different identities."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if stat[0] == "Z":  # a zombie has ended
        return None
    return f"{boot}/{ns}/{stat[19]}"


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lease says about the run holding it; times in Unix seconds (UTC)."""
    run_id: str
    host: str
    pid: int
    process: str  # _process_identity of the holder, "" where unknown
    started: float
    expires: float

    def describe(self) -> str:
        """One phrase naming the holder, for error and log lines."""
        return (f"run {self.run_id} on host {self.host} (pid {self.pid}), started "
                f"{_iso(self.started)}, lease expires {_iso(self.expires)}")

    def dead_reason(self, now: float) -> str:
        """Why this lease may be taken over ("" while its holder may still be alive): it
        expired, or its process, on this machine and pid namespace, has ended."""
        if now >= self.expires:
            return f"it expired at {_iso(self.expires)}"
        if (self.host == socket.gethostname() and self.process
                and self.process.rsplit("/", 1)[0] == (_process_identity(os.getpid()) or "")
                .rsplit("/", 1)[0] and _process_identity(self.pid) != self.process):
            return f"its process {self.pid} on this machine has ended"
        return ""

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> "Holder":
        """Parse a lease; one that cannot be parsed (a torn or foreign file) counts as expired."""
        try:
            d = json.loads(data)
            return cls(str(d["run_id"]), str(d["host"]), int(d["pid"]), str(d["process"]),
                       float(d["started"]), float(d["expires"]))
        except (ValueError, KeyError, TypeError):
            return cls("(unreadable lease)", "?", -1, "", 0.0, 0.0)


# --------------------------------------------------------------------------------- backends
# Each: create(body) -> token | None (None: the name exists), read() -> (body, token) | None,
# swap(token, body) -> token | None (compare-and-swap; None: it changed), delete(token).


class _LocalBackend:
    """Leases as generations ``OUT/_LEASE.<n>``, each created once with ``link`` (atomic, and it
    fails when the name exists, also on NFS): a lease is taken by creating generation 0, an
    expired one by creating generation n + 1, so of two takers exactly one succeeds and no
    lease is ever removed to make room for another. The highest generation holds; a holder
    that sees a higher one has lost (checked right after creating, at every renewal and before
    the switch). Renewal rewrites the holder's own generation by rename; release deletes it."""

    guarantee = "exclusive (link on this filesystem)"

    def __init__(self, path: str):
        self.path = path
        self.folder, self.prefix = os.path.dirname(path), os.path.basename(path) + "."

    def _gens(self) -> list[int]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(n[len(self.prefix):]) for n in names
                      if n.startswith(self.prefix) and n[len(self.prefix):].isdigit())

    def _name(self, gen: int) -> str:
        return f"{self.path}.{gen}"

    def _link(self, gen: int, body: bytes):
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.path}.new-{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self._name(gen))
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        if self._gens()[-1] != gen:  # a later generation exists: it holds, not us
            os.unlink(self._name(gen))
            return None
        for old in self._gens():  # the generations before ours hold nothing any more
            if old < gen:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._name(old))
        return gen, body

    def create(self, body: bytes):
        return None if self._gens() else self._link(0, body)

    def read(self):
        for gen in reversed(self._gens()):
            try:
                with open(self._name(gen), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue  # deleted by a newer holder since the listing
            return data, (gen, data)
        return None

    def swap(self, token, body: bytes):
        return self._link(token[0] + 1, body)

    def renew(self, token, body: bytes):
        gen = token[0]
        gens = self._gens()
        if not gens or gens[-1] != gen:
            return None
        storage.write_bytes_atomic(self._name(gen), body)  # a hidden temporary file, renamed
        return gen, body

    def delete(self, token) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name(token[0]))


class _S3Backend:
    guarantee = "exclusive (S3 conditional writes: If-None-Match / If-Match)"

    def __init__(self, fs, path: str):
        import boto3

        self.bucket, self.key = path.split("/", 1)
        region = getattr(fs, "region", None) or None
        self.client = boto3.client("s3", region_name=region)  # AWS_ENDPOINT_URL: boto3 reads it

    @staticmethod
    def _code(e) -> str:
        return e.response.get("Error", {}).get("Code", "")

    def _put(self, body: bytes, **cond):
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          **cond)["ETag"]
        except ClientError as e:
            if self._code(e) in ("PreconditionFailed", "ConditionalRequestConflict",
                                 "NoSuchKey"):
                return None
            raise OSError(f"lease s3://{self.bucket}/{self.key}: {e}") from e

    def create(self, body: bytes):
        return self._put(body, IfNoneMatch="*")

    def read(self):
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._code(e) in ("NoSuchKey", "404"):
                return None
            raise OSError(f"lease s3://{self.bucket}/{self.key}: {e}") from e
        return r["Body"].read(), r["ETag"]

    def swap(self, token: str, body: bytes):
        return self._put(body, IfMatch=token)

    renew = swap

    def delete(self, token: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
        except ClientError as e:
            if self._code(e) not in ("PreconditionFailed", "NoSuchKey", "404"):
                raise OSError(f"lease s3://{self.bucket}/{self.key}: {e}") from e


class _ReadBackBackend:
    guarantee = ("best effort (no conditional writes: write, then read back after "
                 f"{SETTLE_SECONDS:g} s)")

    def __init__(self, uri: str):
        self.uri = uri

    def read(self):
        try:
            data = storage.read_bytes(self.uri)
        except FileNotFoundError:
            return None
        return data, data

    def _write_and_check(self, body: bytes):
        storage.write_bytes_atomic(self.uri, body)
        time.sleep(SETTLE_SECONDS)
        current = self.read()
        return body if current is not None and current[0] == body else None

    def create(self, body: bytes):
        if self.read() is not None:
            return None
        return self._write_and_check(body)

    def swap(self, token: bytes, body: bytes):
        current = self.read()
        if current is None or current[1] != token:
            return None
        return self._write_and_check(body)

    def renew(self, token: bytes, body: bytes):
        current = self.read()
        if current is None or current[1] != token:
            return None
        storage.write_bytes_atomic(self.uri, body)
        return body

    def delete(self, token: bytes) -> None:
        current = self.read()
        if current is not None and current[1] == token:
            storage.delete_file(self.uri)


def _backend(out: str):
    uri = storage.join(out, LEASE_FILE)
    if not storage.is_uri(uri):
        return _LocalBackend(os.path.abspath(uri))
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(uri)  # the store itself, not storage's (test) wrapper
    if storage.is_local(fs):  # file://
        return _LocalBackend(p)
    if isinstance(fs, pafs.S3FileSystem):
        try:
            return _S3Backend(fs, p)
        except ImportError:
            log.warning("boto3 is not installed: the lease on %s falls back to write and read "
                        "back (two runs starting together may both proceed)", out)
    else:
        log.warning("%s has no create-only writes through pyarrow: the lease there is best "
                    "effort (two runs starting within %g s may both proceed)", out,
                    SETTLE_SECONDS)
    return _ReadBackBackend(uri)


# ------------------------------------------------------------------------------------ lease


class Lease:
    """The lease on one output folder for one run: ``acquire`` (or use it as a context manager,
    which also renews it from a thread and releases it at the end), ``check`` before the
    switch. ``seconds``: the lease period (renewed every third of it)."""

    def __init__(self, out: str, run_id: str, seconds: float = DEFAULT_SECONDS):
        if seconds <= 0:
            raise InputError(f"a lease period must be positive, not {seconds} s")
        self.out, self.run_id, self.seconds = out, run_id, float(seconds)
        self.backend = _backend(out)
        self.started = time.time()
        self.token = None
        self.lost = ""
        self.taken_from: Holder | None = None  # the expired or dead holder acquire took over
        self.taken_because = ""  # and why it could (Holder.dead_reason)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _body(self) -> bytes:
        return Holder(self.run_id, socket.gethostname(), os.getpid(),
                      _process_identity(os.getpid()) or "", self.started,
                      time.time() + self.seconds).to_bytes()

    def acquire(self) -> "Lease":
        """Take the lease, taking over an expired or dead one (logged). Raises LeaseHeld naming
        the live holder; OSError when OUT cannot be reached."""
        for _ in range(20):  # each turn: someone else changed the lease between two steps
            token = self.backend.create(self._body())
            if token is not None:
                self.token = token
                return self
            current = self.backend.read()
            if current is None:
                continue  # released in between: try to create again
            holder = Holder.from_bytes(current[0])
            reason = holder.dead_reason(time.time())
            if not reason:
                raise LeaseHeld(f"{self.out} is being written by {holder.describe()} (renewed "
                                f"while that run lives): nothing done. Wait for it to end, or "
                                f"use another --out")
            token = self.backend.swap(current[1], self._body())
            if token is not None:
                log.warning("took over the lease on %s from %s: %s", self.out,
                            holder.describe(), reason)
                self.token = token
                self.taken_from, self.taken_because = holder, reason
                return self
        raise LeaseHeld(f"the lease on {self.out} kept changing hands: another run is starting "
                        f"there; nothing done")

    def renew(self) -> None:
        """Push the expiry one period on; raises LeaseLost when the lease is no longer ours."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            token = self.backend.renew(self.token, self._body())
            if token is None:
                current = self.backend.read()
                who = Holder.from_bytes(current[0]).describe() if current else "nobody"
                self.lost = (f"run {self.run_id} lost its lease on {self.out} (now held by "
                             f"{who}): nothing published by this run")
                raise LeaseLost(self.lost)
            self.token = token

    def check(self) -> None:
        """Before the publish switch: renew once more; LeaseLost when the lease is not ours."""
        self.renew()

    def release(self) -> None:
        """Delete the lease if it is still ours; the renewal thread stops first. Never raises
        for storage errors (logged): the lease then expires on its own."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.token is None:
                return
            try:  # each backend deletes the lease only while it is still this run's
                self.backend.delete(self.token)
            except OSError as e:
                log.warning("could not release the lease on %s (%s); it expires at %s",
                            self.out, e, _iso(time.time() + self.seconds))
            self.token = None

    def _renew_forever(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
                last_ok = time.monotonic()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except OSError as e:  # storage hiccup: try again, until the lease would lapse
                if time.monotonic() - last_ok >= self.seconds:
                    with self._lock:
                        self.lost = (f"run {self.run_id} could not renew its lease on "
                                     f"{self.out} for {self.seconds:g} s ({e}): nothing "
                                     f"published by this run")
                    log.error("%s", self.lost)
                    return
                log.warning("renewing the lease on %s failed (%s); retrying", self.out, e)

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._renew_forever, daemon=True,
                                        name=f"lease-{self.run_id}")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(out: str) -> Holder | None:
    """The run holding (or last left) the lease on ``out``, or None when there is none."""
    current = _backend(out).read()
    return None if current is None else Holder.from_bytes(current[0])
