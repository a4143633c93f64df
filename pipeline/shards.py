"""Writing and verifying WebDataset shards (contract 1 in docs/DESIGN.md).

One sample per source image: ``KEY.<jpg|png|...>`` (the original bytes, extension from the real
format), ``KEY.cls`` (class index as ASCII digits) and ``KEY.json`` (class id, source path, width,
height, PIL mode), adjacent in the tar, with fixed headers so the same input gives the same bytes.
One Ray task writes one shard; a shard is written under a temporary name and renamed when whole
(on an object store: one PUT, which is atomic per object), and a per-shard record lets a rerun
skip shards that are already complete and intact.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, fields
from typing import NamedTuple

from pipeline import faults, images, storage, tarindex
from pipeline import progress as progresslib
from pipeline.sources import Source
from pipeline.errors import InputError

FORMAT = "resnet-pipeline-shards"
FORMAT_VERSION = 1
# Real format (PIL's name) -> member extension (images.py). Anything else is skipped with its
# reason.
IMAGE_EXTS = images.IMAGE_EXTS
MEMBER_EXTS = set(IMAGE_EXTS.values()) | {"cls", "json"}
DEFAULT_MAX_PIXELS = images.DEFAULT_MAX_PIXELS
# ImageNet train images average ~110 KB: 5000 per shard gives ~550 MB train shards and
# 10 val shards of ~640 MB; use 1000 for val if you read it with more than 10 readers.
DEFAULT_SAMPLES_PER_SHARD = 5000
@dataclass(frozen=True)
class Member:
    """One source file to store: its sample ``key`` (unique, free of dots), its ``path`` relative to
    the source root, and its ``class_id``."""
    key: str
    path: str  # relative to the source root
    class_id: str


def shard_name(split: str, index: int) -> str:
    """A shard's file name: ``<split>-<index as 6 digits>.tar``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def make_keys(items: list[tuple[str, str]]) -> list[Member]:
    """A key per file, unique by construction and free of dots (WebDataset splits a member name
    at its first dot). The file's stem (dots as '_') where no other file has that key, which
    keeps ImageNet's keys (``n01440764_10026``, ``ILSVRC2012_val_00000001``); else its folder
    and stem (``cat/001.jpg`` -> ``cat_001``); else its whole relative path with '_', '/' and
    '.' escaped as '__', '_s', '_d' (``x/img.png`` -> ``x_simg_dpng``), which differs for
    every path. A key that meets another moves up a level until none does, so no file is
    dropped for its name."""
    levels = [0] * len(items)
    while True:
        keys = [_key(path, level) for (path, _), level in zip(items, levels)]
        counts = Counter(keys)
        clashing = [i for i, k in enumerate(keys) if counts[k] > 1 and levels[i] < 2]
        if not clashing:
            break
        for i in clashing:
            levels[i] += 1
    if len(set(keys)) != len(keys):  # only two equal paths could do this
        raise InputError(f"two files with the same path among {len(items)} source files")
    return [Member(k, p, c) for k, (p, c) in zip(keys, items)]


def _key(path: str, level: int) -> str:
    """Level 0: the stem; 1: folders and stem; 2: the whole path, escaped (injective)."""
    if level == 2:
        return path.replace("_", "__").replace("/", "_s").replace(".", "_d")
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    if level == 0:
        stem = stem.rsplit("/", 1)[-1]
    return stem.replace("/", "_").replace(".", "_")


def plan_shards(members: list[Member], split: str, samples_per_shard: int, seed: int):
    """Train: a seeded permutation of the whole split. Anything else: sorted by key."""
    if samples_per_shard < 1:
        raise InputError("samples_per_shard must be at least 1")
    ordered = sorted(members, key=lambda m: m.key)
    if split == "train":
        random.Random(seed).shuffle(ordered)
    return [ordered[i:i + samples_per_shard] for i in range(0, len(ordered), samples_per_shard)]


def plan_digest(members: list[Member], class_index: dict[str, int], max_pixels: int,
                check: str = "decode") -> str:
    """SHA-256 hex of what a shard holds (format version, ``max_pixels``, ``check``, each member's
    key, path and class index in order): a rerun reuses a shard whose record has the same digest.
    KeyError for a member whose class id is not in ``class_index``."""
    # "decode" (the only level before there were two) keeps the old digest, so shards written
    # then are still reused; another level redoes them.
    level = "" if check == "decode" else f"|{check}"
    h = hashlib.sha256(f"{FORMAT_VERSION}|{max_pixels}{level}".encode())
    for m in members:
        h.update(f"\n{m.key}|{m.path}|{class_index[m.class_id]}".encode())
    return h.hexdigest()


