"""jobs.embed and jobs.probe: a linear probe and DINO's kNN on cached embeddings, and the
probe's model.pt through jobs.predict, which reproduces the probe's val figures exactly."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import embed as embed_job, predict as predict_job, probe as probe_job
from pipeline import metrics, probe
from pipeline.predictor import Rows
from pipeline.errors import InputError
from tests.conftest import run_job

SMALL = ["--resize-size", "72", "--crop-size", "64", "--precision", "fp32", "--batch-size", "8",
         "--no-progress"]


@pytest.fixture(scope="module")
def backbone(weights_file):
    """A random-init ResNet-18 saved as a file (its sha256 is what the probe checks)."""
    return weights_file


@pytest.fixture(scope="module")
def embedded(shard_set, backbone, tmp_path_factory):
    """float32 train and val embeddings of the 4-class shapes set."""
    d = tmp_path_factory.mktemp("embedded")
    for split in ("train", "val"):
        code = embed_job.main(["--data", str(shard_set / f"{split}.json"), "--weights", backbone,
                               "--out", str(d / split), "--embedding-dtype", "float32", *SMALL])
        assert code == 0
    return d


@pytest.fixture(scope="module")
def probed(embedded, backbone, tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("probe") / "model.pt"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = probe_job.main(["--train", str(embedded / "train"), "--val", str(embedded / "val"),
                               "--weights", backbone, "--out", str(out)])
    assert code == 0, buf.getvalue()
    return out, buf.getvalue()


def test_embed_writes_the_data_labels_with_a_backbone_whose_classes_are_not_the_datas(
        embedded, shard_set):
    """A 1000-class backbone on a 4-class set: no head runs, every image has its row."""
    df = metrics.read_predictions(str(embedded / "train"))
    summary = json.load(open(embedded / "train" / "summary.json"))
    assert len(df) == 32 and summary["rows"] == "embeddings" and summary["failures"] == 0
    assert sorted(df.columns) == ["class_id", "embedding", "key", "label"]
    classes = [c["id"] for c in summary["classes"]]
    assert all(classes[label] == cid for label, cid in zip(df["label"], df["class_id"]))
    assert df["embedding"].iloc[0].dtype == np.float32 and len(df["embedding"].iloc[0]) == 512
    assert "top1" not in summary


def test_probe_prints_both_figures_and_predict_reproduces_the_probe_exactly(
        probed, shard_set, tmp_path):
    out, printed = probed
    record = json.load(open(out.parent / "probe.json"))
    assert re.search(r"linear probe +top-1 +[\d.]+% \(95% CI", printed)
    assert re.search(r"kNN \(k=20\) +top-1", printed)
    assert record["knn"]["k"] == 20 and record["val"]["samples"] == 16
    assert set(record["sweep"]) == {f"{c:g}" for c in probe.DEFAULT_C}
    summary = predict_job.run(predict_job.PredictConfig(
        data=str(shard_set / "val.json"), weights=str(out), out=str(tmp_path / "pred"),
        precision="fp32", batch_size=8, progress=False))
    assert summary["top1"] == record["val"]["top1"]
    assert summary["top5"] == record["val"]["top5"]
    assert summary["samples"] == 16


def test_the_probe_model_classifies_a_file(probed, image_tree, capsys):
    from jobs import classify as classify_job

    out, _ = probed
    img = next((image_tree / "val").rglob("*.jpg"))
    code, text = run_job(classify_job.main, [str(img), "--weights", str(out), "--topk", "2"],
                         capsys)
    assert code == 0 and text.splitlines()[0] == str(img) and "%" in text.splitlines()[1]


def test_an_existing_model_is_not_replaced_without_overwrite(probed, embedded, backbone, capsys):
    out, _ = probed
    before = out.read_bytes()
    code, text = run_job(probe_job.main, ["--train", str(embedded / "train"), "--val",
                                          str(embedded / "val"), "--weights", backbone,
                                          "--out", str(out)], capsys)
    assert code == 2 and "pass --overwrite" in text and out.read_bytes() == before


def _altered(embedded, tmp_path, **changes):
    """A copy of the val embeddings whose summary.json says otherwise."""
    copy = tmp_path / "val-copy"
    shutil.copytree(embedded / "val", copy)
    s = json.load(open(copy / "summary.json"))
    s.update(changes)
    (copy / "summary.json").write_text(json.dumps(s))
    return str(copy)


@pytest.mark.parametrize("changes,expected", [
    ({"weights_sha256": "f" * 64, "model_id": "other.pt"},
     "different weights: .* \\(sha256 [0-9a-f]{64}\\), .* from other.pt \\(sha256 f{64}\\)"),
    ({"preset": {"resize_size": 256, "crop_size": 224}}, "different presets"),
    ({"rows": "predictions"}, "is no jobs.embed output"),
])
def test_mismatched_embeddings_are_refused(embedded, backbone, tmp_path, capsys, changes,
                                           expected):
    val = _altered(embedded, tmp_path, **changes)
    code, text = run_job(probe_job.main, ["--train", str(embedded / "train"), "--val", val,
                                          "--weights", backbone, "--out",
                                          str(tmp_path / "m.pt")], capsys)
    assert code == 1 and re.search(expected, text), text
    assert not (tmp_path / "m.pt").exists()


def test_a_predict_folder_or_no_folder_is_refused_without_advice_to_overwrite(
        embedded, backbone, tmp_path, capsys):
    """A jobs.predict output is named as one, and the advice never points jobs.embed at it."""
    pred = _altered(embedded, tmp_path, rows="predictions", top1=50.0)
    for folder, expected in ((pred, "is a jobs.predict output"),
                             (str(tmp_path / "nowhere"), "does not exist")):
        code, text = run_job(probe_job.main, ["--train", str(embedded / "train"), "--val",
                                              folder, "--weights", backbone, "--out",
                                              str(tmp_path / "m.pt")], capsys)
        assert code == 1 and expected in text and f"--out {folder}" not in text, text


def test_weights_other_than_the_embeddings_are_refused(embedded, tmp_path, capsys):
    from torchvision.models import resnet18

    other = tmp_path / "other.pt"
    torch.save(resnet18().state_dict(), other)
    code, text = run_job(probe_job.main, ["--train", str(embedded / "train"), "--val",
                                          str(embedded / "val"), "--weights", str(other),
                                          "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 1 and "are not the weights the embeddings were made with" in text


# --- the parts, on vectors made here ----------------------------------------------------------

def _emb(x, y, n_classes, path="mem"):
    classes = [{"index": i, "id": f"c{i}", "name": f"c{i}"} for i in range(n_classes)]
    return probe.Embeddings(path, np.array([f"k{i}" for i in range(len(y))]),
                            np.asarray(x, np.float32), np.asarray(y, np.int64), classes,
                            {"weights_sha256": "a", "model_id": "m", "preset": {}})


def test_knn_is_dinos_weighted_vote():
    """Two train points of class 0 near the query, three of class 1 farther: with k=5 and
    T=0.07 the two close ones outvote the three (exp(sim/T) weights), with T=100 the count wins."""
    train = _emb([[1, 0.1], [1, -0.1], [0.2, 1], [0.25, 1], [0.3, 1]], [0, 0, 1, 1, 1], 2)
    val = _emb([[1, 0.0]], [0], 2)
    assert probe.knn(train, val, k=5, temperature=0.07)["top1"] == 100.0
    assert probe.knn(train, val, k=5, temperature=100.0)["top1"] == 0.0
    assert probe.knn(train, val, k=50)["k"] == 5


def test_one_image_per_class_fits_without_a_sweep_and_says_why():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    train = _emb(centres + rng.normal(size=(3, 8)) * 0.1, [0, 1, 2], 3)
    head, result = probe.fit_probe(train)
    assert result.sweep == {} and "1 train image" in result.sweep_note and result.c == 1.0
    val = _emb(centres + rng.normal(size=(3, 8)) * 0.1, [0, 1, 2], 3)
    assert probe.accuracy(probe.probe_scores(head, val.x), val.y)["top1"] == 100.0


def test_a_sweep_that_cannot_tell_c_apart_says_so():
    """Features that carry nothing (all alike): every C scores the same on the hold-out; the
    strongest regularisation is taken and the note says why."""
    train = _emb(np.ones((6, 4)), [0, 0, 1, 1, 2, 2], 3)
    _, result = probe.fit_probe(train, holdout_fraction=0.5)
    assert len(set(result.sweep.values())) == 1 and result.c == min(probe.DEFAULT_C)
    assert "could not tell the C values apart" in result.sweep_note


def test_the_folded_standardisation_is_the_probe_exactly():
    """fc's weights are the sklearn model's on standardised inputs, folded: the same scores."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8)) * [1, 10, 100, 0.1, 1, 1, 1, 1] + 3
    y = np.repeat([0, 1, 2], 20)
    x[y == 1, 0] += 2
    x[y == 2, 1] += 20
    head, result = probe.fit_probe(_emb(x, y, 3), c_values=(1.0,))
    z = (x - x.mean(0)) / x.std(0)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(z, y).decision_function(z)
    got = probe.probe_scores(head, x.astype(np.float32)).numpy()
    assert np.allclose(got, ref, atol=1e-3) and result.sweep_note == "one C given: no sweep"


