"""Where images and their labels come from: ImageNet in its real layouts, or any class folder.

A *source* is a list of (relative path, class id) items plus the class list. The class index is
the position of the class id in the sorted list of class ids, which for ImageNet (sorted WordNet
ids) is torchvision's output order. Files that cannot be labelled are returned as ``skipped``
with a reason, never dropped.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from importlib import resources

from pipeline import storage
from pipeline.errors import InputError

LAYOUTS = ("folder", "wnid-files", "imagenet-kaggle", "imagenet-devkit", "imagenet-v2",
           "imagenet-r", "imagenet-a", "imagenet-sketch")
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"
DEVKIT_DIRS = ("ILSVRC2012_devkit_t12", "devkit", ".")
DEVKIT_GT = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")
# wnid-files: ImageNet images in one folder, named <wnid>_<anything> (train's per-class tars
# extracted together: n01440764_10026.JPEG; the one-image-per-class samples: n01440764_tench.JPEG)
WNID_NAME = re.compile(r"^(n\d{8})[_.]")
# Names that are images for layout recognition (torchvision's IMG_EXTENSIONS, and gif); the shard
# job still decides each file's format by its content.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                  ".gif")
# ImageNet-V2's three releases (Recht et al. 2019, "Do ImageNet Classifiers Generalize to
# ImageNet?", sec. 3: three ways of sampling the candidate images), as their archives name them:
# imagenetv2-matched-frequency-format-val/, imagenetv2-threshold0.7-format-val/,
# imagenetv2-top-images-format-val/.
V2_VARIANTS = ("matched-frequency", "threshold0.7", "top-images")
_V2_VARIANT_NAMES = ((re.compile(r"matched[-_ ]?frequency", re.I), "matched-frequency"),
                     (re.compile(r"threshold[-_ ]?0?\.7", re.I), "threshold0.7"),
                     (re.compile(r"top[-_ ]?images", re.I), "top-images"))


@dataclass
class Source:
    """One split of a source: ``layout`` (one of LAYOUTS), ``root``, ``split``, ``classes``
    [{"index", "id", "name"}] sorted by id, ``items`` (path relative to root, class id),
    ``skipped`` [{"path", "reason"}] for the files that could not be labelled, and for
    ImageNet-V2 the ``variant`` (one of V2_VARIANTS; '' when not known)."""
    layout: str
    root: str
    split: str
    classes: list[dict]  # [{"index", "id", "name"}], sorted by id
    items: list[tuple[str, str]]  # (path relative to root, class id)
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    variant: str = ""

    @property
    def class_index(self) -> dict[str, int]:
        """Class id -> class index, over ``classes``."""
        return {c["id"]: c["index"] for c in self.classes}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids, sorted (torchvision's class order)."""
    text = resources.files("pipeline").joinpath("imagenet_wnids.txt").read_text()
    return text.split()


def subset_wnids(layout: str) -> list[str]:
    """The 200 sorted wnids of ImageNet-R (``layout="imagenet-r"``) or ImageNet-A
    (``"imagenet-a"``), shipped as package data from timm's ``timm/data/_info/`` (Apache-2.0,
    pipeline/reference/LICENSE-timm.txt). KeyError for any other layout."""
    name = {"imagenet-r": "imagenet_r_synsets.txt", "imagenet-a": "imagenet_a_synsets.txt"}[layout]
    return resources.files("pipeline").joinpath("reference", name).read_text().split()


def imagenet_category_names() -> dict[str, str]:
    """wnid -> torchvision's short English name, for the 1000 ImageNet classes."""
    from torchvision.models import ResNet18_Weights

    return dict(zip(imagenet_wnids(), ResNet18_Weights.DEFAULT.meta["categories"]))