class _TarWriter:
    """The bytes ``tarfile`` (PAX format) writes for regular-file members, without its per-member
    file-object copies: a list of byte strings joined once. Headers are fixed (mtime 0, mode
    644, uid/gid 0, no user names), so the same members give the same bytes.

    Kept instead of ``webdataset.TarWriter`` (which goes through tarfile) for speed, measured
    2026-11-29 on the 2-core reference machine, 2000 samples of 110 KB + cls + json in memory,
    best of 3: this writer 18,700 samples/s, ``wds.TarWriter(buf, mtime=0)`` 7,900 (2.4x
    slower), and sharding already runs at 0.32x ``tar cf`` (docs/BENCHMARKS.md). The tests read
    every shard back with webdataset's own reader."""

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, name: str, data: bytes) -> None:
        """Append one regular-file member ``name`` holding ``data``: a fixed ustar header (a PAX one
        for a name over 100 characters or not ASCII, or 8 GiB of data or more), the data, and
        zeros up to a whole 512-byte block."""
        header = _ustar_header(name, len(data))
        if header is None:  # a long or non-ASCII name: tarfile writes the PAX header for it
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
        pad = -len(data) % tarfile.BLOCKSIZE
        self.parts += (header, data, bytes(pad))
        self.size += len(header) + len(data) + pad

    def getvalue(self) -> bytes:
        """The whole archive as bytes: the members added so far, two zero blocks, and zeros up to a
        whole 10240-byte record, as ``tarfile`` closes one."""
        # End of archive: two zero blocks, then zeros up to a whole record, as tarfile.close().
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.size + end) % tarfile.RECORDSIZE
        return b"".join(self.parts + [bytes(end)])


_USTAR_MODE_IDS = b"0000644\x00" + b"0000000\x00" * 2  # mode 644, uid 0, gid 0
_USTAR_TAIL = (b"00000000000\x00" + b" " * 8 + b"0" + bytes(100) + b"ustar\x0000"  # mtime 0
               + bytes(247))  # no user names, no device numbers, no prefix, padding
_USTAR_TAIL_SUM = sum(_USTAR_TAIL)


def _ustar_header(name: str, size: int) -> bytes | None:
    """The 512-byte header tarfile writes for a regular file with our fixed fields, built
    directly (tarfile takes ~30 us a header); None when a PAX header is needed."""
    if not name.isascii() or len(name) > 100 or size >= 8 ** 11:
        return None
    head = name.encode("ascii").ljust(100, b"\x00") + _USTAR_MODE_IDS + b"%011o\x00" % size
    checksum = sum(head) + _USTAR_TAIL_SUM  # the checksum field counts as 8 spaces
    return head + _USTAR_TAIL[:12] + b"%06o\x00 " % checksum + _USTAR_TAIL[20:]


class BuiltShard(NamedTuple):
    """One shard as ``build_shard`` makes it: the tar ``data``, the ``keys`` stored, the files
    ``skipped`` with their reasons, the ``source_bytes`` stored and ``image_exts``, how many
    images of each member extension (``{"jpg": 61, "png": 1}``)."""
    data: bytes
    keys: list[str]
    skipped: list[dict]
    source_bytes: int
    image_exts: dict[str, int]


def build_shard(root: str, members: list[Member], class_index: dict[str, int],
                max_pixels: int, check: str = images.DEFAULT_CHECK) -> BuiltShard:
    """Build one shard's tar bytes from ``members`` (``BuiltShard``)."""
    tar, keys, skipped, source_bytes, exts = _TarWriter(), [], [], 0, Counter()
    for m in members:
        try:
            data = storage.read_bytes(storage.join(root, m.path))
            info = images.inspect_image(data, max_pixels, check)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            # Only what a retry cannot fix is skipped; a transient I/O error (an object
            # store timing out) is retried by storage, then raises and fails the job.
            skipped.append({"path": m.path, "reason": f"unreadable: {e}"})
            continue
        except images.BadImage as e:
            skipped.append({"path": m.path, "reason": str(e)})
            continue
        meta = {"class_id": m.class_id, "path": m.path, "width": info["width"],
                "height": info["height"], "mode": info["mode"]}
        tar.add(f"{m.key}.{info['ext']}", data)
        tar.add(f"{m.key}.cls", str(class_index[m.class_id]).encode())
        tar.add(f"{m.key}.json", json.dumps(meta, sort_keys=True).encode())
        keys.append(m.key)
        exts[info["ext"]] += 1
        source_bytes += len(data)
    return BuiltShard(tar.getvalue(), keys, skipped, source_bytes, dict(sorted(exts.items())))


