"""Weights: every spec loads safely; bad files fail with a clear error; heads are replaced."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torchvision.models import resnet18

from pipeline import model as modellib

CLASSES = [{"index": i, "id": f"c{i}", "name": f"class {i}"} for i in range(3)]


def test_random_init_uses_the_data_classes():
    net, classes, replaced = modellib.build_model(modellib.load_weights("none"), CLASSES)
    assert net.fc.out_features == 3 and classes == CLASSES and not replaced


def test_imagenet_state_dict_file_gets_a_new_head_for_new_classes(tmp_path):
    path = tmp_path / "rn18.pth"
    torch.save(resnet18().state_dict(), path)
    loaded = modellib.load_weights(str(path))
    assert len(loaded.classes) == 1000 and loaded.classes[0]["name"] == "tench"
    net, _, replaced = modellib.build_model(loaded, CLASSES)
    assert replaced and net.fc.out_features == 3
    same, _, kept = modellib.build_model(loaded, None)
    assert not kept and same.fc.out_features == 1000


def test_model_pt_round_trip(tmp_path):
    net, classes, _ = modellib.build_model(modellib.load_weights("none"), CLASSES)
    modellib.save_model(str(tmp_path / "model.pt"), net, classes, {"crop_size": 64}, {"x": 1}, "m")
    loaded = modellib.load_weights(str(tmp_path / "model.pt"))
    assert loaded.classes == CLASSES and loaded.preset == {"crop_size": 64}
    again, _, replaced = modellib.build_model(loaded, CLASSES)
    assert not replaced
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 again.state_dict().values()))


def test_wrong_shape_weights_fail_naming_the_file(tmp_path):
    state = resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        modellib.build_model(modellib.load_weights(str(tmp_path / "bad.pth")), None)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_weights_never_runs(tmp_path):
    evil = _Evil()
    evil.marker = str(tmp_path / "owned")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"fc.weight": evil}, f)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        modellib.load_weights(str(tmp_path / "evil.pt"))
    assert not os.path.exists(tmp_path / "owned")


def test_missing_weights_and_offline_default_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not DEFAULT, IMAGENET1K_V1, none"):
        modellib.load_weights(str(tmp_path / "nope.pt"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    with pytest.raises(RuntimeError, match="resnet18-f37072fd.pth"):
        modellib.load_weights("DEFAULT")


def test_for_inference_folds_batchnorm_and_predicts_the_same():
    torch.manual_seed(0)
    net = resnet18(num_classes=10).train()
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), or folding changes nothing
        for _ in range(2):
            net(torch.randn(4, 3, 64, 64) * 3 + 1)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = modellib.for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 20  # untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(6, 3, 64, 64)
    with torch.inference_mode():
        ref, out = net(x), folded(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
        bf16 = modellib.for_inference(net, dtype=torch.bfloat16)(x.bfloat16()).float()
    assert torch.equal(bf16.argmax(1), ref.argmax(1))


def test_auto_precision_follows_the_cpu_and_the_switch_that_plays_a_cpu_without_bf16(
        monkeypatch):
    from pipeline import machine

    cpu = torch.device("cpu")
    monkeypatch.delenv(machine.CPU_BF16_ENV, raising=False)
    native = torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert modellib.resolve_precision("auto", cpu) == (torch.bfloat16 if native else
                                                       torch.float32)
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(machine.CPU_BF16_ENV, off)
        assert modellib.resolve_precision("auto", cpu) == torch.float32, off
    assert modellib.resolve_precision("bf16", cpu) == torch.bfloat16  # asked for: still bf16
    assert machine.summary()["auto_precision_cpu"] == "fp32"
    assert "--precision auto on the CPU: fp32 (forced by RESNET_PIPELINE_CPU_BF16=0)" in \
        machine.describe()
    monkeypatch.setenv(machine.CPU_BF16_ENV, "1")  # the CPU decides, as with none
    assert modellib.resolve_precision("auto", cpu) == (torch.bfloat16 if native else
                                                       torch.float32)


def test_the_machine_line_names_the_instruction_sets_that_decide_the_precision():
    from pipeline import machine

    avx2 = {"cpu": "AMD EPYC", "cores": 2, "torch_cpu_capability": "AVX2",
            "isa": machine.instruction_sets({"fpu", "avx", "avx2"}),
            "auto_precision_cpu": "fp32", "cpu_bf16_forced_off": False}
    assert machine.describe(avx2) == (
        "AMD EPYC, 2 cores, AVX2 (no AVX-512, no AVX-512 bf16, no AMX bf16); torch CPU kernels "
        "AVX2; --precision auto on the CPU: fp32")
    bf16 = machine.instruction_sets({"avx2", "avx512f", "avx512_bf16"})
    assert bf16 == {"AVX2": True, "AVX-512": True, "AVX-512 bf16": True, "AMX bf16": False}
    here = machine.summary()
    assert here["cores"] == os.cpu_count() and set(here["isa"]) == set(bf16)
