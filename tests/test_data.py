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
    ds, manifest = data.read_decoded(str(out / "val.json"), presets.EvalTransform(),
                                     data.ReadPlan(batch_size=4))
    rows = ds.take_all()
    assert len(rows) == manifest.total_samples == 7
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
    ds, _ = data.read_decoded(str(tmp_path / "s" / "val.json"), presets.EvalTransform(),
                              data.ReadPlan(batch_size=4))
    rows = ds.take_all()
    failed = [r for r in rows if r["error"]]
    assert [(r["key"], r["shard"]) for r in failed] == [(key, shard)]
    assert "truncated" in failed[0]["error"] or "OSError" in failed[0]["error"]
    assert len(rows) - len(failed) + len(failed) == manifest.total_samples
    assert len({r["key"] for r in rows}) == manifest.total_samples


@pytest.mark.parametrize("consumers", [1, 2, 3])
def test_every_key_seen_exactly_once_whatever_the_number_of_consumers(shard_set, consumers):
    import ray

    ds, manifest = data.read_decoded(str(shard_set / "val.json"), presets.EvalTransform(),
                                     data.ReadPlan(batch_size=3))

    @ray.remote(num_cpus=0)  # consumers must not take the CPUs the read/decode tasks need
    def consume(it):
        return [k for b in it.iter_batches(batch_size=2, batch_format="numpy") for k in b["key"]]

    parts = ray.get([consume.remote(it) for it in ds.streaming_split(consumers, equal=False)])
    keys = [k for p in parts for k in p]
    assert len(keys) == len(set(keys)) == manifest.total_samples


def test_programming_errors_still_raise():
    import pandas as pd

    batch = pd.DataFrame([{"__key__": "a", "__url__": "x.tar", "jpg": b"\xff\xd8", "cls": b"0"}])
    with pytest.raises(TypeError):
        data.decode_batch(batch, presets.EvalTransform(), num_classes="ten")  # a bug, not data


def test_bad_members_and_labels_are_recorded_not_raised():
    import pandas as pd

    buf = io.BytesIO()
    photo_like(np.random.default_rng(0), 40, 30).save(buf, format="JPEG")
    rows = [{"__key__": "pickled", "__url__": "s.tar", "jpg": buf.getvalue(), "cls": b"0",
             "pkl": b"cos\nsystem\n(S'echo owned'\ntR."},
            {"__key__": "label", "__url__": "s.tar", "jpg": buf.getvalue(), "cls": b"7"},
            {"__key__": "ok", "__url__": "s.tar", "jpg": buf.getvalue(), "cls": b"1"}]
    out = data.decode_batch(pd.DataFrame(rows), presets.EvalTransform(presets.Preset(18, 16)),
                            num_classes=2)
    assert "refused" in out["error"][0] and "pkl" in out["error"][0]
    assert "outside the class range" in out["error"][1]
    assert out["error"][2] == "" and out["image"][2].any()


def _raw_batch(images: dict, label: int = 0):
    """A raw batch as read_webdataset hands it to the decode stage: {key: PIL image} as JPEGs
    (quality 95) in the numpy batch format."""
    jpgs = []
    for img in images.values():
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        jpgs.append(buf.getvalue())
    n = len(images)
    return {"__key__": np.array(list(images), dtype=object),
            "__url__": np.full(n, "s.tar", dtype=object),
            "jpg": np.array(jpgs + [None], dtype=object)[:n],
            "cls": np.full(n, str(label).encode(), dtype=object)}


def test_train_crop_is_torchvisions_resized_crop_and_flip_on_the_whole_image():
    from torchvision.transforms.v2 import functional as TF

    img = photo_like(np.random.default_rng(1), 300, 120)  # wide: 2.5:1
    flips = set()
    for key in (f"k{i}" for i in range(12)):
        top, left, h, w, flip = presets.train_crop_params(key, 3, 1, 120, 300, 0.08)
        ref = TF.resized_crop(img, top, left, h, w, [48, 48],
                              TF.InterpolationMode.BILINEAR, antialias=True)
        ref = np.asarray(TF.hflip(ref) if flip else ref).transpose(2, 0, 1)
        ours = presets.train_image(img, 48, key=key, seed=3, epoch=1)
        assert ours.shape == (3, 48, 48) and ours.dtype == np.uint8
        assert np.array_equal(ours, ref), key
        flips.add(flip)
    assert flips == {True, False}