def write_shard(root: str, out: str, split: str, index: int, members: list[Member],
                class_index: dict[str, int], max_pixels: int,
                check: str = images.DEFAULT_CHECK) -> dict:
    """Write one shard (or keep an intact one from an earlier run); return its record."""
    name = shard_name(split, index)
    path, part = storage.join(out, name), storage.join(out, f"_parts/{name}.json")
    digest = plan_digest(members, class_index, max_pixels, check)
    if storage.exists(part):
        try:
            old = storage.read_json(part)
        except InputError:  # a damaged record of an earlier run: build the shard again
            old = {}
        if old.get("plan") == digest and integrity_problem(Shard.from_record(old), path) is None:
            if "index" not in old:  # written before shards carried their sample index
                old["index"] = _scan_index(path)
                storage.write_text_atomic(part, json.dumps(old))
            return dict(old, reused=True)
    built = build_shard(root, members, class_index, max_pixels, check)
    keys = built.keys
    storage.write_bytes_atomic(path, built.data)
    record = {"file": name, "samples": len(keys), "bytes": len(built.data),
              "sha256": hashlib.sha256(built.data).hexdigest(),
              "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None,
              "plan": digest, "skipped": built.skipped, "source_bytes": built.source_bytes,
              "image_exts": built.image_exts,
              "index": tarindex.sample_index_of_bytes(built.data, name=name)}
    storage.write_text_atomic(part, json.dumps(record))
    return dict(record, reused=False)


def write_shards(source: Source, out: str, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                 seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 progress: bool = True, check: str = images.DEFAULT_CHECK) -> "Manifest":
    """Shard ``source`` into ``out`` with one Ray task per shard; write the manifest
    (OUT/<split>.json) and return it, with this run's ``ShardingStats`` as its ``stats``.

    ``check`` is how each source file is checked before it is stored (``images.CHECKS``,
    ``images.inspect_image``): "header" (default) or "decode"."""
    import ray

    if check not in images.CHECKS:
        raise InputError(f"check must be one of {images.CHECKS}, not {check!r}")
    members = make_keys(source.items)
    if not members:
        raise InputError(f"split {source.split!r} of {source.root} has no images to shard "
                         f"({len(source.skipped)} files skipped)")
    storage.check_writable(out)
    plan = plan_shards(members, source.split, samples_per_shard, seed)
    class_index = source.class_index
    task = _remote_write_shard()
    refs = {task.remote(source.root, out, source.split, i, shard, class_index, max_pixels,
                        check): i
            for i, shard in enumerate(plan)}
    records, start = [None] * len(plan), time.monotonic()
    with progresslib.Progress(len(members), f"shard {source.split}", enabled=progress) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            rec = ray.get(done[0])
            records[refs[done[0]]] = rec
            faults.point("shard_after_first_shard")
            bar.update(len(plan[refs[done[0]]]))
    raw = _manifest(source, plan, records, samples_per_shard, seed, max_pixels, check)
    path = storage.join(out, f"{source.split}.json")
    storage.write_text_atomic(path, json.dumps(raw, indent=1))
    if raw["total_samples"] == 0:
        raise InputError(f"split {source.split!r} of {source.root} has no images to shard: all "
                         f"{len(raw['skipped'])} files were skipped (reasons in {path})")
    write_timm_info(out)
    stats = ShardingStats(time.monotonic() - start, sum(r["reused"] for r in records),
                          sum(r["source_bytes"] for r in records))
    return Manifest.from_raw(path, raw, stats)


TIMM_INFO = "_info.json"


def write_timm_info(out: str) -> str:
    """Write OUT/_info.json, the split index timm's webdataset reader
    (``timm.data.create_dataset("wds/...", root=OUT, split=...)``, timm/data/readers/reader_wds.py)
    reads: per split its name, ``num_samples``, shard ``filenames`` and ``shard_lengths``. It is
    derived from the manifests in OUT each time (never edited in place), so it lists the splits
    they do; one this code cannot read (another format version, no samples) is left out, as no
    reader here could read its shards either. Returns the file's path."""
    splits = {}
    for path in find_manifests(out):
        try:
            m = load_manifest(path)
        except InputError:
            continue
        splits[m.split] = {"name": m.split, "num_samples": m.total_samples,
                           "filenames": [s.file for s in m.shards],
                           "shard_lengths": [s.samples for s in m.shards]}
    path = storage.join(out, TIMM_INFO)
    storage.write_text_atomic(path, json.dumps(
        {"name": storage.basename(out.rstrip("/")), "splits": splits}, indent=1))
    return path