def make_classes(class_ids, names: dict[str, str] | None = None) -> list[dict]:
    """Class list with index = position in the sorted ids, and the best name we have."""
    ids = sorted(set(class_ids))
    names = dict(names or {})
    if not names and set(ids) <= set(imagenet_wnids()):
        names = imagenet_category_names()
    return [{"index": i, "id": c, "name": names.get(c, c)} for i, c in enumerate(ids)]


def detect_layout(root: str, split: str) -> str:
    """Name the layout of ``root``; the error lists what was looked for and what was found."""
    if storage.is_dir(storage.join(root, KAGGLE_DATA, split)):
        return "imagenet-kaggle"
    if split == "val" and _devkit_dir(root) is not None:
        return "imagenet-devkit"
    if not storage.is_dir(root):
        raise FileNotFoundError(f"source {root} does not exist or is not a folder")
    top = _top_level(root)
    dirs = {n for n, kind in top if kind == "dir" and not n.startswith(".")}
    if dirs:
        return _recognise_class_folders(root, dirs)
    images = [n for n, kind in top if kind == "file" and n.lower().endswith(IMAGE_SUFFIXES)
              and not n.startswith(".")]
    known = set(imagenet_wnids())
    unlabelled = [n for n in images if not _wnid_of(n, known)]
    if images and not unlabelled:
        return "wnid-files"
    found = ", ".join(f"{n}{'/' if k == 'dir' else ''}" for n, k in top[:10]) or "nothing"
    partly = (f" {len(images) - len(unlabelled)} of the {len(images)} images start with an "
              f"ImageNet wnid, {len(unlabelled)} {'does' if len(unlabelled) == 1 else 'do'} not "
              f"(e.g. {unlabelled[0]}): --layout wnid-files shards the others and lists these "
              f"as skipped (with --max-skipped-fraction above {len(unlabelled) / len(images):.2f}"
              f" to accept them)."
              if images and len(unlabelled) < len(images) else "")
    raise InputError(
        f"no known layout in {root} for split {split!r}. Looked for: "
        f"folder (ROOT/<class>/<image>), wnid-files (ROOT/<wnid>_*.JPEG, every image named "
        f"after its ImageNet wnid), imagenet-kaggle (ROOT/{KAGGLE_DATA}/{split}/ with "
        f"LOC_val_solution.csv and LOC_synset_mapping.txt), imagenet-devkit (flat "
        f"ILSVRC2012_val_*.JPEG with ROOT/<devkit>/{DEVKIT_GT} and {DEVKIT_META}). "
        f"Found: {found}.{partly}"
    )


def _wnid_of(name: str, known: set[str]) -> str | None:
    """The ImageNet wnid a file name starts with (``n01440764_10026.JPEG``), or None."""
    m = WNID_NAME.match(name)
    return m.group(1) if m and m.group(1) in known else None


def v2_variant_from_path(root: str) -> str:
    """The ImageNet-V2 release a folder holds, read from its own name and its parent's (the
    archives unpack to ``imagenetv2-<variant>-format-val/``): one of V2_VARIANTS, or '' when the
    names say none, or more than one."""
    names = [storage.basename(root.rstrip("/")),
             storage.basename(storage.dirname(root.rstrip("/")))]
    found = {variant for name in names for pattern, variant in _V2_VARIANT_NAMES
             if pattern.search(name)}
    return found.pop() if len(found) == 1 else ""


