"""Paths that may be local folders or pyarrow filesystem URIs (s3://, gs://, file://).

Every job takes either. Local paths stay plain ``os`` paths so error messages name the file a
user typed; URIs go through ``pyarrow.fs``. Writes of whole files are atomic where the
filesystem allows it (write a temporary name, then rename); on object stores a PUT of a
whole object is atomic by itself.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from typing import Iterator

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    path = str(path).rstrip("/")
    if is_uri(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def size(path: str) -> int:
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return info.size


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    else:  # an object PUT is atomic: readers never see a partial object
        with fs.open_output_stream(p) as f:
            f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def delete_file(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_file(p)


def list_files(root: str) -> Iterator[tuple[str, int]]:
    """Yield (path relative to root with '/' separators, size) for every file below root."""
    fs, p = resolve(root)
    selector = pafs.FileSelector(p, recursive=True)
    prefix = p.rstrip("/") + "/"
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
            yield rel.replace(os.sep, "/"), info.size


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    fs, p = resolve(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def check_writable(path: str) -> None:
    """Fail early, naming the folder, when an output folder cannot be written."""
    probe = join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(path)
        write_bytes_atomic(probe, b"")
        delete_file(probe)
    except OSError as e:
        raise PermissionError(f"output folder {path} cannot be written: {e}") from e
