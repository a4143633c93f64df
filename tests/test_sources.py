"""ImageNet layouts and class-folder sources: labels, class order and what is skipped."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import scipy.io

from pipeline import sources

REAL_FIRST_VAL = {490: "n01751748", 361: "n09193705", 171: "n02105855", 822: "n04263257"}


def _touch_jpeg(path, seed=0):
    from tests.conftest import photo_like

    os.makedirs(os.path.dirname(path), exist_ok=True)
    photo_like(np.random.default_rng(seed), 40, 30).save(path)


def write_meta_mat(path, id_to_wnid: dict[int, str]):
    """A devkit-style meta.mat: the 1000 leaf synsets plus one non-leaf, as the devkit has."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
             ("num_children", "O"), ("children", "O"), ("wordnet_height", "O"),
             ("num_train_images", "O")]
    rows = [(i, w, f"words of {w}, alias", "gloss", 0, np.zeros(0), 0, 1300)
            for i, w in sorted(id_to_wnid.items())]
    rows.append((1001, "n00000000", "entity", "gloss", 2, np.array([1, 2]), 18, 0))
    arr = np.array(rows, dtype=dtype)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, {"synsets": arr.reshape(-1, 1)})


def test_folder_layout_labels_are_sorted_class_positions(tmp_path):
    for cls in ("zebra", "apple", "mango"):
        _touch_jpeg(str(tmp_path / cls / f"{cls}1.jpg"))
    (tmp_path / "loose.txt").write_text("not in a class")
    src = sources.scan_source(str(tmp_path), "train")
    assert src.layout == "folder"
    assert [c["id"] for c in src.classes] == ["apple", "mango", "zebra"]
    assert dict((p, src.class_index[c]) for p, c in src.items) == {
        "apple/apple1.jpg": 0, "mango/mango1.jpg": 1, "zebra/zebra1.jpg": 2}
    assert src.skipped == [{"path": "loose.txt", "reason": "file outside any class folder"}]


def test_folder_of_imagenet_wnids_gets_torchvision_names(tmp_path):
    _touch_jpeg(str(tmp_path / "n01440764" / "a.JPEG"))
    src = sources.scan_source(str(tmp_path), "train")
    assert src.classes[0]["name"] == "tench"


def test_kaggle_layout_joins_on_image_id_not_row_order(tmp_path):
    data = tmp_path / "ILSVRC/Data/CLS-LOC"
    for wnid in ("n01440764", "n01443537"):
        _touch_jpeg(str(data / "train" / wnid / f"{wnid}_1.JPEG"))
    truth = {"ILSVRC2012_val_00000002": "n01443537", "ILSVRC2012_val_00000001": "n01440764",
             "ILSVRC2012_val_00000009": "n01440764"}  # 9 has no image
    for image_id in ("ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002",
                     "ILSVRC2012_val_00000003"):  # 3 has no ground truth
        _touch_jpeg(str(data / "val" / f"{image_id}.JPEG"))
    with open(tmp_path / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for image_id, wnid in truth.items():  # deliberately not in file order
            w.writerow([image_id, f"{wnid} 1 2 3 4 {wnid} 5 6 7 8"])
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert sources.detect_layout(str(tmp_path), "val") == "imagenet-kaggle"
    val = sources.scan_source(str(tmp_path), "val")
    labels = {p.rsplit("/", 1)[-1]: val.class_index[c] for p, c in val.items}
    assert labels == {"ILSVRC2012_val_00000001.JPEG": 0, "ILSVRC2012_val_00000002.JPEG": 1}
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in val.skipped}
    assert "no ground truth" in reasons["ILSVRC2012_val_00000003.JPEG"]
    assert reasons["ILSVRC2012_val_00000009.JPEG"] == "ground-truth line with no image"
    assert [c["name"] for c in val.classes] == ["tench", "goldfish"]
    train = sources.scan_source(str(tmp_path), "train")
    assert train.layout == "imagenet-kaggle" and len(train.items) == 2


