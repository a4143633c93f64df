"""The evaluation suite: subset scoring, ImageNet-ReaL, the nightly over several sets, the
published-accuracy guard and the append-only history.

Generated data throughout: three sets in three layouts, sharded with ``jobs.shard --layout auto``:
  val  ImageNet val images (ILSVRC2012_val_NNNNNNNN.JPEG) of one class, over the 1000 classes
  v2   ImageNet-V2: folders 0..999, images in one folder
  r    ImageNet-R: the 200 wnid folders, images (names with spaces) in one, and a README.txt
and 1000-class ResNet-18 state_dicts whose head ignores the image (zero weights, chosen biases),
so every answer, and every accuracy, is known by construction.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18
from torchvision.transforms import v2 as T

from jobs import nightly_eval, shard as shard_job
from pipeline import history as historylib, metrics, nightly, predict, predictor, published
from pipeline import regression, shards, sources
from tests.conftest import photo_like

WNIDS = sources.imagenet_wnids()
R_WNIDS = sources.subset_wnids("imagenet-r")
VAL_CLASS = next(i for i, w in enumerate(WNIDS) if w not in set(R_WNIDS))  # not an R class
R_CLASS, R_OTHER = (WNIDS.index(R_WNIDS[i]) for i in (5, 17))  # two R classes
SMALL = ["--resize-size", "40", "--crop-size", "32", "--precision", "fp32", "--batch-size", "8"]


def _jpeg(path, seed, w=48, h=36):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    photo_like(np.random.default_rng(seed), w, h).save(path, quality=90)


def _shard(src: str, out: str) -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        code = shard_job.main(["--source", src, "--out", out, "--split", "val", "--no-progress"])
    assert code == 0
    return os.path.join(out, "val.json")


@pytest.fixture(scope="module")
def suite(tmp_path_factory, ray_local):
    """The three sets' manifests (8 images each, all of one class) and their source folders."""
    root = tmp_path_factory.mktemp("suite")
    val = root / "val-src"
    for i in range(1000):
        os.makedirs(val / WNIDS[i])
    for n in range(1, 9):
        _jpeg(str(val / WNIDS[VAL_CLASS] / f"ILSVRC2012_val_{n:08d}.JPEG"), n)
    v2 = root / "v2-src"
    for i in range(1000):
        os.makedirs(v2 / str(i))
    for n in range(8):
        _jpeg(str(v2 / str(VAL_CLASS) / f"{n}.jpeg"), 100 + n)
    r = root / "r-src"
    for w in R_WNIDS:
        os.makedirs(r / w)
    for n in range(8):
        _jpeg(str(r / WNIDS[R_CLASS] / f"art {n} of it.jpg"), 200 + n, 64, 30)
    (r / "README.txt").write_text("ImageNet-R: renditions of 200 ImageNet classes")
    return {"val": _shard(str(val), str(root / "val")), "v2": _shard(str(v2), str(root / "v2")),
            "r": _shard(str(r), str(root / "r")), "r_src": str(r), "root": root}


def _head_weights(path, biases: dict[int, float]) -> str:
    """A 1000-class ResNet-18 state_dict whose head answers by ``biases`` whatever the image."""
    torch.manual_seed(0)
    net = resnet18(num_classes=1000)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        for cls, b in biases.items():
            net.fc.bias[cls] = b
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """good: VAL_CLASS first overall, R_CLASS first among the R classes: every set 100%.
    r_damaged: as good but R_OTHER above R_CLASS: the R set drops to 0%, val and v2 unchanged."""
    d = tmp_path_factory.mktemp("heads")
    return {"good": _head_weights(d / "good.pt", {VAL_CLASS: 50, R_CLASS: 40}),
            "r_damaged": _head_weights(d / "r_damaged.pt",
                                       {VAL_CLASS: 50, R_CLASS: 40, R_OTHER: 45})}


def test_sets_are_sharded_in_their_layouts(suite):
    val, v2, r = (shards.load_manifest(suite[k]) for k in ("val", "v2", "r"))
    assert (val.layout, v2.layout, r.layout) == ("folder", "imagenet-v2", "imagenet-r")
    assert len(val.classes) == len(v2.classes) == 1000 and len(r.classes) == 200
    assert [c["id"] for c in r.classes] == R_WNIDS
    assert r.skipped == [{"path": "README.txt", "reason": sources.OUTSIDE_CLASS}]
    assert [published.dataset_kind(m) for m in (val, v2, r)] == ["imagenet-val", "imagenet-v2",
                                                               "imagenet-r"]
    assert val.total_samples == v2.total_samples == r.total_samples == 8


