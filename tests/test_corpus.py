"""The bad-input corpus, run through the real jobs; its outcomes are the table in
docs/RELIABILITY.md.

Each case builds one bad input, runs the job a user would run, asserts the expected outcome and
records what was observed. The last test renders the rows as Markdown and checks that
docs/RELIABILITY.md carries exactly that table (``make readme-tables`` rewrites it from a fresh run).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import predict as predict_job, shard as shard_job
from pipeline import shards
from pipeline.errors import InputError
from tests.conftest import (check_readme_table, photo_like, read_tar_members, render_table,
                            write_tar_members)

ROWS: list[tuple[str, str, str]] = []


def record(case: str, job: str, outcome: str) -> None:
    ROWS.append((case, job, " ".join(outcome.split())))


def _run(main, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _short(text: str, tmp: str) -> str:
    """The first error line, with temporary paths shortened so the table is stable."""
    line = next((ln for ln in text.splitlines() if ln.startswith("error:") or "BAD" in ln), text)
    return line.replace(tmp + "/", "").replace(tmp, "")[:230]


# ---------------------------------------------------------------- source files (jobs.shard)

def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _source_corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    good = _jpeg(photo_like(rng, 96, 64))
    png, pal, bomb = io.BytesIO(), io.BytesIO(), io.BytesIO()
    photo_like(rng, 64, 48).save(png, format="PNG")
    photo_like(rng, 64, 48).convert("P").save(pal, format="PNG")
    Image.new("L", (12000, 9000)).save(bomb, format="PNG")
    exif = bytearray(_jpeg(photo_like(rng, 80, 60), exif=b"Exif\x00\x00MM\x00*" + b"\xff" * 40))
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 64] = rng.bytes(64)
    return {"corrupt JPEG (random bytes mid-stream)": ("corrupt.jpg", bytes(corrupt)),
            "truncated JPEG": ("truncated.JPEG", good[: len(good) // 2]),
            "CMYK JPEG": ("cmyk.JPEG", _jpeg(photo_like(rng, 80, 60, "CMYK"))),
            "PNG named .JPEG": ("png_named.JPEG", png.getvalue()),
            "grayscale JPEG": ("gray.JPEG", _jpeg(photo_like(rng, 80, 60, "L"))),
            "palette PNG": ("palette.png", pal.getvalue()),
            "0-byte file": ("empty.JPEG", b""),
            "decompression bomb (108 Mpixel PNG)": ("bomb.png", bomb.getvalue()),
            "corrupt EXIF block": ("exif.jpg", bytes(exif)),
            "non-image file": ("notes.txt", b"hello"),
            "upper-case extension, dots in the name": ("a.b.JPG", good)}


def test_source_corpus_through_jobs_shard(tmp_path, ray_local, capsys):
    corpus = _source_corpus()
    src = tmp_path / "src" / "n01440764"
    src.mkdir(parents=True)
    for name, data in corpus.values():
        (src / name).write_bytes(data)
    args = ["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--split", "val",
            "--no-progress"]
    code, err = _run(shard_job.main, args, capsys)  # over the default threshold of 0 skips
    assert code == 1 and "4 of 11 source files were skipped (allowed: 0.00%)" in err
    written = json.loads((tmp_path / "out" / "val.json").read_text())
    code, _ = _run(shard_job.main, args + ["--max-skipped-fraction", "0.5"], capsys)
    assert code == 0
    m = json.loads((tmp_path / "out" / "val.json").read_text())
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in written["shards"]]
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in m["skipped"]}
    stored = {}
    for s in m["shards"]:
        for info in tarfile.open(tmp_path / "out" / s["file"]):
            if info.name.endswith(".json"):
                meta = json.loads(tarfile.open(tmp_path / "out" / s["file"]).extractfile(info).read())
                stored[meta["path"].split("/")[-1]] = (info.name.split(".")[0], meta["mode"])
    exts = {i.name.split(".")[0]: i.name.split(".", 1)[1] for s in m["shards"]
            for i in tarfile.open(tmp_path / "out" / s["file"]) if not i.name.endswith(("cls", "json"))}
    expected_skip = {"truncated.JPEG", "empty.JPEG", "bomb.png", "notes.txt"}
    for case, (name, _) in corpus.items():
        if name in skipped:
            record(case, "jobs.shard", f"skipped, recorded in the manifest: {skipped[name]}")
        else:
            key, mode = stored[name]
            record(case, "jobs.shard", f"stored as `{key}.{exts[key]}` (PIL mode {mode})")
    assert expected_skip <= set(skipped)
    assert stored["png_named.JPEG"][0] == "png_named" and exts["png_named"] == "png"
    assert exts["a_b"] == "jpg" and stored["cmyk.JPEG"][1] == "CMYK"
    assert len(stored) + len(skipped) == len(corpus)  # nothing lost silently
    record("a source where 4 of 11 files are unusable (the cases above)", "jobs.shard",
           f"exit 1 (`--max-skipped-fraction 0.5` accepts it, same shards): "
           f"{_short(err, str(tmp_path))}")


def _mpo(rng) -> bytes:
    """A multi-picture JPEG as phones and cameras write it (PIL reads its format as MPO)."""
    buf = io.BytesIO()
    first, second = photo_like(rng, 96, 64), photo_like(rng, 96, 64)
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    return buf.getvalue()


def _netpbm(rng, mode: str) -> bytes:
    buf = io.BytesIO()
    photo_like(rng, 80, 60, mode).save(buf, format="PPM")
    return buf.getvalue()


def test_image_folder_as_imagefolder_users_have_them(tmp_path, ray_local, capsys):
    """ROOT/<class>/ folders as people have them: phone photos, Netpbm files, an empty class
    folder between two others, symlinks (dangling and working), file names whose keys meet,
    an image over the pixel limit. Every file is stored, or skipped with its reason; the class
    indices are torchvision's ImageFolder's; every stored image decodes."""
    from torchvision.datasets.folder import find_classes

    from pipeline import data

    rng = np.random.default_rng(11)
    good = _jpeg(photo_like(rng, 96, 64))
    root = tmp_path / "src"
    files = {"a/phone.jpg": _mpo(rng), "a/photo.ppm": _netpbm(rng, "RGB"),
             "a/gray.pgm": _netpbm(rng, "L"), "c/a.b.jpg": good, "c/a_b.jpg": good,
             "c/img.jpg": good, "c/img.png": None, "d/huge.png": None, "real/linked.jpg": good}
    for rel, payload in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel == "c/img.png":
            photo_like(rng, 64, 48).save(root / rel, format="PNG")
        elif rel == "d/huge.png":
            Image.new("L", (400, 300)).save(root / rel, format="PNG")
        else:
            (root / rel).write_bytes(payload)
    (root / "b").mkdir()  # an empty class folder between a and c
    os.symlink(root / "real" / "linked.jpg", root / "a" / "symlinked_file.jpg")
    os.symlink(root / "a" / "missing.jpg", root / "a" / "dangling.jpg")
    os.symlink(root / "real", root / "e_linked_folder")
    os.symlink(root, root / "real" / "loop")  # a link to a folder above: reported, not walked
    args = ["--source", str(root), "--out", str(tmp_path / "out"), "--split", "val",
            "--no-progress", "--max-pixels", "100000"]
    code, err = _run(shard_job.main, args, capsys)
    m = json.loads((tmp_path / "out" / "val.json").read_text())
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    ids = [c["id"] for c in m["classes"]]
    assert ids == find_classes(str(root))[0], "class indices as torchvision's ImageFolder"
    # b is empty; every file of d is over the pixel limit
    assert m["empty_classes"] == ["b", "d"]
    assert "warning: 2 of 6 classes hold no image: b (index 1), d (index 3)" in err
    stored = {}
    for shard in m["shards"]:
        raw = (tmp_path / "out" / shard["file"]).read_bytes()
        for key, parts in shards.read_tar_samples(raw, shard["file"]):
            meta = json.loads(parts["json"])
            ext, _ = shards.validate_sample(parts, len(ids))
            img = data.decode_image(parts[ext])  # every stored sample decodes
            stored[meta["path"]] = (key, ext, img.size)
    expected_stored = {"a/phone.jpg", "a/photo.ppm", "a/gray.pgm", "c/a.b.jpg", "c/a_b.jpg",
                       "c/img.jpg", "c/img.png", "real/linked.jpg", "a/symlinked_file.jpg",
                       "e_linked_folder/linked.jpg"}
    assert set(stored) == expected_stored, (stored, skipped)
    assert set(skipped) == {"a/dangling.jpg", "d/huge.png", "real/loop", "e_linked_folder/loop"}
    assert len({k for k, _, _ in stored.values()}) == len(stored)
    assert stored["a/phone.jpg"][1] == "jpg" and stored["a/phone.jpg"][2] == (96, 64)
    assert code == 1 and "raise it to store them" in err and "--max-pixels 100000" in err
    assert "dangling symlink" in skipped["a/dangling.jpg"]
    assert "raise --max-pixels" in skipped["d/huge.png"]
    cases = {"multi-picture JPEG from a phone (PIL format MPO) named .jpg": "a/phone.jpg",
             "Netpbm colour image (.ppm)": "a/photo.ppm", "Netpbm grey image (.pgm)": "a/gray.pgm",
             "`x/a.b.jpg` beside `x/a_b.jpg` (keys meet)": "c/a_b.jpg",
             "`x/img.jpg` beside `x/img.png` (same stem)": "c/img.png",
             "symlinked file": "a/symlinked_file.jpg",
             "symlinked class folder": "e_linked_folder/linked.jpg"}
    for case, path in cases.items():
        key, ext, _ = stored[path]
        record(case, "jobs.shard", f"stored as `{key}.{ext}`, decodes")
    record("dangling symlink", "jobs.shard",
           f"skipped, recorded in the manifest: {skipped['a/dangling.jpg'].replace(str(root), 'ROOT')}")
    record("image over the pixel limit (`--max-pixels 100000`)", "jobs.shard",
           f"skipped, recorded: {skipped['d/huge.png']}; exit 1: {_short(err, str(tmp_path))}")
    record("empty class folder `b` between `a` and `c`", "jobs.shard",
           "kept at index 1 (torchvision's ImageFolder numbering), listed in the manifest's "
           "`empty_classes`, warning printed")


@pytest.mark.parametrize("case", ["fine-tuning workers that hold every CPU",
                                  "fine-tuning on GPUs the cluster does not have",
                                  "prediction actors that hold every CPU",
                                  "fewer train images than two a worker"])
def test_settings_that_cannot_run_exit_2_at_once(case, shard_set, tmp_path, ray_local, capsys):
    from jobs import finetune

    train, val = str(shard_set / "train.json"), str(shard_set / "val.json")
    base = ["--train", train, "--val", val, "--weights", "none", "--storage-path",
            str(tmp_path / "runs")]
    if case.startswith("prediction"):
        main, argv = predict_job.main, ["--data", val, "--weights", "none", "--out",
                                        str(tmp_path / "o"), "--actors", "2",
                                        "--cpus-per-actor", "1"]
        flag = "--cpus-per-actor 1"
    elif "GPUs" in case:
        main, argv, flag = finetune.main, base + ["--use-gpu"], "--use-gpu"
    elif "fewer" in case:
        main, argv, flag = finetune.main, base + ["--num-workers", "32"], "--num-workers 32"
    else:
        main, argv, flag = finetune.main, base + ["--cpus-per-worker", "1"], "--cpus-per-worker 1"
    code, err = _run(main, argv, capsys)
    assert code == 2 and flag in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()
    record(f"{case} (2-CPU local cluster)", main.__module__, f"exit 2 at once, nothing written: "
           f"{_short(err, str(tmp_path))}")


def test_empty_split_is_refused(tmp_path, ray_local, capsys):
    (tmp_path / "src" / "empty_class").mkdir(parents=True)
    (tmp_path / "src" / "empty_class" / "x.txt").write_text("no images")
    code, err = _run(shard_job.main, ["--source", str(tmp_path / "src"), "--out",
                                      str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 1 and "no images to shard" in err
    record("empty split (no images)", "jobs.shard", f"exit 1: {_short(err, str(tmp_path))}")


# ------------------------------------------------------- damaged shards (verify and predict)

def _reseal(folder):
    """Update the manifest's size, sha256 and sample index to the shards' current bytes: a
    damaged shard from a producer whose manifest matches it, so only the content checks can
    catch it. A tar whose headers cannot be indexed gets no index, as from a producer from before
    the index (the reader then reads it off the tar)."""
    from pipeline import tarindex

    mpath = folder / "val.json"
    m = json.loads(mpath.read_text())
    for s in m["shards"]:
        data = (folder / s["file"]).read_bytes()
        s["bytes"] = len(data)
        s["sha256"] = __import__("hashlib").sha256(data).hexdigest()
        try:
            s["index"] = tarindex.sample_index_of_bytes(data)
        except InputError:
            s.pop("index", None)
    mpath.write_text(json.dumps(m))


def _damage(kind: str, folder):
    shard = folder / "val-000000.tar"
    data = shard.read_bytes()
    if kind == "truncated tar, mid-member":
        shard.write_bytes(data[:2048 + 700])
    elif kind == "truncated tar, at a member boundary":
        members = read_tar_members(shard)
        write_tar_members(shard, members[:3])  # the first sample only: a valid, shorter tar
    elif kind == "truncated tar, mid-header":
        shard.write_bytes(data[:512 * 3 + 200])
    elif kind == "members of one sample not adjacent":
        members = read_tar_members(shard)
        members[1], members[3] = members[3], members[1]
        write_tar_members(shard, members)
        _reseal(folder)
    elif kind == "extra .pkl member in a sample":
        members = read_tar_members(shard)
        key = members[0][0].name.split(".")[0]
        evil = tarfile.TarInfo(f"{key}.pkl")
        members.insert(1, (evil, b"cos\nsystem\n(S'touch /tmp/owned-by-shard'\ntR."))
        write_tar_members(shard, members)
        _reseal(folder)
    elif kind == "label outside the class range":
        members = read_tar_members(shard)
        cls = next(i for i, (info, _) in enumerate(members) if info.name.endswith(".cls"))
        members[cls] = (members[cls][0], b"99")
        write_tar_members(shard, members)
        _reseal(folder)
    elif kind == "missing shard":
        shard.unlink()
    elif kind == "shard sha256 no longer matches (one flipped byte)":
        b = bytearray(data)
        b[1500] ^= 1
        shard.write_bytes(bytes(b))


SHARD_CASES = ["truncated tar, mid-member", "truncated tar, at a member boundary",
               "truncated tar, mid-header", "members of one sample not adjacent",
               "extra .pkl member in a sample", "label outside the class range",
               "missing shard", "shard sha256 no longer matches (one flipped byte)"]


@pytest.mark.parametrize("kind", SHARD_CASES)
def test_damaged_shard_is_named_by_verify_and_never_gives_a_silent_number(
        kind, shard_set, tmp_path, capsys):
    folder = tmp_path / "s"
    shutil.copytree(shard_set, folder)
    _damage(kind, folder)
    manifest = str(folder / "val.json")
    code, out = _run(shard_job.main, ["--verify", manifest], capsys)
    assert code == 1 and "val-000000.tar" in out and "val-000001.tar" not in out
    record(kind, "jobs.shard --verify", f"exit 1: {_short(out, str(tmp_path))}")
    code, err = _run(predict_job.main, ["--data", manifest, "--weights", "none", "--out",
                                        str(tmp_path / "eval"), "--no-progress"], capsys)
    assert code == 1, err  # a clear error or a recorded failure over the threshold
    assert not (tmp_path / "eval" / "_SUCCESS").exists() or "failed to decode" in err
    record(kind, "jobs.predict", f"exit 1: {_short(err, str(tmp_path))}")
    assert not os.path.exists("/tmp/owned-by-shard")


def test_every_image_undecodable_is_never_a_score(shard_set, tmp_path, capsys, ray_local):
    """All wrong at the decode stage: even when --max-failed-fraction 1 accepts every failure,
    a run with nothing decoded exits 1 (it used to end in a KeyError traceback)."""
    folder = tmp_path / "s"
    shutil.copytree(shard_set, folder)
    for shard in json.loads((folder / "val.json").read_text())["shards"]:
        path = folder / shard["file"]
        write_tar_members(path, [(i, d[: len(d) // 3] if i.name.endswith(".jpg") else d)
                                 for i, d in read_tar_members(path)])
    _reseal(folder)
    code, err = _run(predict_job.main, ["--data", str(folder / "val.json"), "--weights", "none",
                                        "--out", str(tmp_path / "eval"), "--no-progress",
                                        "--max-failed-fraction", "1"], capsys)
    assert code == 1 and "none of the 16 samples could be decoded" in err, err
    assert (tmp_path / "eval" / "failures.parquet").exists()
    record("every image in the shards undecodable (`--max-failed-fraction 1`)", "jobs.predict",
           f"exit 1, failures.parquet lists all 16: {_short(err, str(tmp_path))}")


# ------------------------------------------------------------------ manifests and weights

@pytest.mark.parametrize("case,text", [
    ("manifest is not valid JSON", "{not json"),
    ("manifest of another format version",
     json.dumps({"format": shards.FORMAT, "format_version": 99}))])
def test_bad_manifest(case, text, tmp_path, capsys, ray_local):
    (tmp_path / "val.json").write_text(text)
    code, err = _run(predict_job.main, ["--data", str(tmp_path / "val.json"), "--weights",
                                        "none", "--out", str(tmp_path / "eval")], capsys)
    assert code == 1 and "val.json" in err
    record(case, "jobs.predict", f"exit 1: {_short(err, str(tmp_path))}")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/owned-by-weights",))


def _weights(kind, tmp_path, shard_set):
    from torchvision.models import resnet18

    path = tmp_path / "w.pt"
    if kind == "weights of the wrong shape":
        from pipeline import model as modellib

        net = resnet18(num_classes=4)
        net.layer1[0].conv1 = torch.nn.Conv2d(64, 32, 3)  # a layer of the wrong shape
        classes = json.loads((shard_set / "val.json").read_text())["classes"]
        modellib.save_model(str(path), net, classes, {}, {}, "broken")
    elif kind == "weights for another class count (1000 vs the data's 4)":
        torch.save(resnet18().state_dict(), path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"fc.weight": _Evil()}, f)
    return str(path)


@pytest.mark.parametrize("kind", ["weights of the wrong shape",
                                  "weights for another class count (1000 vs the data's 4)",
                                  "malicious pickle in a weights file"])
def test_bad_weights(kind, shard_set, tmp_path, capsys):
    code, err = _run(predict_job.main, ["--data", str(shard_set / "val.json"), "--weights",
                                        _weights(kind, tmp_path, shard_set), "--out",
                                        str(tmp_path / "eval")], capsys)
    assert code == 1 and not os.path.exists("/tmp/owned-by-weights")
    assert {"weights of the wrong shape": "do not fit", "malicious": "cannot be loaded safely",
            "weights for another": "lack"}[next(k for k in ("weights of the wrong shape",
                                                            "malicious", "weights for another")
                                              if kind.startswith(k))] in err
    record(kind, "jobs.predict", f"exit 1: {_short(err, str(tmp_path))}")


def test_output_folder_that_cannot_be_written(shard_set, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _run(predict_job.main, ["--data", str(shard_set / "val.json"), "--weights",
                                        "none", "--out", str(tmp_path / "file" / "eval")],
                     capsys)
    assert code == 1 and "cannot be written" in err
    record("output folder that cannot be written", "jobs.predict",
           f"exit 1: {_short(err, str(tmp_path))}")


# ------------------------------------------------------------------------- crash faults

@pytest.mark.parametrize("fault", ["before_publish", "mid_publish"])
def test_prediction_killed_while_publishing_keeps_the_previous_result(fault, shard_set,
                                                                     tmp_path, capsys,
                                                                     ray_local):
    """A rerun into the same --out replaces the set; a job killed before or in the middle of
    its publish leaves the previous set whole (after ``recover``, which the next run does
    first); the rerun then publishes exactly one row per image. The killed job joins the
    test's Ray cluster: what is killed is the job's own process, at its publish."""
    from pipeline import metrics
    from pipeline.publish import recover

    out = str(tmp_path / "eval")
    args = ["--data", str(shard_set / "val.json"), "--weights", "none", "--out", out,
            "--no-progress"]
    assert _run(predict_job.main, args, capsys)[0] == 0
    assert _run(predict_job.main, args, capsys)[0] == 0  # a rerun into the same --out
    before = open(os.path.join(out, "_SUCCESS")).read()
    df = metrics.read_predictions(out)
    assert len(df) == df["key"].nunique() == 16 and before  # replaced, not appended
    proc = subprocess.run([sys.executable, "-m", "jobs.predict", *args], capture_output=True,
                          env={**os.environ, "RESNET_PIPELINE_FAULT": fault,
                               "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
                          timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]  # killed at the fault point
    recover(out)  # what the next run does first: the previous set, whole
    assert open(os.path.join(out, "_SUCCESS")).read() == before
    df = metrics.read_predictions(out)
    assert len(df) == df["key"].nunique() == 16
    assert _run(predict_job.main, args, capsys)[0] == 0  # the rerun recovers and republishes
    assert open(os.path.join(out, "_SUCCESS")).read() != before
    df = metrics.read_predictions(out)
    assert len(df) == df["key"].nunique() == 16
    assert not os.path.exists(os.path.join(out, "_previous"))
    record(f"prediction job killed {fault.replace('_', ' ')}", "jobs.predict",
           "previous published set intact (`_SUCCESS` unchanged); the rerun publishes exactly "
           "one row per image")


# ------------------------------------------------------------------------------ the table

def test_readme_table_is_the_one_these_tests_produce():
    if len(ROWS) < 52:  # a partial run of this module cannot judge the whole table
        pytest.skip("run the whole module to compare the table")
    check_readme_table("corpus-table", render_table(ROWS, "bad input or fault"))