def test_two_classes_and_a_class_missing_from_train():
    """sklearn's binary case (one coefficient row) becomes a two-logit fc with the same
    decisions; a class with val images but no train image is reported and never predicted."""
    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(0, 1, (10, 4)), rng.normal(4, 1, (10, 4))])
    train = _emb(x, [0] * 10 + [2] * 10, 3)
    val = _emb(np.vstack([x[:2], x[-2:], x[:1]]), [0, 0, 2, 2, 1], 3)
    [warning] = probe.check_pair(train, val)
    assert warning.startswith("1 classes have val images but no train image (c1)")
    head, _ = probe.fit_probe(train)
    pred = probe.probe_scores(head, val.x).argmax(1).numpy()
    assert pred.tolist() == [0, 0, 2, 2, 0]


def test_a_non_finite_vector_is_refused_naming_its_key(tmp_path):
    d = tmp_path / "emb"
    (d / "predictions").mkdir(parents=True)
    v = np.ones((2, 4), np.float32)
    v[1, 2] = np.nan
    pq.write_table(pa.table({"key": ["a", "b"], "label": [0, 1], "class_id": ["x", "y"],
                             "embedding": pa.FixedSizeListArray.from_arrays(
                                 pa.array(v.reshape(-1)), 4)}),
                   d / "predictions" / "part-00000.parquet")
    (d / "summary.json").write_text(json.dumps({"rows": "embeddings", "classes": []}))
    (d / "_SUCCESS").write_text("")
    with pytest.raises(InputError, match="1 embeddings are not finite \\(e.g. b\\)"):
        probe.read_embeddings(str(d))
    assert os.path.exists(d / "_SUCCESS")


