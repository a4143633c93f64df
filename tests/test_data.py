"""Streaming decode: presets identical to torchvision, per-sample errors, exact coverage."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data, presets, shards, sources
from tests.conftest import corrupt_one_member, photo_like


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory, ray_local):
    """Photo-like images: landscape, portrait, smaller than the crop, grayscale, CMYK, PNG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    specs = [("landscape", 500, 375, "RGB"), ("portrait", 300, 450, "RGB"),
             ("tiny", 120, 90, "RGB"), ("gray", 333, 250, "L"), ("cmyk", 400, 300, "CMYK"),
             ("odd", 257, 255, "RGB")]
    for i, (name, w, h, mode) in enumerate(specs):
        d = root / f"class{i % 2}"
        d.mkdir(exist_ok=True)
        photo_like(rng, w, h, mode).save(d / f"{name}.jpg", quality=90)
    photo_like(rng, 280, 260).save(root / "class0" / "lossless.png")
    out = tmp_path_factory.mktemp("photo_shards")
    shards.write_shards(sources.scan_source(str(root), "val"), str(out), samples_per_shard=3,
                        progress=False)
    return root, out


def test_eval_stream_matches_torchvision_reference_within_1e6(photo_shards):
    root, out = photo_shards
    ds, manifest = data.read_decoded(str(out / "val.json"), batch_size=4)
    rows = ds.take_all()
    assert len(rows) == manifest["total_samples"] == 7
    reference = presets.reference_eval_transform()
    by_stem = {os.path.splitext(f)[0]: os.path.join(dp, f)
               for dp, _, fs in os.walk(root) for f in fs}
    for row in rows:
        assert row["error"] == ""
        ours = presets.normalize(torch.from_numpy(row["image"])[None])[0]
        with Image.open(by_stem[row["key"]]) as img:
            ref = reference(img.convert("RGB"))
        assert ours.shape == ref.shape == (3, 224, 224)
        assert float((ours - ref).abs().max()) <= 1e-6, row["key"]


def test_corrupt_jpeg_is_reported_and_the_counts_add_up(shard_set, tmp_path, ray_local):
    import shutil

    shutil.copytree(shard_set, tmp_path / "s")
    manifest = shards.load_manifest(str(tmp_path / "s" / "val.json"))
    key, shard = corrupt_one_member(tmp_path / "s", manifest)
    ds, _ = data.read_decoded(str(tmp_path / "s" / "val.json"), batch_size=4)
    rows = ds.take_all()
    failed = [r for r in rows if r["error"]]
    assert [(r["key"], r["shard"]) for r in failed] == [(key, shard)]
    assert "truncated" in failed[0]["error"] or "OSError" in failed[0]["error"]
    assert len(rows) - len(failed) + len(failed) == manifest["total_samples"]
    assert len({r["key"] for r in rows}) == manifest["total_samples"]


@pytest.mark.parametrize("consumers", [1, 2, 3])
def test_every_key_seen_exactly_once_whatever_the_number_of_consumers(shard_set, consumers):
    import ray

    ds, manifest = data.read_decoded(str(shard_set / "val.json"), batch_size=3)

    @ray.remote(num_cpus=0)  # consumers must not take the CPUs the read/decode tasks need
    def consume(it):
        return [k for b in it.iter_batches(batch_size=2, batch_format="numpy") for k in b["key"]]

    parts = ray.get([consume.remote(it) for it in ds.streaming_split(consumers, equal=False)])
    keys = [k for p in parts for k in p]
    assert len(keys) == len(set(keys)) == manifest["total_samples"]


def test_programming_errors_still_raise():
    import pandas as pd

    batch = pd.DataFrame([{"__key__": "a", "__url__": "x.tar", "jpg": b"\xff\xd8", "cls": b"0"}])
    with pytest.raises(TypeError):
        data.decode_batch(batch, mode="eval", num_classes="ten")  # a bug, not bad data


