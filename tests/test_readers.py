"""The shards through the readers people already use (pipeline/readers.py): Hugging Face
``datasets``, ``webdataset`` and timm's webdataset reader each see every image, with its label,
when a split mixes image formats (a PNG among JPEGs, as ImageNet train has)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipeline import readers, shards, sources
from tests.conftest import photo_like

# offline, as every test: the webdataset loader is packaged with `datasets`, nothing is fetched
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, ray_local):
    """12 JPEGs and one PNG over 3 classes, val shards of 5: the PNG sorts last, far from the
    first shard's first samples, where HF's reader looks for its columns."""
    root = tmp_path_factory.mktemp("mixed")
    src = root / "src"
    rng = np.random.default_rng(0)
    for c in ("apple", "bee", "cat"):
        os.makedirs(src / c)
        for i in range(4):
            photo_like(rng, 40, 30).save(src / c / f"{c}{i}.jpg", quality=90)
    photo_like(rng, 40, 30).save(src / "cat" / "zz_scan.png")
    shards.write_shards(sources.scan_source(str(src), "val"), str(root / "s"),
                        samples_per_shard=5, progress=False)
    manifest = str(root / "s" / "val.json")
    labels = {os.path.splitext(f)[0]: i for i, c in enumerate(("apple", "bee", "cat"))
              for f in os.listdir(src / c)}
    return {"manifest": manifest, "root": root, "src": src, "labels": labels}


def test_the_manifest_counts_images_per_format_and_timm_info_lists_the_split(mixed):
    m = shards.load_manifest(mixed["manifest"])
    assert m.raw["image_exts"] == {"jpg": 12, "png": 1}
    assert readers.wds_image_key(m) == "jpg;png"
    import json

    info = json.load(open(mixed["root"] / "s" / shards.TIMM_INFO))
    assert info["splits"] == {"val": {"name": "val", "num_samples": 13,
                                      "filenames": [s.file for s in m.shards],
                                      "shard_lengths": [5, 5, 3]}}
    # derived from the manifests in the folder: a damaged copy is rewritten whole
    (mixed["root"] / "s" / shards.TIMM_INFO).write_text("{not json")
    shards.write_timm_info(str(mixed["root"] / "s"))
    assert json.load(open(mixed["root"] / "s" / shards.TIMM_INFO))["splits"] == info["splits"]


def test_hugging_face_datasets_sees_every_image(mixed, tmp_path):
    import datasets

    m = shards.load_manifest(mixed["manifest"])
    # as measured in the issue: inferred columns drop the PNG's image without a word
    plain = datasets.load_dataset("webdataset", data_files={"val": m.shard_paths}, split="val",
                                  cache_dir=str(tmp_path / "plain"))
    assert "png" not in plain.features and sum(r["jpg"] is None for r in plain) == 1
    ds = readers.hf_dataset(mixed["manifest"], cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 13
    got = {r["__key__"]: (readers.image_of(r, m), r["cls"]) for r in ds}
    assert {k: c for k, (_, c) in got.items()} == mixed["labels"]
    png = np.asarray(Image.open(mixed["src"] / "cat" / "zz_scan.png").convert("RGB"))
    assert np.array_equal(np.asarray(got["zz_scan"][0].convert("RGB")), png)


def test_webdataset_sees_every_image(mixed):
    import webdataset as wds

    m = shards.load_manifest(mixed["manifest"])
    ds = (wds.WebDataset(m.shard_paths, shardshuffle=False).decode("pil")
          .to_tuple("__key__", readers.wds_image_key(m), "cls"))
    got = {key: int(cls) for key, img, cls in ds if img.size == (40, 30)}
    assert got == mixed["labels"]


def test_timm_reads_every_image_through_its_wds_reader(mixed):
    import timm.data

    m = shards.load_manifest(mixed["manifest"])
    ds = timm.data.create_dataset("wds/mixed", root=str(mixed["root"] / "s"), split="val",
                                  input_key=readers.wds_image_key(m))
    got = [(img.size, target) for img, target in ds]
    assert len(got) == 13 and all(size == (40, 30) for size, _ in got)
    assert sorted(t for _, t in got) == sorted(mixed["labels"].values())


def test_a_plain_hugging_face_load_of_the_folder_sees_every_image(mixed, tmp_path):
    """jobs.shard's dataset card (OUT/README.md) names every column, so the call a Hugging
    Face user makes first, load_dataset(OUT), loses nothing: 13 of 13 rows with their image."""
    import shutil

    import datasets

    folder = tmp_path / "s"
    shutil.copytree(mixed["root"] / "s", folder)
    assert readers.write_hf_card(str(folder)) == str(folder / readers.HF_CARD)
    ds = datasets.load_dataset(str(folder), split="val", cache_dir=str(tmp_path / "hf"))
    m = shards.load_manifest(str(folder / "val.json"))
    assert len(ds) == 13 and set(ds.features) >= {"jpg", "png", "cls", "json", "__key__"}
    got = {r["__key__"]: (readers.image_of(r, m), r["cls"]) for r in ds}
    assert {k: c for k, (_, c) in got.items()} == mixed["labels"]
    assert got["zz_scan"][0] is not None and ds.features["png"].__class__.__name__ == "Image"
    # a second split written into the folder appears too; a README.md of one's own is kept
    text = (folder / readers.HF_CARD).read_text()
    assert "split: val" in text and "- val-000000.tar" in text
    (folder / readers.HF_CARD).write_text("# my own notes\n")
    assert readers.write_hf_card(str(folder)) is None
    assert (folder / readers.HF_CARD).read_text() == "# my own notes\n"


def test_jobs_shard_writes_the_card_for_both_splits(image_tree, tmp_path, ray_local, capsys):
    from jobs import shard as shard_job

    out = tmp_path / "s"
    for split in ("train", "val"):
        assert shard_job.main(["--source", str(image_tree / split), "--split", split, "--out",
                               str(out), "--no-progress"]) == 0, capsys.readouterr().err
    import yaml

    card = yaml.safe_load((out / readers.HF_CARD).read_text().split("---")[1])
    splits = {e["split"] for e in card["configs"][0]["data_files"]}
    assert splits == {"train", "val"}
    assert [f["name"] for f in card["dataset_info"]["features"]][:1] == ["jpg"]
