"""jobs.classify: the seed's first step, through the pipeline's own preset and model loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from jobs import classify as classify_job
from pipeline import model as modellib, presets
from tests.conftest import photo_like

CLASSES = [{"index": i, "id": f"c{i}", "name": f"class {i}"} for i in range(3)]


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    """A model.pt as jobs.finetune writes it: 3 classes, a 64/56 preset."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    path = tmp_path_factory.mktemp("m") / "model.pt"
    preset = {"resize_size": 64, "crop_size": 56}
    modellib.save_model(str(path), net, CLASSES, preset, {}, "test")
    return path, net.eval()


def _reference(net, path, resize, crop) -> np.ndarray:
    """torchvision's own eval preset and a plain forward pass: the independent oracle."""
    x = presets.reference_eval_transform(resize, crop)(Image.open(path).convert("RGB"))
    with torch.no_grad():
        return net(x[None]).softmax(1)[0].numpy()


def test_classify_prints_topk_names_matching_torchvision(model_pt, tmp_path, capsys):
    path, net = model_pt
    img = tmp_path / "a.jpg"
    photo_like(np.random.default_rng(1), 120, 90).save(img)
    assert classify_job.main([str(img), "--weights", str(path), "--json", "--topk", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = _reference(net, img, 64, 56)
    order = np.argsort(-ref)[:2]
    assert [r["index"] for r in out["top"]] == order.tolist()
    assert [r["name"] for r in out["top"]] == [f"class {i}" for i in order]
    assert np.allclose([r["probability"] for r in out["top"]], ref[order], atol=1e-5)


def test_bad_and_missing_files_get_one_line_each_and_exit_1_after_the_rest(model_pt, tmp_path,
                                                                           capsys):
    path, _ = model_pt
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    photo_like(np.random.default_rng(2), 80, 80).save(good)
    bad.write_bytes(b"not an image")
    code = classify_job.main([str(bad), str(tmp_path / "missing.jpg"), str(good), "--weights",
                              str(path)])
    out = capsys.readouterr()
    assert code == 1
    assert out.err.splitlines() == [f"error: {bad}: not an image (PIL cannot identify it)",
                                    f"error: {tmp_path / 'missing.jpg'}: no such file"]
    assert out.out.splitlines()[0] == str(good) and len(out.out.splitlines()) == 4  # top-3


def test_weights_that_name_no_classes_are_refused(tmp_path, capsys):
    img = tmp_path / "a.jpg"
    photo_like(np.random.default_rng(3), 80, 80).save(img)
    assert classify_job.main([str(img), "--weights", "none"]) == 1
    assert "name no classes" in capsys.readouterr().err