@pytest.mark.slow
def test_the_transfer_harness_runs_and_writes_its_table(tmp_path, ray_local, monkeypatch):
    """bench/transfer.py at tiny sizes: every step runs, the table has its four rows and the
    docs section is written between its markers (into a copy of BENCHMARKS.md)."""
    from bench import transfer

    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text(open(transfer.DOCS).read())
    monkeypatch.setattr(transfer, "DOCS", str(docs))
    out = tmp_path / "t.json"
    assert transfer.main(["--a-train", "8", "--a-epochs", "1", "--b-train", "6", "--b-val", "4",
                          "--epochs", "2", "--json", str(out), "--write-docs"]) == 0
    r = json.load(open(out))
    assert r["probe_transferred"]["val"]["samples"] == 20 and r["epochs"] == 2
    section = docs.read_text().split("<!-- transfer:begin -->")[1].split("<!-- transfer:end -->")[0]
    assert section.count("\n| ") == 5 and "--a-train 8" in section  # the header and four rows


def test_any_backbone_embeds_any_data_but_only_a_fitting_head_predicts(shard_set, tmp_path):
    """A state_dict trained elsewhere with a 3-way head, on 4-class data: jobs.embed runs no
    head and takes it; jobs.predict refuses it before anything starts."""
    from torchvision.models import resnet18

    from pipeline import predict

    path = tmp_path / "head3.pt"
    torch.save(resnet18(num_classes=3).state_dict(), path)
    manifest, opts = str(shard_set / "val.json"), predict.PredictOptions()
    inputs = predict.resolve_inputs(manifest, str(path), opts, Rows.EMBEDDINGS)
    assert len(inputs.classes_out) == 4 and inputs.subset is None
    with pytest.raises(InputError, match="name other classes than their head holds"):
        predict.resolve_inputs(manifest, str(path), opts)


def test_the_probe_prints_its_model_and_report_paths_alike(embedded, backbone, tmp_path,
                                                           monkeypatch, capsys):
    """Issue 38: a relative --out printed one path relative and the other absolute."""
    monkeypatch.chdir(tmp_path)
    code, text = run_job(probe_job.main, ["--train", str(embedded / "train"), "--val",
                                          str(embedded / "val"), "--weights", backbone,
                                          "--out", "p/model.pt"], capsys)
    assert code == 0, text
    line = next(t for t in text.splitlines() if t.startswith("model: "))
    assert f"model: {tmp_path / 'p' / 'model.pt'} (sha256 " in line
    assert line.endswith(f"report: {tmp_path / 'p' / 'probe.json'}"), line
