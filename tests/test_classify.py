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


def test_random_init_weights_are_refused(tmp_path, capsys):
    img = tmp_path / "a.jpg"
    photo_like(np.random.default_rng(3), 80, 80).save(img)
    assert classify_job.main([str(img), "--weights", "none"]) == 1
    assert "random init: nothing to classify with" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bare_state_dict(tmp_path_factory):
    """A 3-class state_dict trained outside the pipeline: it names no classes."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path_factory.mktemp("sd") / "head3.pt"
    torch.save(net.state_dict(), path)
    return path, net


def test_a_state_dict_without_classes_names_them_from_a_manifest_or_a_text_file(
        bare_state_dict, tmp_path, capsys):
    from tests.test_cli import _one_image_manifest

    path, net = bare_state_dict
    img = tmp_path / "a.jpg"
    photo_like(np.random.default_rng(4), 300, 200).save(img)
    assert classify_job.main([str(img), "--weights", str(path)]) == 1
    assert "--classes-from" in capsys.readouterr().err
    names = tmp_path / "names.txt"
    names.write_text("daisy\n\ntulip\nrose\n")
    ref = _reference(net, img, 256, 224)  # a state_dict is classified at torchvision's preset
    assert classify_job.main([str(img), "--weights", str(path), "--classes-from", str(names),
                              "--json", "--topk", "3", "--device", "cpu"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert [r["name"] for r in top] == [["daisy", "tulip", "rose"][i] for i in np.argsort(-ref)]
    assert np.allclose([r["probability"] for r in top], np.sort(ref)[::-1], atol=1e-5)
    manifest = tmp_path / "val.json"
    _one_image_manifest(manifest)
    m = json.loads(manifest.read_text())
    m["classes"] = [{"index": i, "id": f"n0{i}", "name": n} for i, n in
                    enumerate(["cat", "dog", "fox"])]
    manifest.write_text(json.dumps(m))
    assert classify_job.main([str(img), "--weights", str(path), "--classes-from", str(manifest),
                              "--json", "--topk", "1"]) == 0
    [best] = json.loads(capsys.readouterr().out)["top"]
    assert best["name"] == ["cat", "dog", "fox"][int(np.argmax(ref))]
    assert best["id"] == f"n0{int(np.argmax(ref))}"


@pytest.mark.parametrize("names,expected", [
    ("a\nb\n", "lists 2 classes; the head of weights"),
    ("a\nb\na\n", "class names repeated: a"),
    ("\n\n", "no class names in it"),
])
def test_a_class_list_that_does_not_fit_is_refused(bare_state_dict, tmp_path, capsys, names,
                                                   expected):
    path, _ = bare_state_dict
    f = tmp_path / "names.txt"
    f.write_text(names)
    img = tmp_path / "a.jpg"
    photo_like(np.random.default_rng(5), 80, 80).save(img)
    assert classify_job.main([str(img), "--weights", str(path), "--classes-from", str(f)]) == 1
    assert expected in capsys.readouterr().err


def test_classes_from_cannot_rename_a_model_that_names_its_own(model_pt, tmp_path, capsys):
    path, _ = model_pt
    f = tmp_path / "names.txt"
    f.write_text("x\ny\nz\n")
    img = tmp_path / "a.jpg"
    photo_like(np.random.default_rng(6), 80, 80).save(img)
    assert classify_job.main([str(img), "--weights", str(path), "--classes-from", str(f)]) == 1
    assert "name their own 3 classes" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(model_pt, tmp_path, capsys):
    path, _ = model_pt
    img = tmp_path / "a.jpg"
    photo_like(np.random.default_rng(7), 80, 80).save(img)
    assert classify_job.main([str(img), "--weights", str(path), "--device", "cuda"]) == 1
    assert "--device cuda: no CUDA GPU here" in capsys.readouterr().err


def test_a_missing_names_file_and_a_state_dict_of_another_network_get_one_line(
        bare_state_dict, tmp_path, capsys):
    path, _ = bare_state_dict
    img = tmp_path / "a.jpg"
    photo_like(np.random.default_rng(8), 80, 80).save(img)
    missing = tmp_path / "names.txt"
    assert classify_job.main([str(img), "--weights", str(path), "--classes-from",
                              str(missing)]) == 1
    assert capsys.readouterr().err == f"error: --classes-from {missing}: no such file\n"
    other = tmp_path / "mlp.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3)).state_dict(), other)
    assert classify_job.main([str(img), "--weights", str(other)]) == 1
    assert "hold no fc.weight: not a resnet18 state_dict" in capsys.readouterr().err
