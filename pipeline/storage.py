"""Paths that may be local folders or pyarrow filesystem URIs (s3://, gs://, file://).

Every job takes either. Local paths stay plain ``os`` paths so error messages name the file a
user typed; URIs go through ``pyarrow.fs``. Writes of whole files are atomic where the
filesystem allows it (write a temporary name, then rename); on object stores a PUT of a
whole object is atomic by itself.

Object stores (S3, GCS) have no folders: a "folder" is a key prefix. It exists when an object
lies under it (or pyarrow's empty ``name/`` marker from ``makedirs``), and moving one is a
copy of every object, then a delete: not atomic. ``move_tree`` says which it did.

Every call to an object store is retried (``RETRY_DELAYS``, about 8 s in all) when it fails
with an OSError that may be transient (a reset connection, a 5xx, a timeout) and that is safe to
repeat: reads, listings, whole-object PUTs, server-side copies and deletes are all idempotent.
Errors that a retry cannot fix (missing file, access denied, no such bucket) are raised at
once. A local disk is never retried. pyarrow's own S3 client retries some AWS errors first;
this layer also covers the ones it gives up on.

Credentials and the endpoint come from the standard environment only (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``/``AWS_REGION``,
``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for an S3-compatible store, or the usual
config files / instance role). ``pyarrow.fs.FileSystem.from_uri`` honours the endpoint
variables (pyarrow 26); the bare ``S3FileSystem()`` constructor does not, so every path here,
like Ray Data's and Ray Train's, is resolved with ``from_uri``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import stat
import time
import uuid
from typing import Iterator

import pyarrow.fs as pafs

from pipeline import faults
from pipeline.errors import InputError

log = logging.getLogger(__name__)

# Seconds between the attempts of an object-store call that failed with a transient error.
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError)
_PERMANENT_TEXT = ("ACCESS_DENIED", "AccessDenied", "NoSuchBucket", "not found",
                   "does not exist", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                   "Not a directory", "is a directory")


def retrying(fs: pafs.FileSystem, what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, repeated after RETRY_DELAYS when ``fs`` is an object store and
    it raises an OSError that may be transient; ``what`` names the call in the warning logged
    for each retry. ``fn`` must be safe to repeat. Raises the last error when all attempts
    fail, and permanent errors (missing file, access denied, ...) at once."""
    if is_local(fs):
        return fn(*args, **kwargs)
    for delay in RETRY_DELAYS + (None,):
        try:
            return fn(*args, **kwargs)
        except _PERMANENT:
            raise
        except OSError as e:
            if delay is None or any(t in str(e) for t in _PERMANENT_TEXT):
                raise
            log.warning("storage: %s failed (%s); retrying in %g s", what, e, delay)
            time.sleep(delay)


def is_uri(path: str) -> bool:
    """True when ``path`` holds ``://`` (s3://, gs://, file://...): a pyarrow filesystem URI."""
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(path)  # reads AWS_ENDPOINT_URL: see the module doc
        return faults.storage_filesystem(fs), p  # (tests) a flaky store, where armed
    return pafs.LocalFileSystem(), os.path.abspath(path)


