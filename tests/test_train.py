"""Fine-tuning with Ray Train on 2 CPU workers: learning, resume, probe, worker failure."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jobs import finetune, predict as predict_job
from pipeline import model as modellib


def _cfg(shard_set, tmp_path, **kw):
    base = dict(train=str(shard_set / "train.json"), val=str(shard_set / "val.json"),
                weights="none", epochs=2, num_workers=2, cpus_per_worker=0.5, threads=1,
                storage_path=str(tmp_path / "runs"), name="t", batch_size=8, lr=0.05,
                crop_size=32, shuffle_buffer=16, warmup_epochs=0.5, precision="fp32")
    base.update(kw)
    return finetune.FinetuneConfig(**base)


def _state(tmp_path, name="t"):
    run = tmp_path / "runs" / name
    ckpts = sorted(p for p in run.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    return torch.load(ckpts[-1] / "state.pt", weights_only=True)


@pytest.mark.slow
def test_train_resume_and_model_pt_reproduces_val_top1(shard_set, tmp_path, ray_local):
    out = finetune.run(_cfg(shard_set, tmp_path, epochs=1))
    first = _state(tmp_path)
    assert first["epoch"] == 0 and out["val_images"] == 16  # every val image, once
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


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_is_recovered(shard_set, tmp_path, ray_local):
    marker = tmp_path / "killed-once"
    out = finetune.run(_cfg(shard_set, tmp_path, epochs=2, name="kill"),
                       fault={"epoch": 1, "step": 1, "rank": 1, "marker": str(marker)})
    assert marker.exists()  # the SIGKILL happened
    assert out["epoch"] == 1 and _state(tmp_path, "kill")["epoch"] == 1


def shards_classes(shard_set):
    return json.loads((shard_set / "train.json").read_text())["classes"]