def layout_hint(source: Source) -> str:
    """A warning for a source that ``--layout auto`` read as a ``folder`` although it may be
    a released set: class ids that are all ImageNet-R (or -A) wnids but not all 200 of them (a
    partial copy), or integer class folders that could be ImageNet class indices (an ImageNet-V2
    copy with folders missing). For ImageNet-V2, a line when its variant is not known. '' when
    there is nothing to say."""
    if source.layout == "imagenet-v2" and not source.variant:
        return (f"the ImageNet-V2 variant of {source.root} is not known: its folder name names "
                f"none of {', '.join(V2_VARIANTS)}. Published accuracies are per variant, so "
                f"the nightly's fidelity check will not apply: pass --v2-variant")
    ids = {c["id"] for c in source.classes}
    if source.layout != "folder" or not ids:
        return ""
    if all(i.isdigit() for i in ids):
        if max(int(i) for i in ids) >= 1000:
            return ""
        order, numeric = sorted(ids), sorted(ids, key=int)
        first = next((i for i, (a, b) in enumerate(zip(order, numeric)) if a != b), None)
        numbered = "" if first is None else (f" (so class {first} is folder {order[first]!r}, "
                                             f"not {numeric[first]!r})")
        return (f"the {len(ids)} class folders are integers: taken as your own classes, "
                f"numbered by the folder names' string order as torchvision's ImageFolder "
                f"does{numbered}. If they are ImageNet class indices (ImageNet-V2, or a part of "
                f"it), shard with --layout imagenet-v2")
    fits = [layout for layout in ("imagenet-r", "imagenet-a") if ids <= set(subset_wnids(layout))]
    if not fits:
        return ""
    return (f"the {len(ids)} class folders are all {' and '.join(fits)} classes: if this is (a "
            f"part of) that set, shard it with --layout {fits[0]} (its 200 classes, and an "
            f"ImageNet model scored over them); as it is, it is an ordinary folder of "
            f"{len(ids)} classes")


def _recognise_class_folders(root: str, dirs: set[str]) -> str:
    """The layout of ROOT/<class>/...: a released robustness set when the folder names are exactly
    its classes, else ``folder``. Integer folders are ImageNet-V2 only when they are exactly
    0..999; any other integer folders (digit sets: 0..9) are a ``folder``, and ``layout_hint``
    warns when they could be ImageNet class indices."""
    if dirs == {str(i) for i in range(1000)}:
        return "imagenet-v2"
    for layout in ("imagenet-r", "imagenet-a"):
        if dirs == set(subset_wnids(layout)):
            return layout
    if dirs == set(imagenet_wnids()) and any(
            f.lower().startswith("sketch_") for f in storage.list_dir_files(
                storage.join(root, min(dirs)))):
        return "imagenet-sketch"
    return "folder"


def scan_source(root: str, split: str, layout: str = "auto", devkit: str | None = None,
                v2_variant: str = "") -> Source:
    """List the labelled images of one split of ``root`` in the given (or detected) layout.

    ``v2_variant`` (one of V2_VARIANTS) names an ImageNet-V2 release whose folder was renamed;
    by default it is read from the folder's name (``v2_variant_from_path``). InputError when it
    is given for another layout or contradicts the folder's name."""
    if layout == "auto":
        # a devkit named apart from the source (unpacked beside it) says what the source is
        layout = "imagenet-devkit" if devkit and split == "val" else detect_layout(root, split)
    if v2_variant and layout != "imagenet-v2":
        raise InputError(f"--v2-variant {v2_variant} is for ImageNet-V2; {root} is layout {layout}")
    if layout == "folder":
        return _scan_folder(root, split)
    if layout == "wnid-files":
        return _scan_wnid_files(root, split)
    if layout == "imagenet-kaggle":
        return _scan_kaggle(root, split)
    if layout == "imagenet-devkit":
        return _scan_devkit(root, split, devkit)
    if layout == "imagenet-v2":
        return _scan_imagenet_v2(root, split, _v2_variant(root, v2_variant))
    if layout in ("imagenet-r", "imagenet-a", "imagenet-sketch"):
        return _scan_fixed_classes(root, split, layout)
    raise InputError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")


def _v2_variant(root: str, given: str) -> str:
    """The given variant, else the one the folder's name says; a contradiction is an error."""
    if given and given not in V2_VARIANTS:
        raise InputError(f"unknown ImageNet-V2 variant {given!r}; one of {', '.join(V2_VARIANTS)}")
    named = v2_variant_from_path(root)
    if given and named and given != named:
        raise InputError(f"--v2-variant {given} contradicts the folder name {root}, which says "
                         f"{named}: rename the folder or drop --v2-variant")
    return given or named