def test_bad_members_and_labels_are_recorded_not_raised():
    import pandas as pd

    buf = io.BytesIO()
    photo_like(np.random.default_rng(0), 40, 30).save(buf, format="JPEG")
    rows = [{"__key__": "pickled", "__url__": "s.tar", "jpg": buf.getvalue(), "cls": b"0",
             "pkl": b"cos\nsystem\n(S'echo owned'\ntR."},
            {"__key__": "label", "__url__": "s.tar", "jpg": buf.getvalue(), "cls": b"7"},
            {"__key__": "ok", "__url__": "s.tar", "jpg": buf.getvalue(), "cls": b"1"}]
    out = data.decode_batch(pd.DataFrame(rows), mode="eval", num_classes=2, crop_size=16,
                            resize_size=18)
    assert "refused" in out["error"][0] and "pkl" in out["error"][0]
    assert "outside the class range" in out["error"][1]
    assert out["error"][2] == "" and out["image"][2].any()


def test_train_augment_is_reproducible_per_seed_epoch_and_key():
    imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 3, 64, 64),
                                                                 dtype=np.uint8))
    a = presets.train_augment(imgs, ["k1", "k2"], seed=0, epoch=1, crop_size=32)
    b = presets.train_augment(imgs, ["k1", "k2"], seed=0, epoch=1, crop_size=32)
    c = presets.train_augment(imgs, ["k1", "k2"], seed=0, epoch=2, crop_size=32)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (2, 3, 32, 32)


def test_gpu_decode_option_falls_back_to_the_reference_path_without_a_gpu(photo_shards):
    import pandas as pd

    _, out = photo_shards
    raw = []
    for s in shards.load_manifest(str(out / "val.json"))["shards"]:
        for key, parts in shards.read_tar_samples((out / s["file"]).read_bytes(), s["file"]):
            raw.append({"__key__": key, "__url__": s["file"], **parts})
    batch = pd.DataFrame(raw)
    cpu = data.decode_batch(batch, mode="eval", num_classes=2)
    gpu = data.decode_batch(batch, mode="eval", num_classes=2, device="cuda")
    if not torch.cuda.is_available():  # here: the same pixels, through PIL
        assert np.array_equal(cpu["image"], gpu["image"])
    else:  # nvJPEG and tensor resizing: near-identical, never different labels
        assert np.abs(cpu["image"].astype(int) - gpu["image"].astype(int)).mean() < 2.0
    assert list(cpu["label"]) == list(gpu["label"]) and list(gpu["error"]) == [""] * len(raw)


def test_a_resumed_run_does_not_replay_epoch_0s_shard_order(image_tree, tmp_path, ray_local):
    from ray.data import DataContext

    from pipeline import train

    shards.write_shards(sources.scan_source(str(image_tree / "train"), "train"), str(tmp_path),
                        samples_per_shard=4, progress=False)  # 8 shards: 40320 orders
    manifest = str(tmp_path / "train.json")

    def first_epoch_order(resume_at: int) -> list[str]:
        ds, _ = data.read_decoded(manifest, mode="train", crop_size=16, batch_size=4,
                                  shuffle_seed=train.shuffle_seed(0, resume_at))
        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True
        try:
            shard_of = [r["shard"] for r in ds.take_all()]
        finally:
            ctx.execution_options.preserve_order = False
        return list(dict.fromkeys(shard_of))

    fresh, resumed = first_epoch_order(0), first_epoch_order(2)
    assert len(fresh) == 8 and sorted(fresh) == sorted(resumed)
    assert fresh != resumed  # a resume at epoch 2 does not start over with epoch 0's order
    assert first_epoch_order(2) == resumed  # and it is reproducible


def test_resume_epoch_follows_ray_trains_checkpoint_snapshot(tmp_path):
    from pipeline import train

    assert train.resume_epoch(str(tmp_path), "new") == 0
    (tmp_path / "run").mkdir()
    snapshot = {"checkpoint_results": [], "latest_checkpoint_result": {
        "checkpoint_dir_name": "checkpoint_2026-11-29_02-00-00.000001",
        "metrics": {"epoch": 4, "val_top1": 50.0}}}
    (tmp_path / "run" / train.SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    assert train.resume_epoch(str(tmp_path), "run") == 5
    assert train.recorded_checkpoint(str(tmp_path), "run") == \
        ("checkpoint_2026-11-29_02-00-00.000001", 4)
    (tmp_path / "run" / train.SNAPSHOT_FILE).write_text(json.dumps({"other": "format"}))
    with pytest.raises(ValueError, match="cannot be read"):
        train.resume_epoch(str(tmp_path), "run")