def test_train_crops_reach_an_object_outside_the_centre_square():
    """A 320x80 image whose only object, a red 24x24 square, sits at the far left: the centre
    square (x 120..200) never shows it; crops drawn from the whole image do, some of them whole."""
    img = np.full((80, 320, 3), 128, dtype=np.uint8)
    img[28:52, 4:28] = (230, 20, 20)
    keys = [f"img{i}" for i in range(400)]
    out = data.decode_batch(_raw_batch({k: Image.fromarray(img) for k in keys}),
                            presets.TrainTransform(32, seed=0), num_classes=1, epoch=0)
    assert out["image"].shape == (400, 3, 32, 32) and list(out["error"]) == [""] * 400
    r, g = out["image"][:, 0].astype(int), out["image"][:, 1].astype(int)
    red = ((r - g) > 80).any(axis=(1, 2))
    assert red.sum() >= 20, red.sum()  # the object is seen...
    whole = [k for k in keys if _contains(presets.train_crop_params(k, 0, 0, 80, 320),
                                          (28, 4, 24, 24))]
    assert len(whole) >= 3, len(whole)  # ...and some crops hold all of it
    assert all(red[keys.index(k)] for k in whole)
    lefts = [presets.train_crop_params(k, 0, 0, 80, 320)[1] for k in keys]
    assert min(lefts) < 20 and max(lefts) > 200  # crops come from the whole width


def _contains(params, box) -> bool:
    top, left, h, w, _ = params
    bt, bl, bh, bw = box
    return top <= bt and left <= bl and top + h >= bt + bh and left + w >= bl + bw


def test_train_crops_are_reproducible_per_seed_epoch_and_key():
    rng = np.random.default_rng(0)
    batch = _raw_batch({f"k{i}": photo_like(rng, 200, 90) for i in range(4)})

    def crops(seed, epoch):
        return data.decode_batch(batch, presets.TrainTransform(32, seed=seed), num_classes=1,
                                 epoch=epoch)["image"]

    a = crops(seed=0, epoch=1)
    assert np.array_equal(a, crops(seed=0, epoch=1))
    assert not np.array_equal(a, crops(seed=0, epoch=2))
    assert not np.array_equal(a, crops(seed=1, epoch=1))
    # a key's crop does not depend on which batch or position it arrives in
    one = data.decode_batch({k: v[2:3] for k, v in batch.items()},
                            presets.TrainTransform(32, seed=0), num_classes=1, epoch=1)["image"]
    assert np.array_equal(one[0], a[2])


def test_each_pass_over_a_train_dataset_is_the_next_epochs_draw(shard_set):
    """Ray Data counts the executions of a dataset; the decode stage draws epoch
    first_epoch + that count, so pass 2 of a run equals pass 1 of a run resumed at epoch 1."""
    def passes(first_epoch: int, n: int) -> list[dict]:
        ds, _ = data.read_decoded(str(shard_set / "train.json"),
                                  presets.TrainTransform(16, seed=7, epoch_offset=first_epoch),
                                  data.ReadPlan(batch_size=4))
        return [{r["key"]: r["image"] for r in ds.take_all()} for _ in range(n)]

    e0, e1 = passes(0, 2)
    (resumed,) = passes(1, 1)
    assert sorted(e0) == sorted(e1) == sorted(resumed) and len(e0) == 32
    assert all(np.array_equal(e1[k], resumed[k]) for k in e0)
    assert sum(np.array_equal(e0[k], e1[k]) for k in e0) == 0


def test_gpu_decode_option_falls_back_to_the_reference_path_without_a_gpu(photo_shards):
    import pandas as pd

    _, out = photo_shards
    raw = []
    for s in shards.load_manifest(str(out / "val.json")).shards:
        for key, parts in shards.read_tar_samples((out / s.file).read_bytes(), s.file):
            raw.append({"__key__": key, "__url__": s.file, **parts})
    batch = pd.DataFrame(raw)
    cpu = data.decode_batch(batch, presets.EvalTransform(), num_classes=2)
    gpu = data.decode_batch(batch, presets.EvalTransform(), num_classes=2, device="cuda")
    if not torch.cuda.is_available():  # here: the same pixels, through PIL
        assert np.array_equal(cpu["image"], gpu["image"])
    else:  # nvJPEG and tensor resizing: near-identical, never different labels
        assert np.abs(cpu["image"].astype(int) - gpu["image"].astype(int)).mean() < 2.0
    assert list(cpu["label"]) == list(gpu["label"]) and list(gpu["error"]) == [""] * len(raw)


@pytest.mark.parametrize("transform", [presets.EvalTransform(presets.Preset(80, 64)),
                                       presets.TrainTransform(48, seed=3)],
                         ids=["eval", "train"])
def test_a_transform_on_a_decoded_tensor_matches_its_pil_path(transform):
    """``on_tensor`` is what --decode-device cuda applies after nvJPEG; here on CPU tensors, so
    the GPU path's geometry (same resize and crop, same draw per key and epoch, same flip) is
    checked on any machine: near-identical pixels (tensor vs PIL resampling), same shape."""
    img = photo_like(np.random.default_rng(4), 210, 140)
    tensor = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())
    for key, epoch in (("a", 0), ("b", 1), ("c", 2), ("d", 3)):
        ours = transform.on_tensor(tensor, key, epoch).numpy()
        ref = transform(img, key, epoch)
        assert ours.shape == ref.shape == (3, transform.crop_size, transform.crop_size)
        assert ours.dtype == np.uint8
        assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 2.0, key


