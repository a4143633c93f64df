"""Shard writing: contract 1 (bytes, keys, labels, headers, order), bad inputs, verify, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from jobs import shard as shard_job
from pipeline import images, shards, sources
from pipeline.errors import InputError
from tests.conftest import photo_like, run_job


def _source_files(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            out[os.path.relpath(os.path.join(dirpath, f), root)] = open(
                os.path.join(dirpath, f), "rb").read()
    return out


def test_shards_hold_original_bytes_labels_and_metadata(shard_set, image_tree):
    manifest = shards.load_manifest(str(shard_set / "val.json"))
    originals = _source_files(image_tree / "val")
    index = {c["id"]: c["index"] for c in manifest.classes}
    seen = []
    urls = [str(shard_set / s.file) for s in manifest.shards]
    for sample in wds.WebDataset(urls, shardshuffle=False):  # the webdataset library reads them
        meta = json.loads(sample["json"])
        assert sample["jpg"] == originals[meta["path"]]  # never re-encoded
        assert int(sample["cls"]) == index[meta["class_id"]]
        assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(sample["jpg"])).size
        seen.append(sample["__key__"])
    assert seen == sorted(seen) and len(seen) == manifest.total_samples == len(originals)
    assert all("." not in k for k in seen)


def test_ray_data_reads_the_same_samples(shard_set, ray_local):
    import ray

    manifest = shards.load_manifest(str(shard_set / "train.json"))
    paths = shards.shard_paths(str(shard_set / "train.json"), manifest)
    rows = ray.data.read_webdataset(paths, decoder=None).take_all()
    with_wds = {s["__key__"]: s for s in wds.WebDataset(paths, shardshuffle=False)}
    assert len(rows) == manifest.total_samples == len(with_wds)
    for r in rows:
        assert r["jpg"] == with_wds[r["__key__"]]["jpg"] and r["cls"] == with_wds[r["__key__"]]["cls"]


def test_train_is_a_seeded_permutation_and_headers_are_deterministic(image_tree, tmp_path,
                                                                    ray_local):
    src = sources.scan_source(str(image_tree / "train"), "train")
    a = shards.write_shards(src, str(tmp_path / "a"), samples_per_shard=12, progress=False)
    b = shards.write_shards(src, str(tmp_path / "b"), samples_per_shard=12, progress=False)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    keys = [m.name.split(".")[0] for s in a.shards
            for m in tarfile.open(tmp_path / "a" / s.file) if m.name.endswith(".cls")]
    assert sorted(keys) != keys and len(set(keys)) == len(keys) == 32
    for m in tarfile.open(tmp_path / "a" / a.shards[0].file):
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    c = shards.write_shards(src, str(tmp_path / "c"), samples_per_shard=12, seed=1,
                            progress=False)
    assert c.shards[0].sha256 != a.shards[0].sha256


def _jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture
def bad_tree(tmp_path):
    """One class folder full of the files real datasets contain."""
    rng = np.random.default_rng(0)
    d = tmp_path / "src" / "n01440764"
    d.mkdir(parents=True)
    good = _jpeg_bytes(photo_like(rng, 80, 60))
    files = {
        "good.JPEG": good,
        "cmyk.JPEG": _jpeg_bytes(photo_like(rng, 80, 60, "CMYK")),
        "gray.jpg": _jpeg_bytes(photo_like(rng, 80, 60, "L")),
        "empty.JPEG": b"",
        "truncated.JPEG": good[: len(good) // 2],
        "notes.txt": b"not an image at all",
        "key.with.dots.jpg": _jpeg_bytes(photo_like(rng, 50, 70)),
    }
    png = io.BytesIO()
    photo_like(rng, 64, 48).save(png, format="PNG")
    files["png_named.JPEG"] = png.getvalue()
    pal = io.BytesIO()
    photo_like(rng, 64, 48).convert("P").save(pal, format="PNG")
    files["palette.png"] = pal.getvalue()
    bomb = io.BytesIO()
    Image.new("L", (12000, 9000)).save(bomb, format="PNG")  # 108 Mpixel, ~100 KB compressed
    files["bomb.png"] = bomb.getvalue()
    for name, data in files.items():
        (d / name).write_bytes(data)
    return tmp_path / "src"


@pytest.mark.parametrize("check", images.CHECKS)
def test_bad_inputs_are_stored_with_their_real_format_or_skipped_with_a_reason(
        bad_tree, tmp_path, ray_local, check):
    m = shards.write_shards(sources.scan_source(str(bad_tree), "train"), str(tmp_path / "out"),
                            progress=False, check=check)
    assert m.raw["check"] == check
    members = {}
    for s in m.shards:
        for info in tarfile.open(tmp_path / "out" / s.file):
            key, ext = info.name.split(".", 1)
            members.setdefault(key, set()).add(ext)
    assert members == {"good": {"jpg", "cls", "json"}, "cmyk": {"jpg", "cls", "json"},
                       "gray": {"jpg", "cls", "json"}, "png_named": {"png", "cls", "json"},
                       "palette": {"png", "cls", "json"},
                       "key_with_dots": {"jpg", "cls", "json"}}
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in m.skipped}
    assert reasons.keys() == {"empty.JPEG", "truncated.JPEG", "notes.txt", "bomb.png"}
    assert "0 bytes" in reasons["empty.JPEG"]
    assert "truncated" in reasons["truncated.JPEG"]
    assert "not an image" in reasons["notes.txt"]
    assert "decompression" in reasons["bomb.png"]
    assert m.total_samples + len(m.skipped) == 10  # nothing dropped silently


def _with_thumbnail(jpeg: bytes, thumb: bytes) -> bytes:
    """``jpeg`` with a whole JPEG (its own SOS and EOI) inside an APP1 segment, as an EXIF
    thumbnail sits."""
    payload = b"Exif\x00\x00" + thumb
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def _header_check(data: bytes) -> str:
    try:
        images.inspect_image(data, check="header")
    except images.BadImage as e:
        return f"skipped: {e}"
    return "stored"


def test_header_check_skips_truncated_files_and_keeps_trailing_bytes():
    rng = np.random.default_rng(1)
    img = photo_like(rng, 200, 150)
    jpeg, progressive = _jpeg_bytes(img), _jpeg_bytes(img, progressive=True)
    png = io.BytesIO()
    img.save(png, format="PNG")
    png = png.getvalue()
    thumbed = _with_thumbnail(jpeg, _jpeg_bytes(img.resize((40, 30))))
    assert _header_check(jpeg) == _header_check(progressive) == _header_check(png) == "stored"
    assert _header_check(thumbed) == "stored"
    truncated = {"JPEG cut mid-scan": jpeg[: len(jpeg) // 2],
                 "JPEG missing only its EOI": jpeg[:-2],
                 "progressive JPEG cut between scans": progressive[: len(progressive) // 2],
                 # the thumbnail's EOI must not pass for the image's own
                 "JPEG with a thumbnail, cut mid-scan": thumbed[: len(thumbed) - len(jpeg) // 2],
                 "PNG cut mid-IDAT": png[: len(png) // 2],
                 "PNG missing the end of its IEND chunk": png[:-1]}
    for case, data in truncated.items():
        assert _header_check(data).startswith("skipped: truncated"), case
    # Bytes after the end marker (padding, camera trailers, an appended video) are allowed.
    trailer = bytes(rng.integers(0, 256, 100_000, dtype=np.uint8))
    for data in (jpeg + bytes(4096), jpeg + b"\xff\xd9" + trailer, jpeg + trailer, png + trailer):
        assert _header_check(data) == "stored"
    info = images.inspect_image(jpeg + trailer, check="header")
    assert (info["ext"], info["width"], info["height"], info["mode"]) == ("jpg", 200, 150, "RGB")


def test_a_jpeg_with_bytes_after_its_eoi_is_stored_unchanged_at_both_levels(tmp_path):
    d = tmp_path / "src" / "c"
    d.mkdir(parents=True)
    data = _jpeg_bytes(photo_like(np.random.default_rng(2), 64, 48)) + b"\x00" * 1000 + b"junk"
    (d / "padded.jpg").write_bytes(data)
    for check in images.CHECKS:
        tar_bytes, keys, skipped, _, exts = shards.build_shard(
            str(tmp_path / "src"), [shards.Member("padded", "c/padded.jpg", "c")], {"c": 0},
            shards.DEFAULT_MAX_PIXELS, check)
        assert keys == ["padded"] and skipped == [] and exts == {"jpg": 1}
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            assert tar.extractfile("padded.jpg").read() == data


def test_decode_check_still_reports_the_decoder_error():
    good = _jpeg_bytes(photo_like(np.random.default_rng(3), 64, 48))
    with pytest.raises(images.BadImage, match="cannot decode: image file is truncated"):
        images.inspect_image(good[: len(good) // 2], check="decode")
    with pytest.raises(ValueError, match="check must be one of"):
        images.inspect_image(good, check="full")


def test_tar_writer_gives_the_bytes_tarfile_writes():
    rng = np.random.default_rng(4)
    members = [("a.jpg", rng.bytes(1000)), ("a.cls", b"3"), ("a.json", b"{}"), ("b.jpg", b""),
               ("x" * 100 + ".jpg", rng.bytes(512)), ("\u00e9t\u00e9.cls", b"1"),
               ("c.jpg", rng.bytes(30000))]
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    ours = shards._TarWriter()
    for name, data in members:
        ours.add(name, data)
    assert ours.getvalue() == ref.getvalue()


def test_unreadable_file_is_skipped_with_its_reason(bad_tree, monkeypatch):
    real = shards.storage.read_bytes

    def read(path):
        if path.endswith("good.JPEG"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(shards.storage, "read_bytes", read)
    members = [shards.Member("good", "n01440764/good.JPEG", "n01440764")]
    _, keys, skipped, _, _ = shards.build_shard(str(bad_tree), members, {"n01440764": 0},
                                                shards.DEFAULT_MAX_PIXELS)
    assert keys == [] and "unreadable" in skipped[0]["reason"]


def test_duplicate_stems_across_classes_get_class_prefixed_keys():
    members = shards.make_keys([("a/1.jpg", "a"), ("b/1.jpg", "b"), ("b/2.jpg", "b"),
                                ("b/2.png", "b")])
    assert len(members) == 4  # nothing dropped
    keys = {m.path: m.key for m in members}
    assert keys["a/1.jpg"] == "a_1" and keys["b/1.jpg"] == "b_1"
    # the same stem twice in one folder: both stored, keys from the whole path
    assert keys["b/2.jpg"] == "b_s2_djpg" and keys["b/2.png"] == "b_s2_dpng"


@pytest.mark.parametrize("paths", [
    ["x/a.b.jpg", "x/a_b.jpg"],                      # dots become '_': the same stem
    ["x/img.jpg", "x/img.png"],                      # same stem, two formats
    ["x/a_b.jpg", "x/a.b.jpg", "x_a/b.jpg", "x/a/b.jpg", "x/a_b", "x/a/b"],
    ["n01/x.JPEG", "n02/x.JPEG", "n01_x.JPEG/y.jpg"],
    [f"c{i % 3}/img.{ext}" for i in range(9) for ext in ("jpg",)][:3] + ["c0/img.png"],
])
def test_keys_are_unique_dot_free_and_nothing_is_dropped(paths):
    members = shards.make_keys([(p, p.split("/")[0]) for p in paths])
    keys = [m.key for m in members]
    assert len(members) == len(paths)  # nothing dropped
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys), keys


def test_imagenet_keys_stay_the_file_stems():
    members = shards.make_keys([("n01440764/n01440764_10026.JPEG", "n01440764"),
                                ("ILSVRC2012_val_00000001.JPEG", "n01751748")])
    assert [m.key for m in members] == ["n01440764_10026", "ILSVRC2012_val_00000001"]


def test_verify_names_damaged_shards_and_a_rerun_repairs_them(image_tree, tmp_path, ray_local,
                                                             capsys):
    out = tmp_path / "out"
    args = ["--source", str(image_tree / "train"), "--out", str(out), "--split", "train",
            "--samples-per-shard", "8", "--no-progress"]
    assert shard_job.main(args) == 0
    manifest = str(out / "train.json")
    assert shard_job.main(["--verify", manifest]) == 0
    corrupt, truncated, deleted = out / "train-000000.tar", out / "train-000001.tar", \
        out / "train-000002.tar"
    data = bytearray(corrupt.read_bytes())
    data[2000] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:10240])  # cut at a 512-byte tar boundary
    deleted.unlink()
    capsys.readouterr()
    assert shard_job.main(["--verify", manifest]) == 1
    report = capsys.readouterr().out
    for p in (corrupt, truncated, deleted):
        assert str(p) in report
    assert "train-000003.tar" not in report
    assert shard_job.main(args) == 0  # the rerun rewrites exactly the three damaged shards
    assert "4 shards (1 reused)" in capsys.readouterr().out
    assert shard_job.main(["--verify", manifest]) == 0


def test_rerun_reuses_intact_shards(image_tree, tmp_path, ray_local):
    src = sources.scan_source(str(image_tree / "train"), "train")
    shards.write_shards(src, str(tmp_path), samples_per_shard=8, progress=False)
    os.remove(tmp_path / "train-000001.tar")
    again = shards.write_shards(src, str(tmp_path), samples_per_shard=8, progress=False)
    assert again.stats.reused == len(again.shards) - 1
    assert hashlib.sha256((tmp_path / "train-000001.tar").read_bytes()).hexdigest() == \
        again.shards[1].sha256


def test_manifest_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        shards.load_manifest(str(bad))
    bad.write_text(json.dumps({"format": shards.FORMAT, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        shards.load_manifest(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards.load_manifest(str(tmp_path / "missing.json"))
    # A binary file where a manifest belongs (a shard, an image) is bad input, not a bug: the
    # project's InputError naming the file (a bare UnicodeDecodeError would keep its traceback).
    bad.write_bytes(b"\xff\xd8\xff\xe0 not text")
    with pytest.raises(InputError, match="bad.json is not UTF-8 text"):
        shards.load_manifest(str(bad))


def test_verify_and_decoding_apply_one_sample_rule(shard_set, tmp_path, capsys):
    """A sample holding two images passed --verify and failed decoding: one validator now."""
    import shutil

    from pipeline import data
    from tests.conftest import read_tar_members, write_tar_members

    out = tmp_path / "s"
    shutil.copytree(shard_set, out)
    m = json.loads((out / "val.json").read_text())
    path = out / m["shards"][0]["file"]
    members = read_tar_members(path)
    info, payload = next((i, d) for i, d in members if i.name.endswith(".jpg"))
    extra = tarfile.TarInfo(info.name.replace(".jpg", ".png"))
    at = [i.name for i, _ in members].index(info.name)
    members.insert(at + 1, (extra, payload))
    write_tar_members(path, members)
    rec = m["shards"][0]
    rec["bytes"], rec["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "val.json").write_text(json.dumps(m))
    problems = shards.verify_shards(str(out / "val.json"))
    assert len(problems) == 1 and "expected one image member, found ['jpg', 'png']" in problems[0]
    row = {"__key__": "k", "jpg": payload, "png": payload, "cls": b"0"}
    with pytest.raises(ValueError, match=r"expected one image member, found \['jpg', 'png'\]"):
        data._sample_image(row, 4)


def test_verify_takes_a_folder_of_manifests(shard_set, capsys):
    assert shard_job.main(["--verify", str(shard_set)]) == 0
    out = capsys.readouterr().out
    assert f"OK: 0 bad shard(s) in {shard_set / 'train.json'}" in out
    assert f"OK: 0 bad shard(s) in {shard_set / 'val.json'}" in out


# --- jobs.shard on a real-world folder, and its flags -------------------------------------

def test_a_folder_with_system_and_hidden_files_shards_with_default_flags(tmp_path, ray_local,
                                                                         capsys):
    """.DS_Store, Thumbs.db and a top-level README are in most real folders: listed in the
    manifest, never counted as skipped images (they made the default threshold of 0 fail)."""
    from jobs import shard as shard_job
    from pipeline import synthetic

    synthetic.generate_image_folder(str(tmp_path / "img"), {"train": 2}, num_classes=2, seed=5,
                                    size_range=(48, 64))
    root = tmp_path / "img" / "train"
    for junk in (".DS_Store", "circle/.DS_Store", "square/Thumbs.db", "README.txt"):
        (root / junk).write_bytes(b"\x00junk")
    code, out = run_job(shard_job.main, ["--source", str(root), "--out", str(tmp_path / "s"),
                                      "--no-progress"], capsys)
    assert code == 0, out
    m = json.loads((tmp_path / "s" / "train.json").read_text())
    assert m["total_samples"] == 4 and len(m["skipped"]) == 4
    assert "4 hidden or system files, or files outside the class folders" in out
    (root / "circle" / "broken.jpg").write_bytes(b"not a jpeg")  # a real image lost: counted
    code, out = run_job(shard_job.main, ["--source", str(root), "--out", str(tmp_path / "s"),
                                      "--no-progress"], capsys)
    assert code == 1 and "1 of 5 source files were skipped" in out


def test_fraction_flags_refuse_a_percentage(capsys):
    from jobs import shard as shard_job

    with pytest.raises(SystemExit) as e:
        shard_job.main(["--source", "x", "--out", "y", "--max-skipped-fraction", "25"])
    assert e.value.code == 2
    assert "is a fraction in [0, 1] (0.05 is 5%), not 25" in capsys.readouterr().err


def _labels(manifest: str) -> dict[str, int]:
    """key -> label over every shard of a manifest, read with webdataset."""
    m = shards.load_manifest(manifest)
    out = {}
    for path in m.shard_paths:
        for sample in wds.WebDataset(path, shardshuffle=False):
            out[sample["__key__"]] = int(sample["cls"])
    return out


def test_a_flat_folder_of_wnid_named_images_shards_with_their_labels(tmp_path, ray_local,
                                                                     capsys):
    wnids = sources.imagenet_wnids()
    src = tmp_path / "sample-images"
    src.mkdir()
    picks = {0: "n01440764_tench", 7: f"{wnids[7]}_10026", 999: f"{wnids[999]}_77"}
    for i, (index, stem) in enumerate(picks.items()):
        photo_like(np.random.default_rng(i), 64, 48).save(src / f"{stem}.JPEG")
    code, out = run_job(shard_job.main, ["--source", str(src), "--out", str(tmp_path / "s"),
                                         "--split", "val", "--no-progress"], capsys)
    assert code == 0, out
    assert "layout wnid-files, 1000 classes" in out
    assert _labels(str(tmp_path / "s" / "val.json")) == {s: i for i, s in picks.items()}


def test_digit_folders_shard_as_ten_classes_with_a_warning(tmp_path, ray_local, capsys):
    src = tmp_path / "digits"
    for d in range(10):
        (src / str(d)).mkdir(parents=True)
        photo_like(np.random.default_rng(d), 28, 28).save(src / str(d) / f"img{d}.png")
    code, out = run_job(shard_job.main, ["--source", str(src), "--out", str(tmp_path / "s"),
                                         "--split", "train", "--no-progress"], capsys)
    assert code == 0, out
    assert out.startswith("warning: the 10 class folders are integers") and \
        "--layout imagenet-v2" in out
    assert "layout folder, 10 classes" in out
    assert _labels(str(tmp_path / "s" / "train.json")) == {f"img{d}": d for d in range(10)}


def test_checksums_one_at_a_time_still_check_every_shard_and_name_the_bad_one(shard_set, tmp_path,
                                                                            ray_local):
    """How a prediction run checks its shards (predict._checksums): one task at a time, no CPU
    reserved; every shard is still checked before the answer, and a flipped byte is named."""
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(shard_set, folder)
    manifest = shards.load_manifest(str(folder / "train.json"))
    assert len(manifest.shards) == 3
    checks = shards.Checksums(str(folder / "train.json"), manifest, in_flight=1, num_cpus=0)
    assert len(checks.pending) == 1 and len(checks.todo) == 2
    checks.raise_if_bad(wait=True)  # all good: no error, nothing left
    assert not checks.pending and not checks.todo
    last = folder / manifest.shards[-1].file
    data = bytearray(last.read_bytes())
    data[1500] ^= 1
    last.write_bytes(bytes(data))
    checks = shards.Checksums(str(folder / "train.json"), manifest, in_flight=1, num_cpus=0)
    with pytest.raises(InputError, match=f"{manifest.shards[-1].file}: sha256 does not match"):
        checks.raise_if_bad(wait=True)
