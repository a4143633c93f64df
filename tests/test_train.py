"""Fine-tuning with Ray Train on 2 CPU workers: learning, resume, model.pt, linear probe (faults:
tests/test_faults.py)."""

from __future__ import annotations

import json

import pytest
import torch

from jobs import finetune, predict as predict_job
from pipeline import model as modellib
from tests.conftest import finetune_config, last_checkpoint_state


def _cfg(shard_set, tmp_path, **kw):
    return finetune_config(shard_set, tmp_path, **kw)


def _state(tmp_path, name="t"):
    return last_checkpoint_state(tmp_path, name)


@pytest.mark.slow
def test_train_resume_and_model_pt_reproduces_val_top1(shard_set, tmp_path, ray_local):
    out = finetune.run(_cfg(shard_set, tmp_path, epochs=1))
    first = _state(tmp_path)
    assert first["epoch"] == 0 and out["val_images"] == 16  # every val image, once
    from pipeline import train

    assert train.resume_epoch(str(tmp_path / "runs"), "t") == 1
    out2 = finetune.run(_cfg(shard_set, tmp_path, epochs=3))  # same name: resumes at epoch 2
    second = _state(tmp_path)
    assert second["epoch"] == 2 and out2["epoch"] == 2
    assert json.loads((tmp_path / "runs/t/config.json").read_text())["epochs"] == 3
    # The resumed run started from the saved optimizer state, not a fresh one.
    assert second["optimizer"]["state"] and second["scheduler"]["last_epoch"] > \
        first["scheduler"]["last_epoch"]
    summary = predict_job.run(predict_job.PredictConfig(
        data=str(shard_set / "val.json"), weights=out2["model"], out=str(tmp_path / "eval"),
        precision="fp32", progress=False))
    assert summary["samples"] == 16
    assert abs(summary["top1"] - out2["val_top1"]) < 1e-6


@pytest.mark.slow
def test_linear_probe_leaves_every_backbone_weight_unchanged(shard_set, tmp_path, ray_local,
                                                             ):
    torch.manual_seed(0)
    from torchvision.models import resnet18

    init = resnet18(num_classes=4)
    path = tmp_path / "init.pt"
    modellib.save_model(str(path), init, shards_classes(shard_set), {}, {}, "init")
    out = finetune.run(_cfg(shard_set, tmp_path, weights=str(path), mode="probe", epochs=1,
                            name="probe"))
    trained = modellib.load_weights(out["model"])["state_dict"]
    for name, value in init.state_dict().items():
        if name.startswith("fc."):
            assert not torch.equal(value, trained[name]), name
        else:
            assert torch.equal(value, trained[name]), name  # weights and BN running stats


def shards_classes(shard_set):
    return json.loads((shard_set / "train.json").read_text())["classes"]


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 210),
           "yellow": (220, 200, 40)}


@pytest.fixture(scope="module")
def learnable_shards(tmp_path_factory, ray_local):
    """4 classes told apart by a colour cast under noise and a random distractor square, 40 train
    and 12 val JPEGs each: learnable from random init within a few short epochs."""
    import numpy as np
    from PIL import Image

    from pipeline import shards, sources

    root = tmp_path_factory.mktemp("learn")
    rng = np.random.default_rng(5)
    for split, n in (("train", 40), ("val", 12)):
        for name, colour in COLOURS.items():
            (root / "img" / split / name).mkdir(parents=True)
            for k in range(n):
                h, w = rng.integers(40, 64, 2)
                img = rng.normal(0, 45, (h, w, 3)) + np.array(colour) * rng.uniform(0.6, 1.1)
                y, x, s = rng.integers(0, h // 2), rng.integers(0, w // 2), rng.integers(8, 20)
                img[y:y + s, x:x + s] = rng.integers(0, 256, 3)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    root / "img" / split / name / f"{name}_{split}_{k}.jpg", quality=90)
    train = shards.write_shards(sources.scan_source(str(root / "img/train"), "train"),
                                str(root / "s"), samples_per_shard=40, progress=False)
    shards.write_shards(sources.with_classes(sources.scan_source(str(root / "img/val"), "val"),
                                             train["classes"]),
                        str(root / "s"), samples_per_shard=24, progress=False)
    return root / "s"


@pytest.mark.slow
def test_loss_falls_and_val_accuracy_rises(learnable_shards, tmp_path):
    out = finetune.run(_cfg(learnable_shards, tmp_path, epochs=4, name="learn",
                            optimizer="adamw", lr=0.03, batch_size=8, weight_decay=0.05,
                            min_crop_scale=0.5, warmup_epochs=1.0))
    hist = out["history"]
    for h in hist:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in h.items()})
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert all(h["val_images"] == 48 and h["train_failed"] == 0 for h in hist)
    assert hist[-1]["train_images"] == 160  # both workers' images, reduced across ranks
    losses = [h["train_loss"] for h in hist]
    assert losses[-1] < 0.8 * losses[0], losses
    top1 = [h["val_top1"] for h in hist]
    assert top1[-1] >= 80 and top1[-1] >= top1[0] + 25, top1
    assert json.loads((tmp_path / "runs/learn/history.json").read_text()) == hist