def is_local(fs: pafs.FileSystem) -> bool:
    """True for a real local disk (atomic renames); False for object stores."""
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """``base`` joined with ``parts``: with '/' for a URI, with ``os.path.join`` for a local path
    (where an absolute part starts the path anew)."""
    base = str(base)
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    """The parent of ``path`` (a trailing '/' ignored): ``scheme://`` and the parent for a URI, an
    absolute path for a local path (a relative one is made absolute first)."""
    path = str(path).rstrip("/")
    if is_uri(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    """The last '/'-separated component of ``path`` (a trailing '/' ignored), URI or local."""
    return posixpath.basename(str(path).rstrip("/"))


def exists(path: str) -> bool:
    """Whether a file or folder is at ``path`` (object store: an object, or a prefix with one)."""
    fs, p = resolve(path)
    return _info(fs, p).type != pafs.FileType.NotFound


def _info(fs: pafs.FileSystem, p: str):
    return retrying(fs, f"looking up {p}", fs.get_file_info, p)


def _listing(fs: pafs.FileSystem, selector: pafs.FileSelector) -> list:
    return retrying(fs, f"listing {selector.base_dir}", fs.get_file_info, selector)


def is_dir(path: str) -> bool:
    """Whether ``path`` is a folder (on an object store: a prefix with objects or a ``makedirs``
    marker); False when nothing is there."""
    fs, p = resolve(path)
    return _info(fs, p).type == pafs.FileType.Directory


def size(path: str) -> int | None:
    """The size of the file at ``path`` in bytes; FileNotFoundError when nothing is there. A folder
    gives None (pyarrow has no size for it)."""
    fs, p = resolve(path)
    info = _info(fs, p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return info.size


def makedirs(path: str) -> None:
    """Create the folder ``path`` and its parents; nothing to do when it exists (object stores get
    pyarrow's empty marker objects). OSError (FileExistsError, ...) when a file is in the way."""
    fs, p = resolve(path)
    retrying(fs, f"creating {p}", fs.create_dir, p, recursive=True)


def read_bytes(path: str) -> bytes:
    """The whole file at ``path`` as bytes; FileNotFoundError when it is missing, OSError when it is
    a folder or cannot be read."""
    fs, p = resolve(path)

    def read() -> bytes:
        # A random-access file knows its size: one request for the whole object. pyarrow's S3
        # input *stream* reads in 256 KiB ranged GETs, one after the other: a 45 MB model.pt
        # took 181 requests and 7.6 s from a local S3 endpoint (moto) against 0.1 s
        # (measured 2026-12-04, pyarrow 26.0.1).
        with fs.open_input_file(p) as f:
            return f.read()
    return retrying(fs, f"reading {p}", read)


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of the file at ``path`` from byte ``offset`` (one ranged request on an
    object store); fewer when the file ends first. Errors as ``read_bytes``."""
    fs, p = resolve(path)

    def read() -> bytes:
        with fs.open_input_file(p) as f:
            return f.read_at(length, offset)
    return retrying(fs, f"reading bytes {offset}-{offset + length} of {p}", read)


def read_text(path: str) -> str:
    """The file at ``path`` decoded as UTF-8; errors as ``read_bytes``, and InputError naming the
    file when it is not UTF-8 text (a binary file given where a manifest or list belongs)."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str):
    """The JSON document at ``path``; errors as ``read_text``, and InputError naming the file
    when it is not valid JSON."""
    import json

    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part. On a
    local disk the bytes go to a hidden temporary file beside it (``.NAME.tmp-XXXXXXXX``, which
    pyarrow's and pandas' folder readers skip) that is then renamed over ``path``."""
    fs, p = resolve(path)
    if is_local(fs):
        fs.create_dir(os.path.dirname(p), recursive=True)
        tmp = os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    else:
        # One PUT (a multipart upload for big data): the object appears whole when the upload
        # completes, never in part. No parent "folders" to create: a key needs none, and
        # creating pyarrow's markers would cost requests per level on every write.
        def put() -> None:
            with fs.open_output_stream(p) as f:
                f.write(data)
        retrying(fs, f"writing {p}", put)  # a PUT of the whole object: safe to repeat


def write_parquet_atomic(path: str, tables, metadata: dict[str, str] | None = None) -> None:
    """Write ``tables`` (one ``pyarrow.Table`` or a list of them, one schema, each written as
    it comes: its own row groups) to ``path`` as one Parquet file, built in memory and stored
    in one whole-file write (``write_bytes_atomic``: retried on an object store, never half
    there). ``metadata``: key-value pairs for the file's schema (Parquet key-value metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [tables] if isinstance(tables, pa.Table) else list(tables)
    schema = tables[0].schema
    if metadata:
        schema = schema.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    buf = pa.BufferOutputStream()
    with pq.ParquetWriter(buf, schema) as writer:
        for table in tables:
            writer.write_table(table.replace_schema_metadata(schema.metadata))
    write_bytes_atomic(path, buf.getvalue().to_pybytes())


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` as UTF-8, atomically (``write_bytes_atomic``)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def delete_dir(path: str) -> None:
    """Delete the folder ``path`` and everything under it; nothing when it does not exist. OSError
    when ``path`` is a file."""
    fs, p = resolve(path)
    if _info(fs, p).type != pafs.FileType.NotFound:
        retrying(fs, f"deleting {p}", _delete_dir_if_there, fs, p)


def _delete_dir_if_there(fs: pafs.FileSystem, p: str) -> None:
    try:
        fs.delete_dir(p)
    except FileNotFoundError:  # a retry after an attempt that had deleted it all
        pass


def move_tree(src: str, dst: str) -> str:
    """Move a file or a whole folder ``src`` to ``dst``; return "rename" or "copy".

    Local disk: one ``os.replace`` of the file or folder, atomic (dst must not be a non-empty
    folder, else the children are moved into it one by one). Object stores: every object under
    the prefix is copied server-side, then the source prefix is deleted, so a crash can leave
    part of the objects in both places or (while deleting) the copy whole and the source in
    part, never an object lost; objects already under ``dst`` with the same names are
    overwritten, others are kept. Callers that need atomicity (``publish.publish``) order their
    steps and markers so that either state can be rolled back.
    """
    fs, s = resolve(src)
    dst_fs, d = resolve(dst)
    if type(dst_fs) is not type(fs):
        raise InputError(f"cannot move {src} to {dst}: not on the same filesystem")
    info = _info(fs, s)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"cannot move {src}: it does not exist")
    if is_local(fs):
        _move_local(s, d)
        return "rename"
    if info.type == pafs.FileType.File:
        retrying(fs, f"copying {s}", fs.copy_file, s, d)
        retrying(fs, f"deleting {s}", _delete_file_if_there, fs, s)
        return "copy"
    retrying(fs, f"creating {d}", fs.create_dir, d, recursive=True)  # an empty folder too
    prefix = s.rstrip("/") + "/"
    for entry in _listing(fs, pafs.FileSelector(s, recursive=True)):
        if entry.type == pafs.FileType.File and entry.path.startswith(prefix):
            target = posixpath.join(d, entry.path[len(prefix):])
            retrying(fs, f"copying {entry.path}", fs.copy_file, entry.path, target)
    # batched deletes of every object under the prefix, after all copies
    retrying(fs, f"deleting {s}", _delete_dir_if_there, fs, s)
    return "copy"


def _delete_file_if_there(fs: pafs.FileSystem, p: str) -> None:
    try:
        fs.delete_file(p)
    except FileNotFoundError:  # a retry after an attempt that had deleted it
        pass


def _move_local(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.isdir(src) and os.path.isdir(dst) and os.listdir(dst):
        for name in os.listdir(src):  # merge into a non-empty folder (recovery only)
            _move_local(os.path.join(src, name), os.path.join(dst, name))
        os.rmdir(src)
        return
    if os.path.isdir(dst) and not os.path.isdir(src):
        raise IsADirectoryError(f"cannot move file {src} onto folder {dst}")
    os.replace(src, dst)  # atomic; replaces a file or an empty folder


def delete_file(path: str) -> None:
    """Delete the file ``path``; nothing when it does not exist. OSError (IsADirectoryError on local
    disk) when ``path`` is a folder."""
    fs, p = resolve(path)
    if _info(fs, p).type != pafs.FileType.NotFound:
        retrying(fs, f"deleting {p}", _delete_file_if_there, fs, p)


def list_files(root: str) -> Iterator[tuple[str, int]]:
    """Yield (path relative to root with '/' separators, size) for every file below root
    (symlinks followed). Entries that are no readable file are left out: ``list_tree`` names
    them."""
    yield from list_tree(root)[0]


def list_tree(root: str) -> tuple[list[tuple[str, int]], list[dict]]:
    """Every file below ``root`` as (relative path, size), and every entry that looks like a file
    but cannot be read as one, as {"path", "reason"}: a dangling symlink, a folder that cannot be
    listed, a socket or FIFO. Symlinked files and folders are followed (a folder reached twice
    through two links is listed under both paths, as torchvision's ImageFolder lists it; a link
    to a folder above it is reported, not followed). On object stores every object is a file."""
    fs, p = resolve(root)
    if not is_local(fs):
        selector = pafs.FileSelector(p, recursive=True)
        prefix = p.rstrip("/") + "/"
        return [(i.path[len(prefix):] if i.path.startswith(prefix) else i.path, i.size)
                for i in _listing(fs, selector) if i.type == pafs.FileType.File], []
    files, problems = [], []

    def rel(path: str) -> str:
        return os.path.relpath(path, p).replace(os.sep, "/")

    def unreadable(err: OSError) -> None:
        problems.append({"path": rel(err.filename), "reason": f"cannot list folder: {err}"})

    for dirpath, dirnames, filenames in os.walk(p, onerror=unreadable, followlinks=True):
        here = os.path.realpath(dirpath)
        for d in list(dirnames):  # a link to a folder above this one would loop forever
            target = os.path.realpath(os.path.join(dirpath, d))
            if here == target or here.startswith(target + os.sep):
                dirnames.remove(d)
                problems.append({"path": rel(os.path.join(dirpath, d)),
                                 "reason": f"symlink loop: links to {target}, a folder above"})
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                problems.append({"path": rel(full), "reason": "dangling symlink to "
                                 f"{os.readlink(full) if os.path.islink(full) else '?'}"})
                continue
            except OSError as e:
                problems.append({"path": rel(full), "reason": f"unreadable: {e}"})
                continue
            if stat.S_ISREG(st.st_mode):
                files.append((rel(full), st.st_size))
            else:
                problems.append({"path": rel(full), "reason": "not a regular file"})
    return files, problems


def list_dir_files(root: str) -> list[str]:
    """The names of the files directly under ``root``."""
    fs, p = resolve(root)
    return [basename(i.path) for i in _listing(fs, pafs.FileSelector(p))
            if i.type == pafs.FileType.File]


def list_dirs(root: str) -> list[str]:
    """The names of the folders directly under ``root`` (symlinked folders included), sorted."""
    fs, p = resolve(root)
    if is_local(fs):
        return sorted(e.name for e in os.scandir(p) if e.is_dir())  # is_dir follows links
    return sorted(basename(i.path) for i in _listing(fs, pafs.FileSelector(p))
                  if i.type == pafs.FileType.Directory)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """The SHA-256 hex digest of the file at ``path``, streamed in blocks of ``chunk`` bytes (by
    default 4 MiB); FileNotFoundError when it is missing."""
    fs, p = resolve(path)

    def digest() -> str:  # a retry reads the whole object again
        h = hashlib.sha256()
        with fs.open_input_file(p) as f:  # one ranged GET a block (read_bytes says why)
            while True:
                block = f.read(chunk)
                if not block:
                    break
                h.update(block)
        return h.hexdigest()
    return retrying(fs, f"reading {p}", digest)


def check_writable(path: str) -> None:
    """Fail early, naming the folder, when an output folder cannot be written."""
    probe = join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(path)
        write_bytes_atomic(probe, b"")
        delete_file(probe)
    except OSError as e:
        raise PermissionError(f"output folder {path} cannot be written: {e}") from e
