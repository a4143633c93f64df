"""--model: any torchvision classifier through the same decode and predict path (issue 35).
Pretrained weights cannot be downloaded here: every model is a random init of the real
architecture, saved to a file, and each family's own preset comes from its weights enum (which
needs no download)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import architectures, benchmark as bench, model as modellib, predictions, predictor
from pipeline import presets
from pipeline.errors import InputError, UsageError

# five families, five presets: resize 232 (ResNet-50 V2), bicubic (EfficientNet-B0), resize 236
# (ConvNeXt-T), a transformer (ViT-B/16), a MobileNet whose head is classifier[3]
FAMILIES = {"resnet50": 2048, "efficientnet_b0": 1280, "convnext_tiny": 768, "vit_b_16": 768,
            "mobilenet_v3_large": 1280}


def _random_state_dict(name: str, path, num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()
    torch.save(net.state_dict(), path)
    return net


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_predicts_what_torchvision_does_with_its_own_preset(
        name, imagenet_like_shards, tmp_path):
    """The Predictor, decoding the raw shard rows itself (``data.decode_batch``, the decode
    tasks' function), against ``weights.transforms()`` and a plain fp32 loop."""
    root, shard_dir = imagenet_like_shards
    net = _random_state_dict(name, tmp_path / "w.pth")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    loaded = modellib.load_weights(str(tmp_path / "w.pth"), name)
    preset = loaded.eval_preset
    assert preset == presets.Preset.from_dict(architectures.preset_of(weights))
    spec = predictor.PredictorSpec(
        str(tmp_path / "w.pth"), modellib.imagenet_classes(), "fp32", False, 5, model=name,
        preset=preset, decode=predictor.ActorDecode(presets.EvalTransform(preset), 1000,
                                                    presets_max_pixels()))
    p = predictor.Predictor(spec)
    assert p.dim == FAMILIES[name]
    reference = weights.transforms()
    files = {os.path.splitext(f)[0]: os.path.join(dp, f) for dp, _, fs in os.walk(root)
             for f in fs}
    checked = 0
    for batch in bench.raw_batches(str(shard_dir / "val.json"), batch_size=12):
        out = p(batch)
        with torch.inference_mode():
            for key, topi, topp in zip(out["key"], out["topk_index"], out["topk_prob"]):
                probs = net(reference(Image.open(files[key]).convert("RGB"))[None]).softmax(1)[0]
                ref_p, ref_i = probs.topk(5)
                assert np.allclose(topp, ref_p.numpy(), atol=1e-5), (name, key)
                # the same top-1 where the reference's is not a near-tie of random weights
                if float(ref_p[0] - ref_p[1]) > 1e-5:
                    assert int(topi[0]) == int(ref_i[0]), (name, key)
                checked += 1
    assert checked == 12


def presets_max_pixels() -> int:
    from pipeline import images

    return images.DEFAULT_MAX_PIXELS


def test_an_unknown_model_names_the_closest_ones():
    with pytest.raises(UsageError, match=r"--model resnet5: .* closest: resnet50"):
        architectures.check_name("resnet5")
    with pytest.raises(UsageError, match="convnext_tiny"):
        modellib.load_weights("none", "convnext_tiy")


def test_a_state_dict_of_another_architecture_names_the_first_tensor_that_does_not_fit(
        tmp_path):
    _random_state_dict("mobilenet_v3_small", tmp_path / "m.pth")
    loaded = modellib.load_weights(str(tmp_path / "m.pth"), "resnet18")
    with pytest.raises(InputError, match=r"do not fit resnet18 with \d+ classes: tensor "
                                         r"conv1.weight \(64, 3, 7, 7\) is missing"):
        modellib.build_model(loaded, None)


def test_a_state_dict_without_batchnorm_counters_loads_as_torch_loads_it(tmp_path):
    """torchvision's older files (resnet18-5c106cde.pth) hold no num_batches_tracked."""
    net = _random_state_dict("resnet18", tmp_path / "full.pth")
    torch.save({k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k},
               tmp_path / "old.pth")
    loaded, _, replaced = modellib.build_model(modellib.load_weights(str(tmp_path / "old.pth")),
                                               None)
    assert not replaced and torch.equal(loaded.fc.weight, net.fc.weight)


def test_a_model_pt_knows_its_architecture_and_refuses_another(tmp_path):
    net, classes, _ = modellib.build_model(modellib.load_weights("none", "mobilenet_v3_small"),
                                           [{"index": i, "id": f"c{i}", "name": f"c{i}"}
                                            for i in range(3)])
    path = str(tmp_path / "model.pt")
    modellib.save_model(path, net, classes, architectures.default_preset("mobilenet_v3_small"),
                        {}, "m", arch="mobilenet_v3_small")
    loaded = modellib.load_weights(path)  # no --model: the file's own
    assert loaded.arch == "mobilenet_v3_small" and loaded.eval_preset.resize_size == 256
    again, _, replaced = modellib.build_model(loaded, None)
    assert not replaced and again.classifier[3].out_features == 3
    with pytest.raises(UsageError, match="is a mobilenet_v3_small model.pt; drop --model"):
        modellib.load_weights(path, "resnet18")


@pytest.mark.parametrize("name,head", [("resnet18", "fc"), ("efficientnet_b0", "classifier.1"),
                                       ("vit_b_16", "heads.head"), ("swin_t", "head"),
                                       ("regnet_x_400mf", "fc")])  # RegNet: not on meta
def test_the_head_is_the_last_linear_layer_and_is_replaced_for_new_classes(name, head):
    assert architectures.head_key(name) == head
    classes = [{"index": i, "id": f"c{i}", "name": f"c{i}"} for i in range(7)]
    net, _, _ = modellib.build_model(modellib.load_weights("none", name), classes)
    assert architectures.get_head(net, head).out_features == 7
    backbone, fc = modellib.split_for_inference(net)
    assert fc.out_features == 7 and fc.in_features == architectures.embedding_dim(net)


def test_a_model_without_a_linear_head_is_refused():
    with pytest.raises(InputError, match="no linear head"):
        modellib.build_model(modellib.load_weights("none", "squeezenet1_0"),
                             [{"index": 0, "id": "a", "name": "a"}])


def test_the_probe_freezes_everything_but_each_familys_head():
    from pipeline import train_worker

    for name in ("resnet18", "mobilenet_v3_small", "convnext_tiny"):
        net = architectures.build(name, 4).train()
        head = architectures.head_key(name)
        train_worker.set_backbone_frozen(net, True)
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
        assert trainable == {f"{head}.weight", f"{head}.bias"}, name
        assert architectures.get_head(net, head).training
        assert not any(m.training for n, m in net.named_modules()
                       if n and not n.startswith(head) and not head.startswith(n))
        groups = train_worker.param_groups(net, 0.1, 1.0, 1e-4)
        assert sum(len(g["params"]) for g in groups if g["lr"] == 1.0) == 2, name


def test_every_torchvision_weights_has_its_val_figure_in_the_guard():
    from pipeline import published

    models = {p.model for p in published.BUILTIN if p.dataset == published.IMAGENET_VAL}
    for name in architectures.names():
        for w in torchvision.models.get_model_weights(name):
            assert architectures.model_id(name, w) in models
    [vit] = [p for p in published.BUILTIN
             if p.model == "torchvision/vit_b_16/IMAGENET1K_V1"]
    assert (vit.top1, vit.top5, vit.samples) == (81.072, 95.318, 50_000)


# --- through the jobs ---------------------------------------------------------------------------

def test_every_job_takes_model_and_an_unknown_name_is_one_line(capsys):
    from jobs import classify, embed, finetune, nightly_eval, predict as predict_job, probe

    for job in (classify, embed, finetune, nightly_eval, predict_job, probe):
        with pytest.raises(SystemExit):
            job.main(["--help"])
        assert "--model MODEL" in capsys.readouterr().out, job.__name__
    code = predict_job.main(["--data", "x.json", "--weights", "none", "--out", "o",
                             "--model", "resnet5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "closest: resnet50" in err, err


def test_convnext_embeddings_are_768_wide(shard_set, tmp_path, capsys):
    import pyarrow.parquet as pq

    from jobs import embed

    out = tmp_path / "emb"
    code = embed.main(["--data", str(shard_set / "val.json"), "--weights", "none", "--out",
                       str(out), "--model", "convnext_tiny", "--precision", "fp32",
                       "--crop-size", "64", "--resize-size", "72", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = predictions.Summary.read(str(out))
    assert summary.arch == "convnext_tiny" and summary.embedding["dim"] == 768
    assert summary.embedding["layer"] == "the input of the head (classifier.2)"
    table = pq.read_table(next((out / "predictions").glob("*.parquet")))
    assert table.schema.field("embedding").type.list_size == 768 and table.num_rows == 16


@pytest.mark.slow
def test_a_fine_tuned_mobilenet_predicts_without_model_and_resumes_only_as_itself(
        shard_set, tmp_path, ray_local, capsys):
    from jobs import finetune, predict as predict_job
    from tests.conftest import finetune_config, run_job

    res = finetune.run(finetune_config(shard_set, tmp_path, epochs=1, model="mobilenet_v3_small"))
    loaded = modellib.load_weights(res["model"])
    assert loaded.arch == "mobilenet_v3_small"
    assert loaded.model_id.startswith("mobilenet_v3_small-finetuned/t/")
    out = tmp_path / "eval"
    code, text = run_job(predict_job.main, ["--data", str(shard_set / "val.json"), "--weights",
                                            res["model"], "--out", str(out), "--no-progress"],
                         capsys)
    assert code == 0, text
    summary = predictions.Summary.read(str(out))
    assert summary.arch == "mobilenet_v3_small" and summary.samples == 16
    # a rerun of the run's name with another model is another experiment: refused
    argv = ["--train", str(shard_set / "train.json"), "--val", str(shard_set / "val.json"),
            "--weights", "none", "--epochs", "2", "--num-workers", "2", "--cpus-per-worker",
            "0.5", "--threads", "1", "--storage-path", str(tmp_path / "runs"), "--name", "t",
            "--batch-size", "8", "--lr", "0.05", "--crop-size", "32", "--shuffle-buffer", "16",
            "--warmup-epochs", "0.5", "--precision", "fp32", "--model", "resnet18"]
    code, text = run_job(finetune.main, argv, capsys)
    assert code == 2 and "model 'mobilenet_v3_small' -> 'resnet18'" in text, text