def _top_level(root: str) -> list[tuple[str, str]]:
    import pyarrow.fs as pafs

    fs, p = storage.resolve(root)
    infos = storage.retrying(fs, f"listing {p}", fs.get_file_info,
                             pafs.FileSelector(p, recursive=False))
    return sorted(
        (storage.basename(i.path), "dir" if i.type == pafs.FileType.Directory else "file")
        for i in infos
    )


# Files a class folder commonly holds that are no images of it: listed in the manifest's
# skipped like any other, but not counted against jobs.shard --max-skipped-fraction.
OUTSIDE_CLASS, HIDDEN, SYSTEM = ("file outside any class folder", "hidden file",
                                 "system file, not an image")
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}


def is_ignorable(skipped: dict) -> bool:
    """Whether a skipped entry is a hidden or system file or one outside the class folders (a
    README, a licence): no image was lost there, so it does not count as a skipped image."""
    return skipped["reason"] in (OUTSIDE_CLASS, HIDDEN, SYSTEM)


def _class_folder_items(root: str, sub: str = "") -> tuple[list, list, list[str]]:
    """Items of ROOT/<class>/... (recursive inside each class), the files skipped with their
    reasons (loose top-level files, hidden files, dangling symlinks, ...), and the class ids:
    every non-hidden class folder, empty ones included, as torchvision's ``find_classes``
    numbers them, so an empty folder never shifts the index of the classes after it."""
    base = storage.join(root, sub) if sub else root
    items, skipped = [], []
    prefix = f"{sub}/" if sub else ""
    files, problems = storage.list_tree(base)
    for rel, _size in files:
        path = prefix + rel
        parts = rel.split("/")
        if len(parts) < 2:
            skipped.append({"path": path, "reason": OUTSIDE_CLASS})
        elif any(p.startswith(".") for p in parts):
            skipped.append({"path": path, "reason": HIDDEN})
        elif parts[-1].lower() in SYSTEM_FILES:
            skipped.append({"path": path, "reason": SYSTEM})
        else:
            items.append((path, parts[0]))
    skipped += [{"path": prefix + p["path"], "reason": p["reason"]} for p in problems]
    class_ids = [d for d in storage.list_dirs(base) if not d.startswith(".")]
    return items, skipped, class_ids


def _scan_folder(root: str, split: str) -> Source:
    items, skipped, class_ids = _class_folder_items(root)
    names = _read_synset_mapping(root)
    classes = make_classes(class_ids, names)
    return Source("folder", root, split, classes, sorted(items), skipped)


def _scan_imagenet_v2(root: str, split: str, variant: str) -> Source:
    """ImageNet-V2: ROOT/<0..999>/*.jpeg, each folder an integer class index in the sorted-wnid
    order, mapped to its wnid **numerically** ("10" is wnid 10, whatever the string order of the
    folder names). The class list is the 1000 ImageNet classes, folders missing or not."""
    wnids = imagenet_wnids()
    items, skipped, folders = _class_folder_items(root)
    labelled = []
    for path, folder in items:
        if folder.isdigit() and int(folder) < len(wnids):
            labelled.append((path, wnids[int(folder)]))
        else:
            skipped.append({"path": path, "reason": f"folder {folder!r} is not an ImageNet class "
                                                    f"index 0..{len(wnids) - 1}"})
    return Source("imagenet-v2", root, split, make_classes(wnids), sorted(labelled), skipped,
                  variant)


