"""Per-image embeddings (``jobs.predict --embeddings``): the pooled 512-d feature before ``fc``,
one row per image under the predictions' contract, readable by pandas, pyarrow and DuckDB."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import metrics, model as modellib, predictions, predictor, presets, shards
from tests.conftest import corrupt_one_member, predict_small as _predict


@pytest.fixture(scope="module")
def embedded(imagenet_like_shards, weights_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emb") / "eval")
    summary = _predict(str(imagenet_like_shards[1] / "val.json"), weights_file, out,
                       embeddings=True)
    return out, summary


def test_the_embedding_is_the_pooled_feature_before_fc(imagenet_like_shards, weights_file, embedded):
    """Against torchvision's transforms and the model with fc replaced by Identity: the stored
    float16 vector is the feature, and fc applied to it gives the job's prediction."""
    root, _ = imagenet_like_shards
    out, summary = embedded
    df = metrics.read_predictions(out)
    assert len(df) == 12 and summary["embedding"] == predictions.embedding_info("float16")
    net = modellib.build_model(modellib.load_weights(weights_file), None)[0].eval()
    fc = net.fc
    net.fc = torch.nn.Identity()
    reference = presets.reference_eval_transform()
    files = {os.path.splitext(f)[0]: os.path.join(dp, f) for dp, _, fs in os.walk(root)
             for f in fs}
    with torch.inference_mode():
        for row in df.itertuples():
            want = net(reference(Image.open(files[row.key]).convert("RGB"))[None])[0]
            got = np.asarray(row.embedding, dtype=np.float32)
            assert got.shape == (512,) and np.abs(got - want.numpy()).max() < 2e-2
            assert int(fc(torch.from_numpy(got)[None]).argmax()) == row.pred


def test_column_type_and_metadata_as_documented(embedded):
    out, _ = embedded
    part = os.path.join(out, "predictions", sorted(os.listdir(os.path.join(out, "predictions")))[0])
    schema = pq.read_schema(part)
    assert str(schema.field("embedding").type) == "fixed_size_list<element: halffloat>[512]"
    meta = json.loads(schema.metadata[b"embedding"])
    assert meta["normalized"] is False and meta["dim"] == 512


def test_duckdb_finds_each_images_nearest_neighbour_by_cosine(embedded):
    import duckdb

    out, _ = embedded
    glob = os.path.join(out, "predictions", "*.parquet")
    rows = duckdb.sql(f"""
        with e as (select key, embedding::FLOAT[512] v from read_parquet('{glob}'))
        select a.key, arg_max(b.key, array_cosine_similarity(a.v, b.v))
        from e a join e b on a.key <> b.key group by a.key order by a.key""").fetchall()
    df = metrics.read_predictions(out).sort_values("key")
    v = np.stack(df["embedding"].to_numpy()).astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    want = [(k, df["key"].iloc[j]) for k, j in zip(df["key"], sim.argmax(axis=1))]
    assert rows == want and len(rows) == 12


def test_float32_on_request_and_no_column_by_default(imagenet_like_shards, weights_file, tmp_path):
    manifest = str(imagenet_like_shards[1] / "val.json")
    _predict(manifest, weights_file, str(tmp_path / "f32"), embeddings=True,
             embedding_dtype="float32")
    df = metrics.read_predictions(str(tmp_path / "f32"))
    assert df["embedding"].iloc[0].dtype == np.float32
    summary = _predict(manifest, weights_file, str(tmp_path / "plain"))
    assert "embedding" not in metrics.read_predictions(str(tmp_path / "plain"))
    assert "embedding" not in summary


def test_an_undecodable_image_has_no_row_and_is_counted(imagenet_like_shards, weights_file, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(imagenet_like_shards[1], copy)
    manifest = shards.load_manifest(str(copy / "val.json"))
    key, _ = corrupt_one_member(copy, manifest)
    out = str(tmp_path / "eval")
    summary = _predict(str(copy / "val.json"), weights_file, out, embeddings=True,
                       max_failed_fraction=1.0, verify_checksums=False)
    df = metrics.read_predictions(out)
    assert summary["failures"] == 1 and len(df) == 11 and key not in set(df["key"])
    assert np.isfinite(np.stack(df["embedding"].to_numpy()).astype(np.float32)).all()


def test_a_non_finite_vector_is_a_failed_image_never_a_row(weights_file):
    """A feature with NaN (or one beyond float16's range): the image gets an error, as a
    decode failure does, and so no prediction row."""
    spec = predictor.PredictorSpec(weights_file, modellib.imagenet_classes(), "fp32", False,
                                 embedding_dtype="float16")
    p = predictor.Predictor(spec)
    real_backbone = p.backbone

    def backbone(x):
        f = real_backbone(x)
        f[1, 3] = float("nan")
        f[2, 0] = 1e6  # finite in fp32, inf in float16
        return f

    p.backbone = backbone
    batch = {"key": np.array(["a", "b", "c", "d"], dtype=object),
             "image": np.zeros((4, 3, 32, 32), dtype=np.uint8), "label": np.zeros(4, np.int64),
             "error": np.array(["", "", "", "bad jpeg"], dtype=object),
             "shard": np.array(["s"] * 4, dtype=object)}
    out = p(batch)
    assert out["error"][0] == "" and out["error"][3] == "bad jpeg"
    assert all(out["error"][i].startswith("non-finite embedding") for i in (1, 2))
    assert out["embedding"].shape == (4, 512) and out["embedding"].dtype == np.float16


def test_a_run_stopped_by_non_finite_vectors_says_so_not_that_images_failed_to_decode():
    """A newcomer's fine-tuned model gave pooled features beyond float16's range: 14 of 15
    rows failed, and the job said they 'failed to decode' (they had decoded), without the way
    out (--embedding-dtype float32)."""
    failures = [{"error": "non-finite embedding (NaN or inf in the pooled feature as float16)"}
                ] * 14 + [{"error": "UnidentifiedImageError: cannot identify image file"}]
    why = predictions.failure_causes(failures, "float16")
    assert why.startswith("1 could not be decoded, 14 gave a non-finite embedding as float16")
    assert "--embedding-dtype float32" in why
    wide = predictions.failure_causes(failures[:2], "float32")
    assert wide == "2 gave a non-finite embedding as float32"
    assert predictions.failure_causes(failures[14:], "float16") == ""  # decode only