def test_devkit_ground_truth_maps_to_sorted_wnid_indices(tmp_path):
    """The real first four val labels (490, 361, 171, 822) become 65, 970, 230, 809."""
    wnids = sources.imagenet_wnids()
    rng = np.random.default_rng(0)
    others = [w for w in wnids if w not in REAL_FIRST_VAL.values()]
    free_ids = [i for i in range(1, 1001) if i not in REAL_FIRST_VAL]
    rng.shuffle(others)  # ILSVRC2012 ids do not follow wnid order; neither does this fixture
    id_to_wnid = dict(zip(free_ids, others)) | REAL_FIRST_VAL
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    write_meta_mat(str(devkit / "data/meta.mat"), id_to_wnid)
    (devkit / "data/ILSVRC2012_validation_ground_truth.txt").write_text("490\n361\n171\n822\n1\n")
    for n in range(1, 5):
        _touch_jpeg(str(tmp_path / f"ILSVRC2012_val_{n:08d}.JPEG"), seed=n)
    assert sources.detect_layout(str(tmp_path), "val") == "imagenet-devkit"
    src = sources.scan_source(str(tmp_path), "val")
    labels = [src.class_index[c] for _, c in sorted(src.items)]
    assert labels == [65, 970, 230, 809]
    assert len(src.classes) == 1000
    assert src.skipped == [{"path": "ILSVRC2012_val_00000005.JPEG",
                            "reason": "ground-truth line with no image"}]


def test_a_devkit_unpacked_beside_the_images_is_found_with_auto_layout(tmp_path):
    """--devkit DIR outside the source (as the two archives unpack) with --layout auto."""
    id_to_wnid = dict(zip(range(1, 1001), sources.imagenet_wnids()))
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    write_meta_mat(str(devkit / "data/meta.mat"), id_to_wnid)
    (devkit / "data/ILSVRC2012_validation_ground_truth.txt").write_text("3\n1\n")
    images = tmp_path / "val"
    for n in (1, 2):
        _touch_jpeg(str(images / f"ILSVRC2012_val_{n:08d}.JPEG"), seed=n)
    src = sources.scan_source(str(images), "val", devkit=str(devkit))
    assert src.layout == "imagenet-devkit"
    assert [src.class_index[c] for _, c in sorted(src.items)] == [2, 0]


def test_unknown_layout_names_what_it_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        sources.scan_source(str(tmp_path), "val")
    msg = str(e.value)
    for expected in ("folder", "wnid-files", "imagenet-kaggle", "imagenet-devkit", "readme.txt"):
        assert expected in msg


# --- the robustness sets' layouts (docs/EVALUATION.md, "The evaluation suite") -------------------

def test_imagenet_v2_folders_are_class_indices_mapped_numerically(tmp_path):
    """Folders 2, 9, 10, 100: their string order (10, 100, 2, 9) differs from their numeric order,
    so a string sort (the dataset README's ImageFolder recipe) would give each the wrong wnid."""
    for i in range(1000):
        os.makedirs(tmp_path / str(i))
    for folder in ("2", "9", "10", "100"):
        _touch_jpeg(str(tmp_path / folder / f"{folder}_a.jpeg"))
    src = sources.scan_source(str(tmp_path), "val")
    wnids = sources.imagenet_wnids()
    assert src.layout == "imagenet-v2" and len(src.classes) == 1000
    assert [c["id"] for c in src.classes] == wnids
    labels = {p: src.class_index[c] for p, c in src.items}
    assert labels == {"2/2_a.jpeg": 2, "9/9_a.jpeg": 9, "10/10_a.jpeg": 10,
                      "100/100_a.jpeg": 100}
    assert dict(src.items)["10/10_a.jpeg"] == wnids[10]
    assert sorted(["2", "9", "10", "100"]).index("10") == 0  # the string order the test defeats


def test_integer_folders_that_are_not_all_of_v2_are_a_folder_with_a_warning(tmp_path):
    """Folders 0, 3, 12: taken as the user's own classes in ImageFolder's string order, with a
    warning naming --layout imagenet-v2 and the class the string order moves; read as V2 when
    asked, folder N being ImageNet class N."""
    for folder in ("0", "3", "12"):
        _touch_jpeg(str(tmp_path / folder / "x.jpeg"))
    own = sources.scan_source(str(tmp_path), "val")
    assert own.layout == "folder"
    assert [c["id"] for c in own.classes] == ["0", "12", "3"]  # ImageFolder's string order
    hint = sources.layout_hint(own)
    assert "--layout imagenet-v2" in hint and "class 1 is folder '12', not '3'" in hint
    v2 = sources.scan_source(str(tmp_path), "val", layout="imagenet-v2")
    assert {p: v2.class_index[c] for p, c in v2.items} == {"0/x.jpeg": 0, "3/x.jpeg": 3,
                                                           "12/x.jpeg": 12}
    (tmp_path / "1000").mkdir()
    _touch_jpeg(str(tmp_path / "1000" / "y.jpeg"))
    bad = sources.scan_source(str(tmp_path), "val", layout="imagenet-v2")
    assert bad.skipped == [{"path": "1000/y.jpeg",
                            "reason": "folder '1000' is not an ImageNet class index 0..999"}]
    # a folder over 999 cannot be an ImageNet index: no warning
    assert sources.layout_hint(sources.scan_source(str(tmp_path), "val")) == ""


