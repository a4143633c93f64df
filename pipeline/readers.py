"""Opening the shards with the readers people already use: Hugging Face ``datasets``,
``webdataset`` and timm's webdataset reader, with every image and nothing else lost.

The shards follow WebDataset's convention (contract 1 in docs/DESIGN.md): a sample is
``<key>.<ext>`` (the image, named by its real format: jpg, png, ...), ``<key>.cls`` (the class
index as ASCII digits) and ``<key>.json`` (class id, source path, width, height, mode). A split
whose images are of more than one format (ImageNet train holds a PNG) has samples with different
image members, and each reader needs to be told which to take:

* ``datasets.load_dataset("webdataset", ...)`` infers its columns from the first 5 samples of the
  first shard (datasets/packaged_modules/webdataset/webdataset.py,
  ``NUM_EXAMPLES_FOR_FEATURES_INFERENCE``) and silently drops a member it did not see there: a
  PNG among JPEGs becomes a row whose image is None. ``hf_features`` names every image column
  the split holds (the manifest's ``image_exts``); ``hf_dataset`` loads with them.
* ``webdataset``: ``.to_tuple(wds_image_key(manifest), "cls")`` takes whichever image member a
  sample has.
* timm: ``timm.data.create_dataset("wds/NAME", root=OUT, split=SPLIT,
  input_key=wds_image_key(manifest))`` reads OUT/_info.json, which jobs.shard writes
  (``shards.write_timm_info``).
* A plain ``datasets.load_dataset(OUT, split=SPLIT)`` reads OUT/README.md, the dataset card
  jobs.shard writes (``write_hf_card``), whose features name every image column: every image
  is there, no helper needed.
"""

from __future__ import annotations

from pipeline import images, shards, storage
from pipeline.errors import InputError


def image_exts(manifest: shards.Manifest) -> list[str]:
    """The image member extensions of a split, most frequent first (the manifest's
    ``image_exts``); every extension the shards may hold when the manifest does not say (made by
    a version before it was recorded)."""
    counts = manifest.raw.get("image_exts")
    if not counts:
        return list(images.MEMBER_IMAGE_EXTS)
    return sorted(counts, key=lambda e: (-counts[e], e))


def wds_image_key(manifest: shards.Manifest) -> str:
    """The image key for webdataset's ``to_tuple`` and timm's ``input_key``: the split's image
    extensions joined by ``;`` (the first a sample has is taken), e.g. ``"jpg;png"``."""
    return ";".join(image_exts(manifest))


def hf_features(manifest: shards.Manifest):
    """``datasets.Features`` for the split: one ``Image`` column per image extension it holds
    (a row's image is in the column of its format, the others None), ``cls`` (int64), ``json``
    (class_id, path, width, height, mode), ``__key__`` and ``__url__``."""
    from datasets import Features, Image, Value

    meta = {"class_id": Value("string"), "height": Value("int64"), "mode": Value("string"),
            "path": Value("string"), "width": Value("int64")}
    return Features({**{e: Image() for e in image_exts(manifest)}, "cls": Value("int64"),
                     "json": meta, "__key__": Value("string"), "__url__": Value("string")})


def hf_dataset(manifest_path: str, **load_kwargs):
    """The split of a manifest as a Hugging Face ``datasets.Dataset`` (split name as the
    manifest's), every image kept: ``load_dataset("webdataset")`` over its shards with
    ``hf_features``. ``load_kwargs`` go to ``load_dataset`` (``cache_dir``, ``streaming``...)."""
    import datasets

    m = shards.load_manifest(manifest_path)
    return datasets.load_dataset("webdataset", data_files={m.split: m.shard_paths}, split=m.split,
                                 features=hf_features(m), **load_kwargs)


def image_of(row: dict, manifest: shards.Manifest):
    """The image of a row of ``hf_dataset`` (a PIL image), whichever column holds it; ValueError
    naming the key for a row with none."""
    found = [row[e] for e in image_exts(manifest) if row.get(e) is not None]
    if not found:
        raise ValueError(f"sample {row.get('__key__')!r} holds no image member")
    return found[0]


HF_CARD = "README.md"
_CARD_MARK = "<!-- written by jobs.shard from the manifests in this folder -->"


def write_hf_card(out: str) -> str | None:
    """Write OUT/README.md, a Hugging Face dataset card whose YAML names every column the
    splits hold, so that a plain ``datasets.load_dataset(OUT, split=SPLIT)`` returns every image
    (without it, the webdataset loader infers its columns from the first 5 samples and gives a
    PNG among JPEGs no image): ``dataset_info.features`` (one ``image`` column per image
    extension any manifest in OUT records, ``cls``, ``json``, ``__key__``, ``__url__``) and one
    ``configs`` data-files entry per split, its shard files listed. Derived from the manifests
    in OUT each time, as ``shards.write_timm_info`` is, so two splits written into one folder
    both appear. A README.md that this function did not write is left alone (None returned,
    with a warning); else returns the path."""
    import logging

    import yaml

    path = storage.join(out, HF_CARD)
    if storage.exists(path) and _CARD_MARK not in storage.read_text(path):
        logging.getLogger(__name__).warning(
            "%s exists and was not written by jobs.shard: left as it is, so a plain Hugging "
            "Face load infers its columns (use pipeline.readers.hf_dataset)", path)
        return None
    exts, files = {}, {}
    for mpath in shards.find_manifests(out):
        try:
            m = shards.load_manifest(mpath)
        except InputError:
            continue
        for e in image_exts(m):
            exts.setdefault(e, None)
        files[m.split] = [s.file for s in m.shards]
    meta = [{"name": n, "dtype": t} for n, t in (("class_id", "string"), ("height", "int64"),
                                                 ("mode", "string"), ("path", "string"),
                                                 ("width", "int64"))]
    features = ([{"name": e, "dtype": "image"} for e in exts]
                + [{"name": "cls", "dtype": "int64"}, {"name": "json", "struct": meta},
                   {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}])
    card = {"dataset_info": {"features": features},
            "configs": [{"config_name": "default",
                         "data_files": [{"split": s, "path": f} for s, f in files.items()]}]}
    body = (f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n{_CARD_MARK}\n\n"
            f"# {storage.basename(out.rstrip('/'))}\n\n"
            f"WebDataset shards written by resnet-pipeline's `jobs.shard` (one sample per image: "
            f"the original bytes as `<key>.<ext>` by real format, `<key>.cls` the class index, "
            f"`<key>.json` its metadata). Splits: {', '.join(files) or 'none'}; each has a "
            f"manifest `<split>.json` with the class list, checksums and every skipped file.\n\n"
            f"```python\nfrom datasets import load_dataset\nds = load_dataset(\"{out}\", "
            f"split=\"{next(iter(files), 'train')}\")  # every image: one column per format "
            f"({', '.join(exts) or 'none'})\n```\n")
    storage.write_text_atomic(path, body)
    return path
