"""Fine-tuning with Ray Train on 2 CPU workers: learning, resume, model.pt, linear probe (faults:
tests/test_faults.py)."""

from __future__ import annotations

import json

import pytest
from torch import nn
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


def _wide_with_object_at_an_edge(rng, colour):
    """A 256x64 noise image whose one object, a 20x20 square of ``colour``, sits in the
    leftmost or rightmost 40 columns: never inside the centre square."""
    import numpy as np
    from PIL import Image

    img = rng.normal(128, 30, (64, 256, 3))
    y = rng.integers(0, 44)
    x = rng.integers(0, 20) if rng.random() < 0.5 else 216 + rng.integers(0, 20)
    img[y:y + 20, x:x + 20] = colour
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_off_centre_objects_are_learned_from_whole_image_crops_not_from_the_centre_square():
    """Eight classes told apart only by the colour of an object at the far left or right of a
    wide image; validated on square images with the object in the middle (the eval preset). Crops
    drawn by the decode stage from the whole image teach the classes; the same stage fed the
    centre square (what it emitted before) never shows the object and stays at chance. A small
    max-pooling CNN stands in for ResNet-18: the point is what the crops contain."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline import data, presets

    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 210, 30), (30, 210, 220),
               (210, 40, 210), (245, 245, 245), (10, 10, 10)]
    k = len(colours)
    train = [(f"t{c}_{i}", _wide_with_object_at_an_edge(rng, colours[c]), c)
             for c in range(k) for i in range(24)]
    val_x, val_y = [], []
    for c in range(k):
        for _ in range(6):
            img = rng.normal(128, 30, (48, 48, 3))
            y, x = rng.integers(12, 20, 2)
            img[y:y + 16, x:x + 16] = colours[c]
            val_x.append(presets.eval_image(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)),
                                            37, 32))
            val_y.append(c)
    val_x, val_y = presets.normalize(torch.from_numpy(np.stack(val_x))), torch.tensor(val_y)

    def centre_square(img):
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        return img.crop((left, top, left + s, top + s))

    def encoded(centre: bool) -> list[bytes]:
        out = []
        for _, img, _ in train:
            buf = io.BytesIO()
            (centre_square(img) if centre else img).save(buf, format="JPEG", quality=95)
            out.append(buf.getvalue())
        return out

    def fit(centre: bool) -> tuple[float, float]:
        """(val top-1 %, mean train loss over the last epoch)."""
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, k))
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
        jpgs = encoded(centre)
        for epoch in range(14):
            losses = []
            order = np.random.default_rng(epoch).permutation(len(train))
            for i in range(0, len(order), 16):
                idx = order[i:i + 16]
                batch = {"__key__": np.array([train[j][0] for j in idx], dtype=object),
                         "__url__": np.full(len(idx), "s.tar", dtype=object),
                         "jpg": np.array([jpgs[j] for j in idx] + [None], dtype=object)[:-1],
                         "cls": np.array([str(train[j][2]).encode() for j in idx], dtype=object)}
                out = data.decode_batch(batch, mode="train", num_classes=k, crop_size=32,
                                        seed=0, epoch=epoch, min_crop_scale=0.25)
                assert list(out["error"]) == [""] * len(idx)
                loss = nn.functional.cross_entropy(
                    net(presets.normalize(torch.from_numpy(out["image"]))),
                    torch.from_numpy(out["label"]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss))
        with torch.no_grad():
            return float((net(val_x).argmax(1) == val_y).float().mean()) * 100, np.mean(losses)

    (whole, whole_loss), (centre, centre_loss) = fit(False), fit(True)
    print(f"val top-1 {whole:.0f}% vs {centre:.0f}% (chance {100 / k:.1f}%), last-epoch loss "
          f"{whole_loss:.3f} vs {centre_loss:.3f} (ln {k} = {np.log(k):.3f})")
    assert whole >= 90, whole
    # The centre squares hold noise only: nothing to learn. The val top-1 of such a model is
    # whatever colour-to-class mapping the noise left, in steps of 1/k: with k = 8, at most a
    # few classes by luck.
    assert centre <= 40, centre