# --- subset scoring ------------------------------------------------------------------------------

def test_subset_scoring_matches_a_plain_torch_loop_over_the_subset_logits(suite, tmp_path):
    """A random 1000-class model on the R set: the job's pred, names and top-k probabilities are
    those of the softmax over the 200 R logits, computed here independently with torchvision's
    transforms; and restricting matters (the 1000-way argmax falls outside the 200)."""
    torch.manual_seed(3)
    net = resnet18(num_classes=1000).eval()
    weights = str(tmp_path / "random1000.pt")
    torch.save(net.state_dict(), weights)
    out = str(tmp_path / "pred")
    summary = predict.run_prediction(suite["r"], weights, out, resize_size=40, crop_size=32,
                                     precision="fp32", batch_size=8, progress=False)
    df = metrics.read_predictions(out).set_index("key")
    assert summary["scored_over"] == "data classes" and summary["model_classes"] == 1000
    assert len(summary["classes"]) == 200

    tf = T.Compose([T.ToImage(), T.Resize(40, antialias=True), T.CenterCrop(32),
                    T.ToDtype(torch.float32, scale=True),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    folder = os.path.join(suite["r_src"], WNIDS[R_CLASS])
    files = sorted(os.listdir(folder))
    x = torch.stack([tf(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files])
    subset = torch.tensor([WNIDS.index(w) for w in R_WNIDS])
    with torch.no_grad():
        logits = net(x)
    probs = logits[:, subset].softmax(dim=1)
    p, i = probs.topk(5, dim=1)
    names = sources.imagenet_category_names()
    for row, f in enumerate(files):
        got = df.loc[os.path.splitext(f)[0]]
        assert got["pred"] == int(i[row, 0]) and got["label"] == 5
        assert got["pred_name"] == names[R_WNIDS[int(i[row, 0])]]
        assert list(got["topk_index"]) == i[row].tolist()
        np.testing.assert_allclose(got["topk_prob"], p[row].numpy(), atol=2e-3)
    assert (logits.argmax(dim=1)[:, None] != subset[None, :]).all(dim=1).any()


def test_only_subset_sets_or_an_explicit_flag_restrict_the_scoring():
    data = [{"index": 0, "id": "a", "name": "a"}, {"index": 1, "id": "b", "name": "b"}]
    model = data + [{"index": 2, "id": "zz", "name": "extra"}]
    assert predictor.scored_classes(data, model, restrict=False) == (model, None)
    classes, index = predictor.scored_classes(data, model, restrict=True)
    assert classes == data and index.tolist() == [0, 1]
    assert predictor.scored_classes(data, data, restrict=True) == (data, None)
    with pytest.raises(ValueError, match="lack"):
        predictor.scored_classes(model, data, restrict=True)
    assert [predictor.restricts("auto", layout) for layout in
            ("imagenet-r", "imagenet-a", "imagenet-v2", "folder")] == [True, True, False, False]
    assert predictor.restricts("on", "folder") and not predictor.restricts("off", "imagenet-r")


# --- ImageNet-ReaL -------------------------------------------------------------------------------

def test_real_labels_score_any_of_the_labels_and_leave_out_empty_lists(suite, tmp_path):
    """Top-5 answers VAL_CLASS, 600, 601, 602, 603 for every image. Labels: image 1 right at top-1,
    image 2 right at top-5 only (and two labels), image 3 wrong, image 4 an empty list (left
    out), images 5-8 right; the ordinary top-1 is still over all 8."""
    weights = _head_weights(tmp_path / "w.pt", {VAL_CLASS: 50, 600: 40, 601: 30, 602: 20,
                                                603: 10})
    real = [[VAL_CLASS], [602, 7], [7], [], *([[VAL_CLASS]] * 4)] + [[1]] * 5
    labels = tmp_path / "real.json"
    labels.write_text(json.dumps(real))
    out = str(tmp_path / "pred")
    summary = predict.run_prediction(suite["val"], weights, out, resize_size=40, crop_size=32,
                                     precision="fp32", batch_size=8, progress=False,
                                     real_labels=str(labels))
    assert summary["real_samples"] == 7
    assert summary["real_top1"] == pytest.approx(100 * 5 / 7)
    assert summary["real_top5"] == pytest.approx(100 * 6 / 7)
    assert summary["top1"] == 100.0 and summary["samples"] == 8
    lo, hi = summary["real_top1_ci95"]
    assert lo < summary["real_top1"] < hi
    table = metrics.format_table(summary)
    assert "ReaL top-1 / top-5 %" in table and "(7 images with labels)" in table


def test_real_labels_builtin_and_bad_files(tmp_path):
    real = metrics.load_real_labels("builtin")
    assert len(real) == 50_000 and sum(not r for r in real) == 3_163
    assert sum(len(r) >= 2 for r in real) == 7_443
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[1], [1000]]))
    with pytest.raises(ValueError, match="bad.json"):
        metrics.load_real_labels(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        metrics.load_real_labels(str(bad))


def test_real_labels_need_imagenet_classes():
    df = pd.DataFrame({"key": ["ILSVRC2012_val_00000001"], "topk_index": [[0]]})
    with pytest.raises(ValueError, match="not ImageNet wnids"):
        metrics.real_accuracy(df, [{"index": 0, "id": "cat", "name": "cat"}], [[0]])
    classes = sources.make_classes(WNIDS)
    with pytest.raises(ValueError, match="hold 1 entries"):
        metrics.real_accuracy(pd.DataFrame({"key": ["ILSVRC2012_val_00000002"],
                                            "topk_index": [[0]]}), classes, [[0]])


# --- naming the sets -----------------------------------------------------------------------------

def test_sets_are_named_and_real_labels_find_their_set():
    sets = nightly.parse_sets(["val=a/val.json", "s3://b/k=v/v2.json", "shards/other.json"],
                              ["val=builtin"])
    assert [(s.name, s.manifest, s.real_labels) for s in sets] == [
        ("val", "a/val.json", "builtin"), ("v2", "s3://b/k=v/v2.json", ""),
        ("other", "shards/other.json", "")]
    assert nightly.parse_sets(["x/val.json"], ["r.json"])[0].real_labels == "r.json"
    for data, real, msg in [(["a/val.json", "b/val.json"], [], "two sets are named 'val'"),
                            (["a=x.json", "b=y.json"], ["r.json"], "say which"),
                            (["a=x.json"], ["b=r.json"], "no set named 'b'"),
                            ([], [], "no set")]:
        with pytest.raises(nightly.SuiteError, match=msg):
            nightly.parse_sets(data, real)


def test_two_sets_with_one_name_exit_2_before_any_work(capsys):
    code = nightly_eval.main(["--data", "a/val.json", "--data", "b/val.json", "--weights", "none",
                              "--history", "/nonexistent/h"])
    assert code == 2 and "two sets are named 'val'" in capsys.readouterr().err


# --- the published-accuracy guard ----------------------------------------------------------------

def _summary(top1, n, **kw):
    k = round(top1 * n / 100)
    return {"model_id": "m", "weights_sha256": "abc", "samples": n, "top1": top1,
            "top1_ci95": metrics.percent_interval(k, n), **kw}


def test_fidelity_check_applies_to_whole_sets_of_known_weights():
    table = published.BUILTIN
    tv = published.TORCHVISION_RESNET18
    ok = _summary(69.758, 50_000, model_id=tv, top5=89.078,
                  top5_ci95=metrics.percent_interval(round(0.89078 * 50_000), 50_000))
    checked = published.check(ok, "imagenet-val", "val", table, 0.05)
    assert [(f.metric, f.ok) for f in checked.applied] == [("top1", True), ("top5", True)]
    assert checked.applied[0].published == 69.758 and "torchvision" in checked.applied[0].source
    # no ReaL labels given: said, not silently skipped
    assert [n.what for n in checked.not_applicable] == ["imagenet-real"]
    off = _summary(69.0, 50_000, model_id=tv)  # 0.76 pp low: outside a +-0.4 pp interval
    [f] = published.check(off, "imagenet-val", "val", table, 0.05).applied
    assert not f.ok and "pipeline fidelity" in f.describe()
    assert f.lo > 69.0 - 0.5
    real = _summary(69.758, 50_000, model_id=tv, real_samples=46_837, real_top1=77.3,
                    real_top1_ci95=metrics.percent_interval(round(0.773 * 46_837), 46_837))
    checks = published.check(real, "imagenet-val", "val", table, 0.05)
    assert [(c.metric, c.ok) for c in checks.applied] == [("top1", True), ("real_top1", True)]
    assert checks.not_applicable == []
    v2 = _summary(57.35, 10_000, model_id=tv)
    kind = "imagenet-v2-matched-frequency"
    assert [c.dataset for c in published.check(v2, kind, "v2", table, 0.05).applied] == [kind]
    assert published.check(v2, kind, "v2", table, 0.0).applied[0].ok


def test_top5_outside_its_interval_is_a_fidelity_failure_too():
    tv = published.TORCHVISION_RESNET18
    s = _summary(69.758, 50_000, model_id=tv, top5=88.0,
                 top5_ci95=metrics.percent_interval(44_000, 50_000))
    applied = published.check(s, "imagenet-val", "val", published.BUILTIN, 0.05).applied
    assert [(f.metric, f.ok) for f in applied] == [("top1", True), ("top5", False)]


@pytest.mark.parametrize("kind,name,n,model,expected", [
    # a copy of ImageNet-A with 50 images missing: both counts
    ("imagenet-a", "a", 7_450, published.TORCHVISION_RESNET18,
     "(imagenet-a): 7,450 scored, published for 7,500"),
    # a 1000-image part of val
    ("imagenet-val", "val", 1_000, published.TORCHVISION_RESNET18,
     "(imagenet-val): 1,000 scored, published for 50,000"),
    # the V2 releases score differently; only matched-frequency is published
    ("imagenet-v2-threshold0.7", "v2", 10_000, published.TORCHVISION_RESNET18,
     "no figure is published for imagenet-v2-threshold0.7"),
    ("imagenet-v2", "v2", 10_000, published.TORCHVISION_RESNET18,
     "the ImageNet-V2 variant of this set is not known"),
    # a model of one's own on a released set
    ("imagenet-r", "r", 30_000, "resnet18-finetuned/x",
     "no figure is published for this model (resnet18-finetuned/x) on imagenet-r; there are "
     "for: torchvision/resnet18/IMAGENET1K_V1"),
    # an ordinary folder
    ("", "flowers", 120, published.TORCHVISION_RESNET18,
     "set 'flowers' is no released evaluation set"),
])
def test_the_guard_says_why_it_did_not_apply(kind, name, n, model, expected):
    checked = published.check(_summary(40.0, n, model_id=model), kind, name, published.BUILTIN,
                              0.05)
    assert checked.applied == []
    [na] = [x for x in checked.not_applicable if x.what != "imagenet-real"]
    assert na.describe().startswith("fidelity: not applicable")
    assert expected in na.describe(), na.describe()
    assert na.scored == n


# --- the nightly over the suite ------------------------------------------------------------------

def _nightly(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = nightly_eval.main(argv + SMALL)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def suite_runs(suite, heads, tmp_path_factory):
    """Three nightly runs over val, v2 and r into one history:
      1. good weights, published figures declared right  -> exit 0 (first run, fidelity ok)
      2. r_damaged weights: only the R set drops to 0%     -> exit 3, the R set flagged
      3. good weights, a published v2 figure declared wrong -> exit 5 (pipeline fidelity)
    """
    d = tmp_path_factory.mktemp("suite-nightly")
    history = str(d / "history")
    real = d / "real.json"
    real.write_text(json.dumps([[VAL_CLASS]] * 8))
    sha = lambda p: __import__("hashlib").sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    right = d / "published-right.json"
    right.write_text(json.dumps([
        {"model": sha(heads["good"]), "dataset": "imagenet-val", "top1": 100.0, "samples": 8,
         "source": "declared by the test"},
        {"model": sha(heads["good"]), "dataset": "r", "top1": 99.9, "source": "by set name"}]))
    wrong = d / "published-wrong.json"
    wrong.write_text(json.dumps([{"model": sha(heads["good"]), "dataset": "imagenet-v2",
                                  "top1": 50.0, "source": "declared wrong by the test"}]))
    sets = ["--data", f"val={suite['val']}", "--data", f"v2={suite['v2']}",
            "--data", f"r={suite['r']}", "--real-labels", f"val={real}", "--history", history]
    steps = [_nightly(sets + ["--weights", heads["good"], "--published", str(right)]),
             _nightly(sets + ["--weights", heads["r_damaged"]]),
             _nightly(sets + ["--weights", heads["good"], "--published", str(wrong)])]
    return {"history": history, "steps": steps, "table": historylib.read_history(history)}


def test_each_run_records_one_row_per_set(suite_runs):
    t = suite_runs["table"]
    assert len(t) == 9 and t.groupby("run_id").size().tolist() == [3, 3, 3]
    assert sorted(set(t["dataset"])) == ["r", "v2", "val"]
    assert dict(zip(t["dataset"], t["dataset_kind"])) == {
        "val": "imagenet-val", "v2": "imagenet-v2", "r": "imagenet-r"}
    assert dict(zip(t["dataset"], t["scored_over"])) == {
        "val": "model classes", "v2": "model classes", "r": "data classes"}
    files = os.listdir(historylib.history_dir(suite_runs["history"]))
    assert len([f for f in files if f.endswith(".parquet")]) == 9
    # pandas reads the folder as one table, as the docs say
    assert len(pd.read_parquet(historylib.history_dir(suite_runs["history"]))) == 9
    import duckdb

    glob = os.path.join(historylib.history_dir(suite_runs["history"]), "*.parquet")
    rows = duckdb.sql(f"select dataset, count(*) from read_parquet('{glob}', union_by_name=true) "
                      f"group by dataset order by dataset").fetchall()
    assert rows == [("r", 3), ("v2", 3), ("val", 3)]
    val = t[t["dataset"] == "val"]
    assert (val["real_samples"] == 8).all() and (val["real_top1"] == 100.0).all()
    assert t[t["dataset"] != "val"]["real_top1"].isna().all()


def test_first_run_with_right_published_figures_passes(suite_runs):
    code, out, err = suite_runs["steps"][0]
    assert code == 0, out + err
    assert "verdict: first run (exit 0)" in out
    assert out.count("published top1 100.000%") == 1 and "inside" in out
    first = suite_runs["table"].iloc[:3]
    fidelity = first.set_index("dataset")["fidelity"]
    # v2 has no published figure that applies: the history says so, as the report does
    assert fidelity["val"] == fidelity["r"] == "ok" and fidelity["v2"] == "not applicable"


def test_a_regression_in_one_set_flags_that_set_alone(suite_runs):
    code, out, err = suite_runs["steps"][1]
    t = suite_runs["table"]
    second = t[t["run_id"] == t["run_id"].unique()[1]].set_index("dataset")
    assert code == 3, out + err
    assert second.loc["r", "verdict"] == regression.REGRESSION
    assert second.loc["r", "top1"] == 0.0 and second.loc["r", "top1_delta_vs_previous"] == -100.0
    assert second.loc["r", "p_vs_previous"] == pytest.approx(2 * 0.5 ** 8)
    assert second.loc["val", "verdict"] == second.loc["v2", "verdict"] == regression.NO_CHANGE
    assert "== set r (imagenet-r): significant regression" in out
    assert "verdict: significant regression (exit 3)" in out


def test_a_published_figure_outside_the_interval_is_a_fidelity_failure(suite_runs):
    code, out, err = suite_runs["steps"][2]
    t = suite_runs["table"]
    third = t[t["run_id"] == t["run_id"].unique()[2]].set_index("dataset")
    assert code == regression.EXIT_FIDELITY == 5, out + err
    assert third.loc["v2", "fidelity"] == "failed" and third.loc["v2", "published_top1"] == 50.0
    assert third.loc["v2", "verdict"] == regression.FIDELITY
    assert "pipeline fidelity" in err and "set v2" in err
    # against run 2 the R set recovered: an improvement, not an alarm
    assert third.loc["r", "verdict"] == regression.IMPROVEMENT


def test_one_report_with_all_sets_side_by_side(suite_runs):
    t = suite_runs["table"]
    run_dir = os.path.dirname(t["predictions_dir"].iloc[-1])
    page = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    md = open(os.path.join(run_dir, "report.md"), encoding="utf-8").read()
    assert "## All sets" in md
    table = md.split("## All sets", 1)[1].split("\n## ", 1)[0]
    assert all(f"| {name} | {kind} |" in table for name, kind in
               [("val", "imagenet-val"), ("v2", "imagenet-v2"), ("r", "imagenet-r")])
    for name in ("val", "v2", "r"):
        assert f"## {name}: Run" in md and f"## {name}: Published accuracy" in md
    assert "OUTSIDE: pipeline fidelity failure" in page
    record = json.load(open(os.path.join(run_dir, "nightly.json")))
    assert [s["name"] for s in record["sets"]] == ["val", "v2", "r"]
    assert record["exit_code"] == 5


def test_a_v2_release_is_judged_by_its_own_figure_only(suite, heads, tmp_path):
    """A threshold0.7 copy (named as its archive unpacks) next to a figure declared for
    matched-frequency (wrong for it) and one for threshold0.7's whole 10,000 images: neither
    applies to these 8 images, the run exits 0, and the terminal, nightly.json and the report
    say why, with both counts."""
    src = tmp_path / "imagenetv2-threshold0.7-format-val"
    for i in range(1000):
        os.makedirs(src / str(i))
    for n in range(8):
        _jpeg(str(src / str(VAL_CLASS) / f"{n}.jpeg"), 300 + n)
    manifest = _shard(str(src), str(tmp_path / "shards"))
    assert shards.load_manifest(manifest).variant == "threshold0.7"
    sha = __import__("hashlib").sha256(open(heads["good"], "rb").read()).hexdigest()
    table = tmp_path / "published.json"
    table.write_text(json.dumps([
        {"model": sha, "dataset": "imagenet-v2-matched-frequency", "top1": 50.0},
        {"model": sha, "dataset": "imagenet-v2-threshold0.7", "top1": 100.0, "samples": 10_000}]))
    code, out, err = _nightly(["--data", f"v2={manifest}", "--weights", heads["good"],
                               "--history", str(tmp_path / "h"), "--published", str(table)])
    assert code == 0, out + err
    assert "== set v2 (imagenet-v2-threshold0.7): first run" in out
    line = ("fidelity: not applicable (imagenet-v2-threshold0.7): 8 scored, published for "
            "10,000")
    assert line in out
    run_dir = os.path.dirname(historylib.read_history(str(tmp_path / "h"))["predictions_dir"][0])
    [record] = json.load(open(os.path.join(run_dir, "nightly.json")))["sets"]
    assert record["fidelity"] == [] and record["kind"] == "imagenet-v2-threshold0.7"
    assert [n["scored"] for n in record["fidelity_not_applicable"]] == [8]
    assert record["fidelity_not_applicable"][0]["published_for"] == 10_000
    assert line in open(os.path.join(run_dir, "report.md"), encoding="utf-8").read()


# --- the history: append-only, concurrent, migrated ---------------------------------------------

def test_two_nightly_runs_at_once_one_runs_the_other_is_refused(suite, heads, tmp_path,
                                                               ray_local):
    """Two runs into one history at the same time (threads sharing the test's Ray cluster): one
    night at a time (issue 37: the history's lease), so one lands and the other stops at once
    with NightRunning (exit 8), naming the night that runs, having written nothing."""
    history = str(tmp_path / "history")
    results, errors = [], []

    def one():
        try:
            results.append(nightly.run_nightly(
                suite["v2"], heads["good"], history,
                predict_options=predict.PredictOptions(resize_size=40, crop_size=32,
                                                       precision="fp32", batch_size=8,
                                                       progress=False)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert len(results) == 1 and len(errors) == 1, errors
    assert isinstance(errors[0], nightly.NightRunning) and errors[0].exit_code == 8
    assert "previous night still running: run " + results[0].run_id in str(errors[0])
    t = historylib.read_history(history)
    assert list(t["run_id"]) == [results[0].run_id] and set(t["dataset"]) == {"val"}


def test_rows_written_in_the_same_second_by_many_writers_all_land(tmp_path):
    history = str(tmp_path / "h")
    row = {"date": pd.Timestamp("2026-11-29T01:00:00Z").to_pydatetime(), "dataset": "val",
           "top1": 1.0}

    def write(i):
        historylib.append_history(history, {**row, "run_id": f"20261129T010000Z-{i:06x}"})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(historylib.read_history(history)) == 16
    with pytest.raises(ValueError, match="already recorded"):
        write(0)


def test_a_legacy_history_parquet_is_migrated_without_losing_rows(tmp_path):
    history = tmp_path / "h"
    history.mkdir()
    legacy = pa.table({"date": pa.array(pd.to_datetime(["2026-11-01T02:00:00Z",
                                                        "2026-11-02T02:00:00Z"]),
                                        pa.timestamp("ms", tz="UTC")),
                       "run_id": ["r1", "r2"], "data_manifest": ["s/val.json", "s/val.json"],
                       "top1": [70.0, 69.5], "verdict": ["first run", "no significant change"]})
    pq.write_table(legacy, history / "history.parquet")
    t = historylib.read_history(str(history))
    assert list(t["run_id"]) == ["r1", "r2"] and list(t["top1"]) == [70.0, 69.5]
    assert list(t["dataset"]) == ["val", "val"] and list(t.columns) == historylib.HISTORY_SCHEMA.names
    assert not (history / "history.parquet").exists()
    assert (history / "history.parquet.migrated").exists()
    assert len(historylib.read_history(str(history))) == 2  # read again: not migrated twice
    refs = historylib.references(t, "", "val", {"data_manifest_sha256": "x"})
    assert refs[0][1]["run_id"] == "r2"


# --- what a newcomer hit: bad paths, moved sources, one off night, strict JSON --------------------

def test_missing_files_exit_2_before_anything_starts(suite, capsys):
    base = ["--history", "/nonexistent/h"]
    cases = [(["--data", "/nope/val.json", "--weights", "none"], "--data val=/nope/val.json: no such"),
             (["--data", f"v2={suite['v2']}", "--weights", "/nope.pt"], "--weights /nope.pt"),
             (["--data", f"v2={suite['v2']}", "--weights", "none", "--real-labels", "/nope.json"],
              "--real-labels v2=/nope.json: no such file")]
    for argv, message in cases:
        assert nightly_eval.main(argv + base) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nightly_eval.main(["--help"])
    assert "(default: None)" not in capsys.readouterr().out


def test_the_same_images_sharded_from_a_moved_folder_are_the_same_data(suite, tmp_path):
    import shutil

    moved = tmp_path / "moved-r"
    shutil.copytree(suite["r_src"], moved)
    again = shards.load_manifest(_shard(str(moved), str(tmp_path / "shards")))
    first = shards.load_manifest(suite["r"])
    assert open(suite["r"], "rb").read() != open(again.path, "rb").read()  # "source" differs
    assert shards.data_fingerprint(again) == shards.data_fingerprint(first)
    row = {"data_manifest_sha256": "a", "data_fingerprint": shards.data_fingerprint(first)}
    assert regression.same_data({"data_manifest_sha256": "b",
                              "data_fingerprint": shards.data_fingerprint(again)}, row)
    assert not regression.same_data({"data_manifest_sha256": "a", "data_fingerprint": "other"}, row)
    assert regression.same_data({"data_manifest_sha256": "a", "data_fingerprint": "x"},
                             {"data_manifest_sha256": "a", "data_fingerprint": float("nan")})


def test_one_night_on_other_data_does_not_make_the_next_not_comparable():
    rows = pd.DataFrame([
        {"run_id": "r1", "dataset": "val", "data_manifest_sha256": "m", "data_fingerprint": "A"},
        {"run_id": "r2", "dataset": "val", "data_manifest_sha256": "n", "data_fingerprint": "B"},
        {"run_id": "r3", "dataset": "v2", "data_manifest_sha256": "o", "data_fingerprint": "C"}])
    current = {"data_manifest_sha256": "m", "data_fingerprint": "A"}
    assert historylib.references(rows, "", "val", current)[0][1]["run_id"] == "r1"
    other = {"data_manifest_sha256": "z", "data_fingerprint": "Z"}  # new data: the latest, refused
    assert historylib.references(rows, "", "val", other)[0][1]["run_id"] == "r2"
    assert historylib.references(rows, "r3", "val", current)[1] == ("baseline", None)