def _scan_wnid_files(root: str, split: str) -> Source:
    """wnid-files: ROOT/<wnid>_*.<ext>, each labelled by the ImageNet wnid its name starts with.
    The class list is the 1000 ImageNet classes (an ImageNet model's order), whichever appear.
    Files in subfolders, and files not named after a wnid, are skipped with the reason."""
    known = set(imagenet_wnids())
    files, problems = storage.list_tree(root)
    items, skipped = [], list(problems)
    for rel, _size in files:
        name = rel.rsplit("/", 1)[-1]
        if any(p.startswith(".") for p in rel.split("/")):
            skipped.append({"path": rel, "reason": HIDDEN})
        elif name.lower() in SYSTEM_FILES:
            skipped.append({"path": rel, "reason": SYSTEM})
        elif "/" in rel:
            skipped.append({"path": rel, "reason": "in a subfolder: the wnid-files layout reads "
                                                   "ROOT/<wnid>_*.<ext> only"})
        elif (wnid := _wnid_of(name, known)) is None:
            skipped.append({"path": rel, "reason": "file name does not start with an ImageNet "
                                                   "wnid (nNNNNNNNN_...)"})
        else:
            items.append((rel, wnid))
    return Source("wnid-files", root, split, make_classes(sorted(known)), sorted(items), skipped)


def _scan_fixed_classes(root: str, split: str, layout: str) -> Source:
    """ImageNet-R/-A (the 200 wnids of ``subset_wnids``) and ImageNet-Sketch (the 1000): ROOT/<wnid>/*,
    with the set's whole class list whatever folders exist; folders outside it are skipped."""
    wnids = subset_wnids(layout) if layout in ("imagenet-r", "imagenet-a") else imagenet_wnids()
    known = set(wnids)
    items, skipped, _ = _class_folder_items(root)
    kept = [(p, c) for p, c in items if c in known]
    skipped += [{"path": p, "reason": f"folder {c!r} is not one of the {len(wnids)} {layout} "
                                      f"classes"} for p, c in items if c not in known]
    return Source(layout, root, split, make_classes(wnids), sorted(kept), skipped)


def _read_synset_mapping(root: str) -> dict[str, str]:
    for candidate in (storage.join(root, "LOC_synset_mapping.txt"),
                      storage.join(storage.dirname(root), "LOC_synset_mapping.txt")):
        if storage.exists(candidate):
            out = {}
            for line in storage.read_text(candidate).splitlines():
                if line.strip():
                    wnid, _, name = line.strip().partition(" ")
                    out[wnid] = name.split(",")[0].strip() or wnid
            return out
    return {}


def _scan_kaggle(root: str, split: str) -> Source:
    names = _read_synset_mapping(root)
    sub = f"{KAGGLE_DATA}/{split}"
    if split == "train":
        items, skipped, class_ids = _class_folder_items(root, sub)
        ids = names.keys() if names else class_ids
        classes = make_classes(ids, names)
        return Source("imagenet-kaggle", root, split, classes, sorted(items), skipped)
    csv_path = storage.join(root, f"LOC_{split}_solution.csv")
    if not storage.exists(csv_path):
        raise FileNotFoundError(f"imagenet-kaggle layout: {csv_path} is missing")
    truth = _read_kaggle_solution(csv_path)
    files, problems = storage.list_tree(storage.join(root, sub))
    items, seen = [], set()
    skipped = [{"path": f"{sub}/{p['path']}", "reason": p["reason"]} for p in problems]
    for rel, _size in files:
        path = f"{sub}/{rel}"
        image_id = rel.rsplit("/", 1)[-1].split(".", 1)[0]
        if image_id not in truth:
            skipped.append({"path": path, "reason": f"no ground truth for {image_id} in {csv_path}"})
            continue
        seen.add(image_id)
        items.append((path, truth[image_id]))
    for image_id in sorted(set(truth) - seen):
        skipped.append({"path": f"{sub}/{image_id}.JPEG",
                        "reason": "ground-truth line with no image"})
    ids = names.keys() if names else {c for _, c in items}
    return Source("imagenet-kaggle", root, split, make_classes(ids, names), sorted(items), skipped)


