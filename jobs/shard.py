"""Shard a labelled image source (ImageNet in any of its layouts, or a class folder) into
WebDataset tars with a verified manifest, or verify existing shards (--verify MANIFEST)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import failures, images, readers, shards, sources, storage
from pipeline.errors import InputError


@dataclass(frozen=True)
class ShardConfig:
    """Shard a labelled image source into WebDataset tars plus OUT/<split>.json, one Ray task per
    shard; a rerun redoes only missing or damaged shards. With --verify MANIFEST, recheck every
    shard against the manifest and exit 1 naming each bad one."""
    source: str = _cli.option("", "source root: ROOT/<class>/* (folder), the Kaggle ILSVRC "
                                  "root (imagenet-kaggle), the folder of ILSVRC2012_val_*.JPEG "
                                  "(imagenet-devkit), ROOT/<wnid>_*.JPEG in one folder "
                                  "(wnid-files), ROOT/<0..999>/*.jpeg (imagenet-v2: folders "
                                  "are class indices), ROOT/<wnid>/* over 200 wnids "
                                  "(imagenet-r, imagenet-a) or 1000 (imagenet-sketch); local "
                                  "path or pyarrow URI (s3://...)")
    out: str = _cli.option("", "output folder for <split>-NNNNNN.tar and <split>.json (also "
                               "_info.json for timm and README.md, a dataset card for "
                               "load_dataset(OUT))")
    split: str = _cli.option("train", "which split this is: train shards are a seeded "
                                      "permutation, val shards are sorted by key",
                             choices=["train", "val"])
    layout: str = _cli.option("auto", "source layout; auto recognises the released sets by "
                                      "their folder names (docs/EVALUATION.md)",
                              choices=["auto", *sources.LAYOUTS])
    devkit: str = _cli.option("", "imagenet-devkit: the devkit folder; empty: looked for under "
                                  "--source")
    v2_variant: str = _cli.option("", "imagenet-v2: which release (matched-frequency, "
                                      "threshold0.7, top-images; published accuracies are per "
                                      "release); empty: read from the folder's name, as the "
                                      "archives unpack (imagenetv2-<variant>-format-val)",
                                  choices=["", *sources.V2_VARIANTS])
    classes_from: str = _cli.option("", "take the class list from this manifest (shard val with "
                                        "the train classes so indices agree)")
    samples_per_shard: int = _cli.option(shards.DEFAULT_SAMPLES_PER_SHARD,
                                         "images per shard (docs/JOBS.md explains the choice)")
    seed: int = _cli.option(0, "seed of the train permutation")
    max_pixels: int = _cli.option(shards.DEFAULT_MAX_PIXELS,
                                  "skip images with more pixels (decompression bombs)")
    check: str = _cli.option(images.DEFAULT_CHECK,
                             "how each file is checked before it is stored: header (PIL parses "
                             "the header; a JPEG must hold its end marker, a PNG its IEND: "
                             "catches truncation) or decode (decodes every image, ~6x slower; "
                             "also catches damage inside the image data)",
                             choices=list(images.CHECKS))
    max_skipped_fraction: float = _cli.option(
        0.0, "exit 1 when more than this fraction (0..1) of the source's image files were "
             "skipped; hidden and system files and files outside the class folders do not "
             "count (the shards and the manifest, which lists every skipped file and why, are "
             "still written; a rerun with a higher value reuses them)")
    verify: str = _cli.option("", "verify the shards of this manifest (or of every manifest in "
                                  "this folder) instead of sharding")
    progress: bool = _cli.option(True, "show progress: a bar on a terminal, else a line about "
                                       "every 10%% or minute (images done, rate, ETA)")


def verify(path: str) -> int:
    """Verify one manifest, or every shard manifest in a folder; exit 1 naming each bad shard."""
    manifests = shards.find_manifests(path) if storage.is_dir(path) else [path]
    if not manifests:
        raise FileNotFoundError(f"{path} is a folder with no shard manifest (<split>.json)")
    bad = 0
    for manifest in manifests:
        problems = shards.verify_shards(manifest)
        for p in problems:
            print(f"BAD {p}")
        print(f"{'FAILED' if problems else 'OK'}: {len(problems)} bad shard(s) in {manifest}")
        bad += len(problems)
    return 1 if bad else 0


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(ShardConfig, argv, "shard")
    if cfg.verify:
        return verify(cfg.verify)
    if not cfg.source or not cfg.out:
        _cli.fail("--source and --out are required (or --verify MANIFEST)")
    # everything that can be checked without Ray is, before Ray starts (~10 s on 2 cores)
    source = sources.scan_source(cfg.source, cfg.split, cfg.layout, cfg.devkit or None,
                                 cfg.v2_variant)
    if cfg.classes_from:
        source = sources.with_classes(source, shards.load_manifest(cfg.classes_from).classes)
    if not source.items:
        n = len(source.skipped)
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in source.skipped[-3:])
        raise InputError(f"split {cfg.split!r} of {cfg.source} has no images to shard in layout "
                         f"{source.layout} ({n} file{'' if n == 1 else 's'} skipped"
                         + (f", e.g. {reasons}" if reasons else "") + ")")
    hint = sources.layout_hint(source)
    if hint and (cfg.layout == "auto" or source.layout == "imagenet-v2"):
        print(f"warning: {hint}", file=sys.stderr)
    storage.check_writable(cfg.out)
    _cli.init_ray()
    m = shards.write_shards(source, cfg.out, cfg.samples_per_shard, cfg.seed, cfg.max_pixels,
                            progress=cfg.progress, check=cfg.check)
    readers.write_hf_card(cfg.out)  # load_dataset(OUT) then sees every image column
    st = m.stats
    print(f"{m.total_samples} samples in {len(m.shards)} shards "
          f"({st.reused} reused), {len(m.skipped)} skipped, layout {m.layout}"
          f"{' (' + m.variant + ')' if m.variant else ''}, "
          f"{len(m.classes)} classes; {m.total_samples / st.seconds:.0f} images/s, "
          f"{st.source_bytes / 1e6 / st.seconds:.1f} MB/s")
    for s in m.skipped[:20]:
        print(f"  skipped {s['path']}: {s['reason']}")
    if len(m.skipped) > 20:
        print(f"  ... and {len(m.skipped) - 20} more (all listed in the manifest)")
    manifest = f"{cfg.out}/{cfg.split}.json"
    print(f"manifest: {manifest}")
    if m.empty_classes and m.layout != "folder":
        # a released set's fixed class list: a part of the set leaves classes empty, as expected
        print(f"note: {len(m.empty_classes)} of the {len(m.classes)} classes of layout "
              f"{m.layout} hold no image here (a part of the set?); they keep their index "
              f"(listed as empty_classes in the manifest)", file=sys.stderr)
    elif m.empty_classes:
        index = {c["id"]: c["index"] for c in m.classes}
        print(f"warning: {len(m.empty_classes)} of {len(m.classes)} classes hold no image: "
              + ", ".join(f"{c} (index {index[c]})" for c in m.empty_classes[:10])
              + ("" if len(m.empty_classes) <= 10 else ", ...")
              + "; they keep their index (listed as empty_classes in the manifest)",
              file=sys.stderr)
    lost = [s for s in m.skipped if not sources.is_ignorable(s)]
    ignored = len(m.skipped) - len(lost)
    if ignored:
        print(f"{ignored} hidden or system files, or files outside the class folders, are not "
              f"counted as skipped images (listed in the manifest all the same)")
    seen = m.total_samples + len(lost)
    if failures.over_limit(len(lost), seen, cfg.max_skipped_fraction):
        too_big = sum("raise --max-pixels" in s["reason"] for s in lost)
        hint = (f"; {too_big} of them are over --max-pixels {cfg.max_pixels}: raise it to store "
                f"them" if too_big else "")
        print(f"error: {len(lost)} of {seen} source files were skipped (allowed: "
              f"{cfg.max_skipped_fraction:.2%}); reasons in {manifest}. Rerun with "
              f"--max-skipped-fraction to accept them{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
