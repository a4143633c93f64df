"""The shards' sample index and the chunked reader (pipeline/tarindex.py, data.shard_chunks):
every sample read exactly once, in order, whatever the chunk size; old manifests without an index
read the same; a wrong index or a short shard is named, never read as other samples."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipeline import data, shards, sources, synthetic, tarindex
from pipeline.errors import InputError


def _tar(samples: list[tuple[str, dict[str, bytes]]], pax_every: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, (key, members) in enumerate(samples):
            for ext, body in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                if pax_every and i % pax_every == 0:  # an extended header before the member
                    info.pax_headers = {"comment": "y" * 300}
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _samples(n: int) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"k{i:05d}", {"jpg": bytes([i % 251]) * (100 + 37 * i), "cls": b"1",
                           "json": b"{}"}) for i in range(n)]


@pytest.mark.parametrize("n,every,chunk", [(1, 64, 64), (64, 64, 64), (65, 64, 64),
                                           (300, 64, 256), (300, 7, 10), (129, 64, 1)])
def test_chunks_cover_every_sample_once_in_order(tmp_path, n, every, chunk):
    samples = _samples(n)
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(samples, pax_every=5))
    index = tarindex.sample_index_of_bytes(path.read_bytes(), every)
    chunks = tarindex.chunks_of(str(path), n, index, chunk)
    assert sum(c.samples for c in chunks) == n
    assert [c.first for c in chunks] == sorted(c.first for c in chunks)
    got = []
    for c in chunks:
        table = data.read_chunk(c)
        assert table.num_rows == c.samples
        got += list(zip(table["__key__"].to_pylist(), table["jpg"].to_pylist()))
    assert got == [(k, m["jpg"]) for k, m in samples]


def test_index_not_fitting_the_sample_count_is_refused(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(_samples(100)))
    index = tarindex.sample_index_of_bytes(path.read_bytes(), 64)
    with pytest.raises(InputError, match="sample index .* does not fit its 200 samples"):
        tarindex.chunks_of(str(path), 200, index)


def test_a_truncated_shard_is_named(tmp_path):
    path = tmp_path / "s.tar"
    body = _tar(_samples(10))
    index = tarindex.sample_index_of_bytes(body, 64)
    path.write_bytes(body[:len(body) // 2 + 700])  # mid-member
    (chunk,) = tarindex.chunks_of(str(path), 10, index)
    with pytest.raises(InputError,
                       match=r"s\.tar: (ends at byte .*\(truncated\)|not a readable tar)"):
        data.read_chunk(chunk)


def test_a_shard_rewritten_since_its_index_reads_as_it_is_now(tmp_path, caplog):
    # (--no-verify-checksums) one image cut short, the tar still valid: every offset after it
    # moved; the chunks still read every sample once, by the shard's own headers, with a line
    samples = _samples(150)
    path = tmp_path / "s.tar"
    index = tarindex.sample_index_of_bytes(_tar(samples), 64)
    samples[40][1]["jpg"] = samples[40][1]["jpg"][:20]  # 1,580 bytes to 20: 3 blocks fewer
    path.write_bytes(_tar(samples))
    got = [k for c in tarindex.chunks_of(str(path), 150, index)
           for k in data.read_chunk(c)["__key__"].to_pylist()]
    assert got == [k for k, _ in samples]
    assert "does not fit its manifest's sample index" in caplog.text


def test_shard_writes_the_index_and_an_old_manifest_without_one_reads_the_same(
        image_tree, tmp_path, ray_local):
    m = shards.write_shards(sources.scan_source(str(image_tree / "train"), "train"),
                            str(tmp_path), samples_per_shard=12, progress=False)
    assert all(s.index["offsets"][0] == 0 and s.index["every"] == tarindex.INDEX_EVERY
               for s in m.shards)
    manifest = shards.load_manifest(str(tmp_path / "train.json"))

    def keys(man):
        ds = data.shard_chunks(man, chunk_samples=1)
        import ray

        rows = ray.data.read_datasource(ds).take_all()
        return sorted(r["__key__"] for r in rows)

    new = keys(manifest)
    raw = json.loads((tmp_path / "train.json").read_text())
    for s in raw["shards"]:
        del s["index"]  # as jobs.shard wrote them before the index
    (tmp_path / "train.json").write_text(json.dumps(raw))
    assert keys(shards.load_manifest(str(tmp_path / "train.json"))) == new
    assert len(new) == m.total_samples == len(set(new))


def test_a_rerun_of_shard_adds_the_index_to_shards_it_reuses(image_tree, tmp_path, ray_local):
    src = sources.scan_source(str(image_tree / "val"), "val")
    shards.write_shards(src, str(tmp_path), samples_per_shard=8, progress=False)
    for part in (tmp_path / "_parts").glob("*.json"):  # records from before the index
        rec = json.loads(part.read_text())
        del rec["index"]
        part.write_text(json.dumps(rec))
    m = shards.write_shards(src, str(tmp_path), samples_per_shard=8, progress=False)
    assert all(s.index["offsets"][0] == 0 for s in m.shards)
    assert m.stats.reused == len(m.shards)


def test_chunk_order_is_the_manifests_or_a_fresh_draw_each_execution():
    chunks = list(range(40))
    assert data.chunk_order(chunks, None, 3) == chunks
    first, second = data.chunk_order(chunks, 7, 0), data.chunk_order(chunks, 7, 1)
    assert sorted(first) == chunks and first != chunks and first != second
    assert data.chunk_order(chunks, 7, 1) == second


def test_photo_shard_chunks_are_one_batch_each(tmp_path, ray_local):
    synthetic.generate_photo_folder(str(tmp_path / "img"), 150, num_classes=3)
    shards.write_shards(sources.scan_source(str(tmp_path / "img"), "val"), str(tmp_path / "s"),
                        progress=False)  # one shard of 150, the default samples per shard
    man = shards.load_manifest(str(tmp_path / "s" / "val.json"))
    (rec,) = man.shards
    chunks = tarindex.chunks_of(man.shard_paths[0], rec.samples, rec.index)
    assert [c.samples for c in chunks] == [64, 64, 22]


def _with_long_name(samples):
    """``samples`` with one key over 100 characters: jobs.shard writes a PAX header for it."""
    return samples[:2] + [("k" * 120, samples[2][1])] + samples[3:]


@pytest.mark.parametrize("samples", [_samples(40), _with_long_name(_samples(40))],
                         ids=["ustar", "one PAX header"])
def test_the_direct_ustar_reader_gives_what_tarfile_gives_on_shards_jobs_shard_writes(samples):
    """read_members slices the plain ustar members jobs.shard writes itself and leaves every
    other header (here the PAX one of a long key) to tarfile: the same samples either way."""
    w = shards._TarWriter()
    for key, members in samples:
        for ext, body in members.items():
            w.add(f"{key}.{ext}", body)
    data = w.getvalue()
    direct = tarindex._ustar_members(data)
    assert (direct is None) == any(len(k) > 100 for k, _ in samples)
    assert tarindex.read_members(data, "s.tar") == tarindex._tarfile_members(data, "s.tar") \
        == samples


@pytest.mark.parametrize("damage", ["checksum", "size past the end", "a directory member"])
def test_a_header_the_direct_reader_does_not_take_goes_to_tarfile(damage):
    w = shards._TarWriter()
    for key, members in _samples(3):
        for ext, body in members.items():
            w.add(f"{key}.{ext}", body)
    data = bytearray(w.getvalue())
    if damage == "checksum":
        data[0] ^= 1  # the first member's name: its checksum no longer fits
    elif damage == "size past the end":
        data[124:136] = b"%011o\x00" % (len(data) * 2)
    else:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        data[0:0] = info.tobuf(tarfile.USTAR_FORMAT)
    assert tarindex._ustar_members(bytes(data)) is None
    if damage == "a directory member":  # skipped by tarfile, as before
        assert tarindex.read_members(bytes(data), "s.tar") == _samples(3)
    else:
        with pytest.raises(InputError, match="s.tar: not a readable tar"):
            tarindex.read_members(bytes(data), "s.tar")