def _scan_index(path: str) -> dict:
    """``tarindex.sample_index`` of the shard file at ``path`` (its headers only)."""
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return tarindex.sample_index(f, name=path)


def shard_index(path: str, rec: "Shard") -> dict:
    """The sample index of the shard at ``path``: its record's, or (a shard written before the
    index was recorded) read off its tar headers."""
    return rec.index if rec.index else _scan_index(path)


@functools.cache
def _remote_write_shard():
    """One Ray remote function per process: exported to the cluster once, not on every call."""
    import ray

    return ray.remote(num_cpus=1, max_retries=3)(write_shard)


def _manifest(source, plan, records, samples_per_shard, seed, max_pixels, check) -> dict:
    bad = {s["path"] for r in records for s in r["skipped"]}
    stored = Counter(m.class_id for shard in plan for m in shard if m.path not in bad)
    skipped = list(source.skipped) + [s for r in records for s in r["skipped"]]
    shards = [{k: r[k] for k in ("file", "samples", "bytes", "sha256", "first_key", "last_key",
                                 "index")}
              for r in records if r["samples"] > 0]
    # images per member extension over the split (a shard reused from before this was recorded
    # makes it unknown: None), for readers that need their columns named (pipeline/readers.py)
    exts = Counter()
    for r in records:
        exts.update(r.get("image_exts") or {})
    known = all("image_exts" in r for r in records)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "split": source.split,
            "layout": source.layout, "variant": source.variant, "source": source.root,
            "seed": seed,
            "samples_per_shard": samples_per_shard, "max_pixels": max_pixels, "check": check,
            "classes": source.classes,
            # classes that keep their index but hold no image (an empty class folder, or one
            # whose every file was skipped): listed, never dropped, so no index shifts
            "empty_classes": [c["id"] for c in source.classes if not stored[c["id"]]],
            "shards": shards,
            "total_samples": sum(s["samples"] for s in shards),
            "total_bytes": sum(s["bytes"] for s in shards),
            "image_exts": dict(sorted(exts.items())) if known else None,
            "skipped": sorted(skipped, key=lambda s: s["path"])}