def _read_kaggle_solution(path: str) -> dict[str, str]:
    """ImageId -> wnid; joined on ImageId, never on row order."""
    reader = csv.DictReader(io.StringIO(storage.read_text(path)))
    if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise InputError(f"{path}: expected columns ImageId,PredictionString, "
                         f"found {reader.fieldnames}")
    out = {}
    for line_no, row in enumerate(reader, start=2):
        tokens = (row["PredictionString"] or "").split()
        if not tokens:
            raise InputError(f"{path}:{line_no}: empty PredictionString for {row['ImageId']}")
        out[row["ImageId"]] = tokens[0]
    return out


def _devkit_dir(root: str) -> str | None:
    for d in DEVKIT_DIRS:
        cand = storage.join(root, d) if d != "." else root
        if storage.exists(storage.join(cand, DEVKIT_GT)):
            return cand
    return None


def read_devkit_meta(meta_path: str) -> tuple[dict[int, str], dict[str, str]]:
    """ILSVRC2012 id -> wnid and wnid -> name for the 1000 leaf synsets, as torchvision reads them."""
    import scipy.io

    meta = scipy.io.loadmat(io.BytesIO(storage.read_bytes(meta_path)), squeeze_me=True)["synsets"]
    id_to_wnid, names = {}, {}
    for row in meta:
        ilsvrc_id, wnid, words, num_children = row[0], row[1], row[2], row[4]
        if int(num_children) == 0:
            id_to_wnid[int(ilsvrc_id)] = str(wnid)
            names[str(wnid)] = str(words).split(",")[0].strip()
    return id_to_wnid, names


def _scan_devkit(root: str, split: str, devkit: str | None) -> Source:
    if split != "val":
        raise InputError("the imagenet-devkit layout holds the val split only; shard train "
                         "with --layout folder (ROOT/<wnid>/*.JPEG)")
    devkit = devkit or _devkit_dir(root)
    if devkit is None:
        raise FileNotFoundError(f"imagenet-devkit layout: no {DEVKIT_GT} under {root}")
    id_to_wnid, names = read_devkit_meta(storage.join(devkit, DEVKIT_META))
    gt_path = storage.join(devkit, DEVKIT_GT)
    truth = {}
    for line_no, line in enumerate(storage.read_text(gt_path).split(), start=1):
        if int(line) not in id_to_wnid:
            raise InputError(f"{gt_path}:{line_no}: ILSVRC2012 id {line} is not a leaf "
                             f"synset in {DEVKIT_META}")
        truth[line_no] = id_to_wnid[int(line)]
    files, problems = storage.list_tree(root)
    items, seen = [], set()
    skipped = [p for p in problems if "/" not in p["path"]]
    for rel, _size in files:
        if "/" in rel:
            continue  # the devkit folder and anything nested is not a val image
        m = VAL_NAME.match(rel)
        if not m:
            skipped.append({"path": rel, "reason": "not named ILSVRC2012_val_NNNNNNNN.<ext>"})
        elif int(m.group(1)) not in truth:
            skipped.append({"path": rel, "reason": f"no ground-truth line {int(m.group(1))} "
                                                   f"in {gt_path}"})
        else:
            seen.add(int(m.group(1)))
            items.append((rel, truth[int(m.group(1))]))
    for n in sorted(set(truth) - seen):
        skipped.append({"path": f"ILSVRC2012_val_{n:08d}.JPEG",
                        "reason": "ground-truth line with no image"})
    classes = make_classes(id_to_wnid.values(), names)
    return Source("imagenet-devkit", root, split, classes, sorted(items), skipped)


def with_classes(source: Source, classes: list[dict]) -> Source:
    """Use a given class list (e.g. the train split's); items of other classes are skipped."""
    ids = {c["id"] for c in classes}
    items = [(p, c) for p, c in source.items if c in ids]
    skipped = source.skipped + [{"path": p, "reason": f"class {c} is not in the class list"}
                                for p, c in source.items if c not in ids]
    return Source(source.layout, source.root, source.split, classes, items, skipped,
                  source.variant)
