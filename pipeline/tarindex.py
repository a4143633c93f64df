"""A shard's sample index, and the chunks of samples that read tasks take (contract 1 in
docs/DESIGN.md).

A shard holds up to ``--samples-per-shard`` samples (5,000 by default: ~530 MB of ImageNet
JPEGs). Read whole, one shard is one Ray task: nothing is decoded until its bytes are in, and
once started the task decodes all of it (~750 MB of 224-pixel batches) however far ahead of the
model that runs. So reads go a chunk of samples at a time: one ranged read of a contiguous byte
range per task, found through the shard's sample index.

The index (a shard record's ``index`` in the manifest): ``{"every": E, "offsets": [...]}``, the
byte offset where the first member header of sample 0, E, 2E, ... starts, then the offset where
the last sample's data ends. jobs.shard writes it; ``sample_index`` rebuilds it from a tar's
headers for shards written before it was recorded. Samples are grouped as everywhere in this
project: members are adjacent, the key is a member name up to its first '.'.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

from pipeline.errors import InputError

INDEX_EVERY = 64  # samples between two index offsets: 20,000 offsets for ImageNet train
CHUNK_SAMPLES = 64


def sample_index(fileobj, every: int = INDEX_EVERY, name: str = "shard") -> dict:
    """The sample index (module doc) of the tar in ``fileobj`` (seekable: member data is
    skipped, not read). Raises InputError naming ``name`` when the tar cannot be read."""
    if every < 1:
        raise ValueError(f"every must be at least 1, not {every}")
    offsets, key, n, end = [], None, 0, 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                k = info.name.partition(".")[0]
                if k != key:
                    if n % every == 0:
                        offsets.append(info.offset)
                    key, n = k, n + 1
                end = info.offset_data + _padded(info.size)
    except tarfile.TarError as e:
        raise InputError(f"{name}: not a readable tar ({e})") from None
    return {"every": every, "offsets": offsets + [end]}


def sample_index_of_bytes(data: bytes, every: int = INDEX_EVERY, name: str = "shard") -> dict:
    """``sample_index`` of a tar held in memory."""
    return sample_index(io.BytesIO(data), every, name)


def _padded(size: int) -> int:
    return size + (-size % tarfile.BLOCKSIZE)


@dataclass(frozen=True)
class Chunk:
    """Samples ``first`` .. ``first + samples - 1`` of the shard at ``path``: bytes ``start`` to
    ``end`` (exclusive) of it."""
    path: str
    first: int
    samples: int
    start: int
    end: int


def chunks_of(path: str, samples: int, index: dict, chunk_samples: int = CHUNK_SAMPLES
              ) -> list[Chunk]:
    """The shard at ``path`` (``samples`` samples, its ``index``) as chunks of about
    ``chunk_samples`` samples (rounded up to whole index steps). Raises InputError when the index
    does not fit the sample count (a manifest edited by hand, or of another shard)."""
    every, offsets = int(index["every"]), list(index["offsets"])
    steps = -(-samples // every)  # index entries that start a sample
    if len(offsets) != steps + 1 or offsets != sorted(offsets):
        raise InputError(f"{path}: the manifest's sample index ({len(offsets)} offsets every "
                         f"{every}) does not fit its {samples} samples: reshard with jobs.shard")
    per = max(1, -(-chunk_samples // every))  # index steps a chunk
    out = []
    for s in range(0, steps, per):
        e = min(s + per, steps)
        first = s * every
        out.append(Chunk(path, first, min(e * every, samples) - first, offsets[s], offsets[e]))
    return out


def read_members(data: bytes, name: str) -> list[tuple[str, dict[str, bytes]]]:
    """The samples in ``data`` (whole tar members, as a chunk's byte range holds them, with or
    without the archive's end blocks) as (key, {extension: bytes}) in order, members grouped by
    key as they are adjacent. Raises InputError naming ``name`` when the bytes are not tar
    members, or a sample's members are not adjacent. Extensions are not checked here:
    ``shards.validate_sample`` judges each sample.

    The plain ustar headers jobs.shard writes are read directly (``_ustar_members``); anything
    else (PAX or GNU headers, links, a bad checksum) goes through ``tarfile``, which reads
    every tar: the same samples either way (tests/test_tarindex.py)."""
    samples = _ustar_members(data)
    if samples is None:
        samples = _tarfile_members(data, name)
    seen = set()
    for key, _ in samples:
        if key in seen:
            raise InputError(f"{name}: members of sample {key} are not adjacent")
        seen.add(key)
    return samples


_BLOCK = tarfile.BLOCKSIZE
_REGULAR = (b"0", b"\x00")  # typeflags of a regular file (the NUL of pre-POSIX tars)


def _ustar_members(data: bytes) -> list[tuple[str, dict[str, bytes]]] | None:
    """``read_members`` for tar bytes made only of regular-file members with plain ustar
    headers (checksum verified, size in octal) up to the end blocks or the end of ``data``;
    None at the first header that is anything else, for ``tarfile`` to read.

    ``tarfile`` builds a TarInfo and a file object per member (~25 us, 2026-12-07 on 2 cores:
    0.08 ms of the decode stage's ~3.3 ms of CPU an ImageNet image, 3 members a sample); this
    slices the members out of the chunk's bytes. Members are grouped into samples as
    ``_tarfile_members`` groups them."""
    view, end, pos, samples = memoryview(data), len(data), 0, []
    while pos + _BLOCK <= end:
        header = view[pos:pos + _BLOCK]
        if not any(header):  # an end block
            break
        if (header[257:262] != b"ustar" or header[156:157] not in _REGULAR
                or header[124] & 0x80):  # not ustar, not a regular file, base-256 size
            return None
        try:
            size = int(bytes(header[124:136]).rstrip(b"\x00 ") or b"0", 8)
            checksum = int(bytes(header[148:156]).rstrip(b"\x00 "), 8)
        except ValueError:
            return None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the field as spaces
            return None
        member = bytes(header[:100]).split(b"\x00", 1)[0]
        prefix = bytes(header[345:500]).split(b"\x00", 1)[0]
        if prefix:
            member = prefix + b"/" + member
        start = pos + _BLOCK
        if start + size > end:  # a member cut short: tarfile says what is wrong
            return None
        try:
            key, _, ext = member.decode("utf-8").partition(".")
        except UnicodeDecodeError:
            return None
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = bytes(view[start:start + size])
        pos = start + size + (-size % _BLOCK)
    return samples


def _tarfile_members(data: bytes, name: str) -> list[tuple[str, dict[str, bytes]]]:
    """``read_members`` through ``tarfile``: every tar format it reads."""
    samples = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, _, ext = info.name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise InputError(f"{name}: not a readable tar ({e})") from None
    return samples