def test_digit_folders_0_to_9_are_a_folder_of_ten_classes(tmp_path):
    for d in range(10):
        _touch_jpeg(str(tmp_path / str(d) / f"{d}.png"), d)
    src = sources.scan_source(str(tmp_path), "train")
    assert src.layout == "folder" and [c["id"] for c in src.classes] == [str(d) for d in range(10)]
    assert {src.class_index[c] for _, c in src.items} == set(range(10))
    hint = sources.layout_hint(src)
    assert "--layout imagenet-v2" in hint and "so class" not in hint  # string order = numeric


# --- ImageNet in one flat folder, wnid in the file name --------------------------------------------

def test_flat_wnid_named_files_are_labelled_by_their_wnid(tmp_path):
    """ImageNet train's per-class tars extracted into one folder, and the one-image-per-class
    sample sets: labels from the leading wnid, over the 1000 ImageNet classes."""
    wnids = sources.imagenet_wnids()
    names = [f"{wnids[0]}_10026.JPEG", f"{wnids[0]}_77.JPEG", f"{wnids[1]}_goldfish.JPEG",
             f"{wnids[999]}_toilet_tissue.jpg"]
    for i, n in enumerate(names):
        _touch_jpeg(str(tmp_path / n), i)
    (tmp_path / "LICENSE.txt").write_text("terms")
    src = sources.scan_source(str(tmp_path), "train")
    assert src.layout == "wnid-files" and len(src.classes) == 1000
    assert {p: src.class_index[c] for p, c in src.items} == {
        names[0]: 0, names[1]: 0, names[2]: 1, names[3]: 999}
    assert src.classes[1]["name"] == "goldfish"
    assert src.skipped == [{"path": "LICENSE.txt", "reason": "file name does not start with an "
                                                             "ImageNet wnid (nNNNNNNNN_...)"}]


def test_a_flat_folder_with_some_images_not_named_by_wnid(tmp_path):
    """auto takes wnid-files only when every image is named after a wnid; the error says how
    many are not, and --layout wnid-files skips them with the reason."""
    wnid = sources.imagenet_wnids()[5]
    _touch_jpeg(str(tmp_path / f"{wnid}_1.JPEG"))
    _touch_jpeg(str(tmp_path / "holiday.jpg"))
    _touch_jpeg(str(tmp_path / "n99999999_1.jpg"))  # wnid-shaped, not an ImageNet class
    with pytest.raises(ValueError, match=r"1 of the 3 images start with an ImageNet wnid, 2 do "
                                         r"not .*--layout wnid-files"):
        sources.scan_source(str(tmp_path), "val")
    src = sources.scan_source(str(tmp_path), "val", layout="wnid-files")
    assert src.items == [(f"{wnid}_1.JPEG", wnid)]
    assert sorted(s["path"] for s in src.skipped) == ["holiday.jpg", "n99999999_1.jpg"]


# --- ImageNet-V2's three releases ---------------------------------------------------------------

@pytest.mark.parametrize("folder,variant", [
    ("imagenetv2-matched-frequency-format-val", "matched-frequency"),
    ("imagenetv2-threshold0.7-format-val", "threshold0.7"),
    ("imagenetv2-top-images-format-val", "top-images"),
    ("ImageNetV2-TopImages/val", "top-images"),  # the parent folder says it
    ("imagenet-v2", "")])
def test_v2_variant_from_the_folder_name(tmp_path, folder, variant):
    root = tmp_path / folder
    for i in range(1000):
        os.makedirs(root / str(i))
    _touch_jpeg(str(root / "7" / "a.jpeg"))
    src = sources.scan_source(str(root), "val")
    assert (src.layout, src.variant) == ("imagenet-v2", variant)
    assert ("variant" in sources.layout_hint(src)) == (not variant)