@dataclass(frozen=True)
class Shard:
    """One shard's record in a manifest: its file (relative to the manifest), samples, size in
    bytes, sha256, first and last key, and sample index (``pipeline.tarindex``)."""
    file: str
    samples: int
    bytes: int
    sha256: str
    first_key: str | None
    last_key: str | None
    index: dict | None = None  # tarindex's sample index; None in manifests from before it

    @classmethod
    def from_record(cls, record: dict) -> "Shard":
        """From a shard's record as a manifest's JSON (or a shard's _parts/ file) holds it;
        keys that are not fields (plan, skipped, ...) are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


@dataclass(frozen=True)
class ShardingStats:
    """What one ``write_shards`` run did: its wall ``seconds``, the shards it ``reused`` (left
    as a previous run wrote them) and the ``source_bytes`` it read."""
    seconds: float
    reused: int
    source_bytes: int


@dataclass(frozen=True)
class Manifest:
    """A shard manifest as read (contract 1 in docs/DESIGN.md): ``classes`` [{"index", "id",
    "name"}] in index order, ``shards`` in order, ``total_samples``, ``skipped`` [{"path",
    "reason"}], ``empty_classes`` (ids), ``max_pixels``; ``raw`` is the whole JSON (for keys
    this type does not name, such as ``check``). Read a manifest's fields as attributes: the
    one way (no mapping access)."""
    path: str
    split: str
    layout: str
    classes: list[dict]
    shards: list[Shard]
    total_samples: int
    skipped: list[dict]
    empty_classes: list[str]
    max_pixels: int
    raw: dict
    variant: str = ""  # ImageNet-V2's release (sources.V2_VARIANTS), '' when none or not known
    stats: ShardingStats | None = None  # the run that wrote it (write_shards); None when read

    @classmethod
    def from_raw(cls, path: str, raw: dict, stats: ShardingStats | None = None) -> "Manifest":
        """The manifest of its JSON ``raw``, read from or written to ``path``."""
        return cls(path, raw["split"], raw.get("layout", ""), raw["classes"],
                   [Shard.from_record(r) for r in raw["shards"]],
                   raw["total_samples"], raw.get("skipped", []), raw.get("empty_classes", []),
                   raw.get("max_pixels", DEFAULT_MAX_PIXELS), raw, raw.get("variant", ""),
                   stats)

    @property
    def shard_paths(self) -> list[str]:
        """Shard locations: manifests name shards relative to themselves."""
        return shard_paths(self.path, self)


def data_fingerprint(manifest: Manifest) -> str:
    """SHA-256 over what a manifest's data is: its split, its class ids in index order and each
    shard's sha256 and sample count, in order. Not over where the source or the shards live: the
    same images sharded from a moved source folder, or a copied shard folder, give the same
    fingerprint (the manifest file's own sha256 differs)."""
    import hashlib

    body = {"split": manifest.split, "classes": [c["id"] for c in manifest.classes],
            "shards": [[s.sha256, s.samples] for s in manifest.shards]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load_manifest(path: str) -> Manifest:
    """Read a manifest; raise FileNotFoundError for a missing file and InputError, naming the
    file, for one that is malformed, of another format or version, or lists no samples."""
    if storage.is_dir(path):
        found = ", ".join(storage.basename(m) for m in find_manifests(path)) or "none"
        raise InputError(f"{path} is a folder: pass its manifest, {path.rstrip('/')}/<split>.json "
                         f"(found: {found})")
    try:
        raw = storage.read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {path} does not exist") from None
    except InputError as e:  # not UTF-8 text, not JSON
        raise InputError(f"manifest {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InputError(f"manifest {path} is not a {FORMAT} manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise InputError(f"manifest {path} has format version {raw.get('format_version')}; "
                         f"this code reads version {FORMAT_VERSION}: reshard with jobs.shard")
    if raw["total_samples"] == 0 or not raw["shards"]:
        raise InputError(f"manifest {path} lists no samples (split {raw['split']!r} is empty)")
    return Manifest.from_raw(path, raw)


def find_manifests(folder: str) -> list[str]:
    """The shard manifests (``<split>.json`` of this format) directly in ``folder``, sorted."""
    found = []
    for name in sorted(storage.list_dir_files(folder)):
        if name.endswith(".json"):
            path = storage.join(folder, name)
            try:
                head = storage.read_json(path)
            except InputError:  # not text, not JSON: not a manifest
                continue
            if isinstance(head, dict) and head.get("format") == FORMAT:
                found.append(path)
    return found


def shard_paths(manifest_path: str, manifest: Manifest) -> list[str]:
    """Shard locations of the manifest read at ``manifest_path``: manifests name shards
    relative to themselves."""
    base = storage.dirname(manifest_path)
    return [storage.join(base, s.file) for s in manifest.shards]


def read_tar_samples(data: bytes, name: str) -> list[tuple[str, dict[str, bytes]]]:
    """Group a shard's members by key, checking WebDataset's adjacency rule and that every
    member is an image, ``cls`` or ``json`` (``tarindex.read_members``); raise on damage."""
    samples = tarindex.read_members(data, name)
    for key, members in samples:
        for ext in members:
            if ext not in MEMBER_EXTS:
                raise InputError(f"{name}: member {key}.{ext} is not an image, .cls or "
                                 f".json (refused, never unpickled)")
    return samples


def integrity_problem(rec: Shard, path: str, data: bytes | None = None) -> str | None:
    """The one size + sha256 check of a shard against its record (``bytes``, ``sha256``):
    None when it matches, else what is wrong. ``data``: the shard's bytes when the caller has
    read them already; else the file is streamed from ``path``."""
    if data is None and not storage.exists(path):
        return "missing"
    size = len(data) if data is not None else storage.size(path)
    if size != rec.bytes:
        return f"size {size} bytes, manifest says {rec.bytes}"
    sha = hashlib.sha256(data).hexdigest() if data is not None else storage.sha256_file(path)
    if sha != rec.sha256:
        return "sha256 does not match the manifest"
    return None


def _checksum_problem(rec: Shard, path: str) -> str | None:
    problem = integrity_problem(rec, path)
    return f"{path}: {problem}" if problem else None


def check_checksums(manifest_path: str, manifest: Manifest) -> None:
    """Size and sha256 of every shard, one Ray task each; raise naming every bad shard. Cheap
    next to decoding, and the only check that catches a flipped bit inside an image."""
    Checksums(manifest_path, manifest).raise_if_bad(wait=True)


class Checksums:
    """``check_checksums`` in the background: one Ray task a shard, at most ``in_flight`` at a
    time (None: all at once), each reserving ``num_cpus``; ``raise_if_bad`` collects what has
    ended, starts the next ones, and raises once any has found a bad shard.

    A prediction run starts them at its first batch and asks before it publishes, one task at
    a time reserving no CPU: they time-share the cores with the run and never hold a CPU that
    its decode tasks or predictor actors wait for. At 50,000 images (10 shards, 5.3 GB) ten
    1-CPU tasks submitted with the dataset took both CPUs of a 2-CPU cluster for ~9 s before
    the first batch (checking first, before that, was most of 28.7 s)."""

    def __init__(self, manifest_path: str, manifest: Manifest, in_flight: int | None = None,
                 num_cpus: float = 1.0):
        import ray

        self.task = ray.remote(num_cpus=num_cpus)(_checksum_problem)
        self.manifest_path, self.problems, self.pending = manifest_path, [], []
        self.todo = list(zip(manifest.shards, manifest.shard_paths))
        self.in_flight = in_flight
        self._submit()

    def _submit(self, everything: bool = False) -> None:
        room = len(self.todo) if everything or self.in_flight is None else max(
            0, self.in_flight - len(self.pending))
        self.pending += [self.task.remote(rec, path) for rec, path in self.todo[:room]]
        self.todo = self.todo[room:]

    def raise_if_bad(self, wait: bool = False) -> None:
        """InputError naming every bad shard found so far (all of them with ``wait``: after
        every task has ended); nothing when none is."""
        import ray

        if wait:
            self._submit(everything=True)
        if self.pending:
            ready, self.pending = ray.wait(self.pending, num_returns=len(self.pending),
                                           timeout=None if wait else 0)
            self.problems += [p for p in ray.get(ready) if p]
        self._submit()
        if self.problems:
            raise InputError("shards do not match their manifest: " + "; ".join(self.problems)
                             + f". Reshard, or run `python -m jobs.shard --verify "
                               f"{self.manifest_path}`")


def verify_shards(manifest_path: str) -> list[str]:
    """Recheck every shard against its manifest; return one problem line per bad shard."""
    manifest = load_manifest(manifest_path)
    n_classes = len(manifest.classes)
    problems = []
    for rec, path in zip(manifest.shards, manifest.shard_paths):
        problem = _verify_one(rec, path, n_classes)
        if problem:
            problems.append(f"{path}: {problem}")
    return problems


def _verify_one(rec: Shard, path: str, n_classes: int) -> str | None:
    if not storage.exists(path):
        return "missing"
    data = storage.read_bytes(path)
    problem = integrity_problem(rec, path, data)
    if problem:
        return problem
    try:
        samples = read_tar_samples(data, rec.file)
    except ValueError as e:
        return str(e)
    if len(samples) != rec.samples:
        return f"{len(samples)} samples, manifest says {rec.samples}"
    if samples[0][0] != rec.first_key or samples[-1][0] != rec.last_key:
        return "first/last key differ from the manifest"
    for key, parts in samples:
        try:
            validate_sample(parts, n_classes)
        except ValueError as e:
            return f"sample {key}: {e}"
    return None


def validate_sample(parts: dict, num_classes: int) -> tuple[str, int]:
    """The one rule for a stored sample (contract 1 in docs/DESIGN.md), used by ``--verify``
    and by decoding: members are an image, ``cls`` and optionally ``json`` (anything else is
    refused, never unpickled); exactly one image; ``cls`` ASCII digits in 0..num_classes-1.
    ``parts`` maps member extensions to bytes (other keys, such as WebDataset's ``__key__``, and
    None values are ignored). Returns (the image's extension, the label); raises InputError
    naming what is wrong."""
    present = {k for k, v in parts.items() if not k.startswith("__") and isinstance(v, bytes)}
    extra = present - MEMBER_EXTS
    if extra:
        raise InputError(f"unexpected member(s) {sorted(extra)} refused (never unpickled)")
    found = [k for k in images.MEMBER_IMAGE_EXTS if k in present]
    if len(found) != 1:
        raise InputError(f"expected one image member, found {found or 'none'}")
    if "cls" not in present:
        raise InputError("no .cls member")
    text = parts["cls"].decode("ascii", "replace").strip()
    if not text.isdigit() or not 0 <= int(text) < num_classes:
        raise InputError(f"label {text!r} outside the class range 0..{num_classes - 1}")
    return found[0], int(text)