def test_a_resumed_run_does_not_replay_epoch_0s_shard_order(image_tree, tmp_path, ray_local):
    from pipeline import train

    shards.write_shards(sources.scan_source(str(image_tree / "train"), "train"), str(tmp_path),
                        samples_per_shard=4, progress=False)  # 8 shards: 40320 orders
    manifest = str(tmp_path / "train.json")

    def first_epoch_order(resume_at: int) -> list[str]:
        ds, _ = data.read_decoded(manifest, presets.TrainTransform(16), data.ReadPlan(
            batch_size=4, shuffle_seed=train.shuffle_seed(0, resume_at)))
        # On the dataset's own DataContext: Ray copies the current one when the dataset is
        # built, so setting DataContext.get_current() here changed nothing and the rows came
        # in the order the 2 tasks finished (on an AVX2-only machine, two runs differed).
        ds.context.execution_options.preserve_order = True
        return list(dict.fromkeys(r["shard"] for r in ds.take_all()))

    fresh, resumed = first_epoch_order(0), first_epoch_order(2)
    assert len(fresh) == 8 and sorted(fresh) == sorted(resumed)
    assert fresh != resumed  # a resume at epoch 2 does not start over with epoch 0's order
    assert first_epoch_order(2) == resumed  # and it is reproducible


def test_resume_epoch_follows_ray_trains_checkpoint_snapshot(tmp_path):
    from pipeline import ray_compat, train

    assert train.resume_epoch(str(tmp_path), "new") == 0
    (tmp_path / "run").mkdir()
    snapshot = {"checkpoint_results": [], "latest_checkpoint_result": {
        "checkpoint_dir_name": "checkpoint_2026-11-29_02-00-00.000001",
        "metrics": {"epoch": 4, "val_top1": 50.0}}}
    (tmp_path / "run" / ray_compat.SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    assert train.resume_epoch(str(tmp_path), "run") == 5
    assert train.recorded_checkpoint(str(tmp_path), "run") == \
        ("checkpoint_2026-11-29_02-00-00.000001", 4)
    (tmp_path / "run" / ray_compat.SNAPSHOT_FILE).write_text(json.dumps({"other": "format"}))
    with pytest.raises(ValueError, match="cannot be read"):
        train.resume_epoch(str(tmp_path), "run")


def test_jobs_run_ray_data_without_its_operator_reservation(ray_local):
    # With the reservation on, the fused read+decode stage ran one task at a time on 2 CPUs
    # (docs/BENCHMARKS.md); every job's init_ray and this fixture call configure_context.
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.op_resource_reservation_enabled, ctx.enable_progress_bars = True, True
    data.configure_context()
    assert ctx.op_resource_reservation_enabled is False and ctx.enable_progress_bars is False


def test_batched_jpeg_decoding_takes_the_good_images_and_leaves_a_bad_one_to_pil(photo_shards):
    """--decode-device cuda's path (``decode_on_device``: one batched decode_jpeg call, image by
    image when one bad JPEG fails the batch), run here with torchvision's CPU decoder: the good
    JPEGs are decoded and transformed, a truncated one is left to the PIL path, which records
    it; the rest agree with PIL's pixels."""
    _, out = photo_shards
    raw = []
    for s in shards.load_manifest(str(out / "val.json")).shards:
        for key, parts in shards.read_tar_samples((out / s.file).read_bytes(), s.file):
            raw.append({"__key__": key, "__url__": s.file, **parts})
    jpegs = [i for i, r in enumerate(raw) if "jpg" in r]
    assert len(jpegs) == 6 and len(raw) == 7  # and one PNG
    bad = jpegs[1]
    raw[bad] = {**raw[bad], "jpg": raw[bad]["jpg"][:len(raw[bad]["jpg"]) // 2]}  # truncated
    transform = presets.EvalTransform(presets.Preset(80, 64))
    tensors = torch.zeros((len(raw), 3, 64, 64), dtype=torch.uint8)
    done = data.decode_on_device(raw, tensors, transform, 0, 2, shards.DEFAULT_MAX_PIXELS)
    assert done == set(jpegs) - {bad}  # the PNG and the truncated JPEG are PIL's
    columns = {k for r in raw for k in r}
    pil = data.decode_batch({k: np.array([r.get(k) for r in raw], dtype=object)
                             for k in columns}, transform, num_classes=2)
    assert pil["error"][bad] and not any(pil["error"][i] for i in done)
    for i in done:
        assert np.abs(tensors[i].numpy().astype(int) - pil["image"][i].astype(int)).mean() < 2.0
    assert data.decode_jpegs([], torch.device("cpu")) == []