def test_v2_variant_flag_for_a_renamed_folder_and_its_contradictions(tmp_path):
    root = tmp_path / "my-v2"
    for i in range(1000):
        os.makedirs(root / str(i))
    _touch_jpeg(str(root / "7" / "a.jpeg"))
    src = sources.scan_source(str(root), "val", v2_variant="threshold0.7")
    assert src.variant == "threshold0.7" and sources.layout_hint(src) == ""
    named = tmp_path / "imagenetv2-top-images-format-val"
    os.rename(root, named)
    with pytest.raises(ValueError, match="contradicts the folder name"):
        sources.scan_source(str(named), "val", v2_variant="threshold0.7")
    folder = tmp_path / "classes"
    _touch_jpeg(str(folder / "cat" / "a.jpg"))
    with pytest.raises(ValueError, match="is for ImageNet-V2"):
        sources.scan_source(str(folder), "val", v2_variant="threshold0.7")


@pytest.mark.parametrize("layout", ["imagenet-r", "imagenet-a"])
def test_imagenet_r_and_a_hold_their_200_classes(tmp_path, layout):
    wnids = sources.subset_wnids(layout)
    assert len(wnids) == 200 and wnids == sorted(wnids)
    assert set(wnids) < set(sources.imagenet_wnids())
    for w in wnids:
        os.makedirs(tmp_path / w)
    _touch_jpeg(str(tmp_path / wnids[0] / "a photo of it.jpg"))
    _touch_jpeg(str(tmp_path / wnids[199] / "art_1.jpg"))
    (tmp_path / "README.txt").write_text("the dataset's own readme")
    src = sources.scan_source(str(tmp_path), "val")
    assert src.layout == layout
    assert [c["id"] for c in src.classes] == wnids
    names = sources.imagenet_category_names()
    assert [c["name"] for c in src.classes] == [names[w] for w in wnids]
    assert {p: src.class_index[c] for p, c in src.items} == {
        f"{wnids[0]}/a photo of it.jpg": 0, f"{wnids[199]}/art_1.jpg": 199}
    assert src.skipped == [{"path": "README.txt", "reason": sources.OUTSIDE_CLASS}]
    assert sources.is_ignorable(src.skipped[0])


def test_r_layout_with_a_foreign_folder_skips_it_by_name(tmp_path):
    wnids = sources.subset_wnids("imagenet-r")
    _touch_jpeg(str(tmp_path / wnids[3] / "a.jpg"))
    _touch_jpeg(str(tmp_path / "n99999999" / "b.jpg"))
    src = sources.scan_source(str(tmp_path), "val", layout="imagenet-r")
    assert len(src.classes) == 200 and src.items == [(f"{wnids[3]}/a.jpg", wnids[3])]
    assert src.skipped == [{"path": "n99999999/b.jpg",
                            "reason": "folder 'n99999999' is not one of the 200 imagenet-r "
                                      "classes"}]


def test_imagenet_sketch_is_recognised_with_its_1000_classes(tmp_path):
    wnids = sources.imagenet_wnids()
    for w in wnids:
        os.makedirs(tmp_path / w)
    _touch_jpeg(str(tmp_path / wnids[0] / "sketch_1.JPEG"))
    _touch_jpeg(str(tmp_path / wnids[500] / "sketch_7.JPEG"))
    src = sources.scan_source(str(tmp_path), "val")
    assert src.layout == "imagenet-sketch" and len(src.classes) == 1000
    assert {p: src.class_index[c] for p, c in src.items} == {
        f"{wnids[0]}/sketch_1.JPEG": 0, f"{wnids[500]}/sketch_7.JPEG": 500}


def test_a_partial_imagenet_r_copy_stays_a_folder_with_a_hint(tmp_path):
    wnids = sources.subset_wnids("imagenet-r")
    for w in wnids[:7]:
        _touch_jpeg(str(tmp_path / w / "a.jpg"))
    src = sources.scan_source(str(tmp_path), "val")
    assert src.layout == "folder" and len(src.classes) == 7
    assert "--layout imagenet-r" in sources.layout_hint(src)
    r = sources.scan_source(str(tmp_path), "val", layout="imagenet-r")
    assert sources.layout_hint(r) == "" and len(r.classes) == 200
