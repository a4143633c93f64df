"""Several models in one nightly (issue 35, item 6): --weights given more than once gives one
report with the models side by side per set, McNemar's test between each model and the first on
the same images, and history rows keyed by model, each model compared with its own previous run.

Three model.pt files whose top-1 on the val split (4 classes x 4 images) is known by
construction, whatever their random features: ``good`` (ResNet-18, answers class 0: 25%),
``damaged`` (ResNet-18 with an extra class it always answers: 0%) and ``mnet`` (MobileNetV3-Small,
answers class 1: 25%, on other images than ``good``).
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch

from pipeline import architectures, history as historylib, model as modellib, regression, shards

from tests.test_nightly import PRESET, _nightly  # one way to run the job in-process


def _answering(arch: str, classes: list[dict], index: int) -> torch.nn.Module:
    """A random-init ``arch`` whose head always answers class ``index`` (its bias dominates)."""
    torch.manual_seed(0)
    net, _, _ = modellib.build_model(modellib.load_weights("none", arch), classes)
    head = architectures.get_head(net, architectures.head_path(net, arch))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[index] = 20.0
    return net


@pytest.fixture(scope="module")
def models(shard_set, tmp_path_factory):
    classes = shards.load_manifest(str(shard_set / "val.json")).classes
    extra = classes + [{"index": len(classes), "id": "zz-extra", "name": "extra"}]
    folder = tmp_path_factory.mktemp("models")
    made = {"good": ("resnet18", classes, 0), "damaged": ("resnet18", extra, len(classes)),
            "mnet": ("mobilenet_v3_small", classes, 1)}
    for name, (arch, cls, index) in made.items():
        modellib.save_model(str(folder / f"{name}.pt"), _answering(arch, cls, index), cls,
                            PRESET, {}, f"test-{name}", arch)
    return {name: str(folder / f"{name}.pt") for name in made}


@pytest.fixture(scope="module")
def nights(shard_set, models, tmp_path_factory):
    """Two nights on one history folder. Night 1: resnet18 (good), bad (damaged), and
    mobilenet_v3_small (mnet, unnamed: named after its architecture). Night 2 swaps the weights
    of the two ResNet-18 models: resnet18 regresses against its own previous run, bad improves
    against its own, mnet does not change."""
    history = str(tmp_path_factory.mktemp("nightly-models") / "history")
    val = str(shard_set / "val.json")
    rule = ["--alpha", "1.0", "--min-effect", "0"]  # 16 images: make 4 lost images count
    first = _nightly(["--history", history, "--data", val, "--weights", models["good"],
                      "--weights", f"bad={models['damaged']}", "--weights", models["mnet"],
                      *rule])
    second = _nightly(["--history", history, "--data", val,
                       "--weights", f"resnet18={models['damaged']}",
                       "--weights", f"bad={models['good']}", "--weights", models["mnet"], *rule])
    return {"history": history, "first": first, "second": second,
            "table": historylib.read_history(history)}


def _record(history: str, run_id: str) -> dict:
    with open(os.path.join(history, "runs", run_id, "nightly.json")) as f:
        return json.load(f)


def test_a_challenger_worse_than_the_first_model_is_news_not_a_regression(nights):
    code, out, err = nights["first"]
    assert code == 0, out + err  # every model's first run: McNemar between models is no alarm
    table = nights["table"]
    night1 = table[table["run_id"] == table["run_id"].iloc[0]]
    assert sorted(night1["model"]) == ["bad", "mobilenet_v3_small", "resnet18"]
    by_model = night1.set_index("model")
    assert by_model.loc["resnet18", "top1"] == 25.0 and by_model.loc["bad", "top1"] == 0.0
    assert by_model.loc["mobilenet_v3_small", "arch"] == "mobilenet_v3_small"
    assert (by_model.loc["mobilenet_v3_small", "params"]
            < by_model.loc["resnet18", "params"])
    # each model after the first against the first, on the same 16 images
    assert pd.isna(by_model.loc["resnet18", "first_model"])
    assert by_model.loc["bad", "first_model"] == "resnet18"
    assert by_model.loc["bad", "top1_delta_vs_first_model"] == -25.0
    assert by_model.loc["bad", "p_vs_first_model"] == pytest.approx(0.125)  # b=4, c=0
    assert by_model.loc["mobilenet_v3_small", "top1_delta_vs_first_model"] == 0.0
    assert by_model.loc["mobilenet_v3_small", "p_vs_first_model"] == 1.0  # b=4, c=4
    record = _record(nights["history"], night1["run_id"].iloc[0])
    assert [m["name"] for m in record["models"]] == ["resnet18", "bad", "mobilenet_v3_small"]
    versus = {s["model"]: s["versus_first_model"] for s in record["sets"]}
    assert versus["resnet18"] is None
    assert (versus["bad"]["lost"], versus["bad"]["gained"]) == (4, 0)
    assert versus["bad"]["outcome"] == regression.REGRESSION
    assert "vs first model resnet18: top-1 25.00% -> 0.00%" in out
    assert "significantly worse than resnet18" in out
    # each model's predictions in a folder of its own
    run_dir = os.path.join(nights["history"], "runs", night1["run_id"].iloc[0])
    for model in ("resnet18", "bad", "mobilenet_v3_small"):
        assert os.path.exists(os.path.join(run_dir, model, "val", "summary.json"))


def test_the_report_shows_the_models_side_by_side_with_mcnemar(nights):
    table = nights["table"]
    run_id = table["run_id"].iloc[0]
    with open(os.path.join(nights["history"], "runs", run_id, "report.md")) as f:
        report = f.read()
    section = report.split("## val: models side by side", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[:7] == ["model", "architecture", "params (M)", "top-1 % (95% CI)",
                          "top-5 % (95% CI)", "ECE", "images/s"]
    assert "p (McNemar exact)" in header
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
             for r in rows[1:]}
    assert set(cells) == {"resnet18", "bad", "mobilenet_v3_small"}
    assert cells["resnet18"][7] == "first model"
    bad = dict(zip(header, cells["bad"]))
    assert (bad["change vs resnet18 pp"], bad["lost"], bad["gained"]) == ("-25.00", "4", "0")
    assert bad["p (McNemar exact)"] == "0.125" and bad["outcome"] == "worse than resnet18"
    assert dict(zip(header, cells["mobilenet_v3_small"]))["params (M)"] == "1.5"
    # the all-sets table names each row's model, and each model has its own sections
    assert "| set | model | kind |" in report
    assert "## val / bad: Comparisons" in report


def test_each_model_is_compared_with_its_own_previous_run(nights):
    code, out, err = nights["second"]
    assert code == regression.EXIT_REGRESSION, out + err
    table = nights["table"]
    first_id, second_id = table["run_id"].unique()
    night2 = table[table["run_id"] == second_id].set_index("model")
    assert (night2["previous_run_id"] == first_id).all()
    assert night2.loc["resnet18", "verdict"] == regression.REGRESSION  # good -> damaged
    assert night2.loc["resnet18", "top1_delta_vs_previous"] == -25.0
    assert night2.loc["bad", "verdict"] == regression.IMPROVEMENT  # damaged -> good
    assert night2.loc["mobilenet_v3_small", "verdict"] == regression.NO_CHANGE
    assert "== set val, model resnet18: significant regression" in out


def test_history_rows_from_before_models_count_as_the_first_model():
    old = {"run_id": "r0", "dataset": "val", "model": None, "data_manifest_sha256": "x",
           "verdict": regression.FIRST_RUN}
    rows = pd.DataFrame([old])
    current = {"data_manifest_sha256": "x"}
    first = historylib.references(rows, "", "val", current, "resnet18", first=True)
    assert first[0][1]["run_id"] == "r0"  # the first night after the upgrade carries on
    assert historylib.references(rows, "", "val", current, "resnet50", first=False) == []
    named = pd.DataFrame([old, {**old, "run_id": "r1", "model": "resnet50"}])
    other = historylib.references(named, "", "val", current, "resnet50", first=False)
    assert other[0][1]["run_id"] == "r1"
    assert historylib.references(named, "", "val", current, "vit_b_16", first=False) == []


@pytest.mark.parametrize("extra, says", [
    (["--weights", "A", "--weights", "B"], "two models are named 'resnet18'"),
    (["--weights", "DEFAULT", "--weights", "none", "--model", "resnet18", "--model", "resnet50",
      "--model", "vit_b_16"], "2 --weights and 3 --model"),
    (["--weights", "x=", "--weights", "none"], "no weights after x="),
])
def test_models_that_cannot_pair_or_share_a_name_exit_2_before_ray(
        extra, says, models, shard_set, tmp_path):
    extra = [models["good"] if a == "A" else models["damaged"] if a == "B" else a for a in extra]
    code, out, err = _nightly(["--history", str(tmp_path / "h"), "--data",
                               str(shard_set / "val.json"), *extra])
    assert code == 2 and says in err, out + err
    assert not (tmp_path / "h").exists()  # nothing written


def test_one_weights_for_several_architectures_names_each_after_its_own(tmp_path):
    from pipeline import nightly

    ms = nightly.parse_models(["none"], ["resnet18", "mobilenet_v3_small"])
    assert [(m.name, m.weights, m.arch) for m in ms] == [
        ("resnet18", "none", "resnet18"), ("mobilenet_v3_small", "none", "mobilenet_v3_small")]
    assert nightly.parse_models(["champ=DEFAULT"])[0].name == "champ"


def test_a_first_model_without_a_result_leaves_the_others_not_compared(
        shard_set, models, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    history = str(tmp_path / "history")
    code, out, err = _nightly(["--history", history, "--data", str(shard_set / "val.json"),
                               "--weights", f"champ={broken}", "--weights", models["good"]])
    assert code == regression.EXIT_CODES[regression.FAILED], out + err
    table = historylib.read_history(history).set_index("model")
    assert table.loc["champ", "verdict"] == regression.FAILED
    assert table.loc["resnet18", "top1"] == 25.0  # the challenger still ran
    assert table.loc["resnet18", "first_model"] == "champ"  # compared, though with nothing
    assert pd.isna(table.loc["resnet18", "p_vs_first_model"])
    record = _record(history, table["run_id"].iloc[0])
    versus = {s["model"]: s["versus_first_model"] for s in record["sets"]}
    assert versus["resnet18"]["outcome"] == regression.NOT_COMPARABLE
    assert "the first model, champ, has no result on set val (failed)" in \
        versus["resnet18"]["reason"]
    with open(os.path.join(history, "runs", table["run_id"].iloc[0], "report.md")) as f:
        report = f.read()
    side = report.split("## val: models side by side", 1)[1].split("\n## ", 1)[0]
    assert "| resnet18 |" in side and "not compared: the first model, champ" in side
    assert "first model |" not in side.split("| resnet18 |", 1)[1].splitlines()[0]


def test_rows_without_a_model_stay_with_the_model_that_inherited_them():
    """Rows from before models were named belong, for good, to the first model of the first
    night that named them: a later night led by another model does not take them over."""
    old = {"run_id": "r0", "dataset": "val", "model": None, "first_model": None}
    rows = pd.DataFrame([old,
                         {**old, "run_id": "r1", "model": "resnet18"},
                         {**old, "run_id": "r1", "model": "vit", "first_model": "resnet18"}])
    mask = historylib.own_rows(rows, "val", "resnet18", first=False)
    assert list(rows[mask]["run_id"]) == ["r0", "r1"]
    assert list(rows[historylib.own_rows(rows, "val", "convnext", first=True)]["run_id"]) == []
    assert list(rows[historylib.own_rows(rows, "val", "vit", first=True)]["run_id"]) == ["r1"]


@pytest.mark.parametrize("arg, says", [("a--b=DEFAULT", "cannot name a set or model"),
                                       ("report.html=DEFAULT", "cannot name a set or model")])
def test_a_model_name_that_cannot_be_a_folder_or_history_file_is_refused(arg, says):
    from pipeline import nightly

    with pytest.raises(nightly.SuiteError, match=says):
        nightly.parse_models([arg, "DEFAULT"])
    with pytest.raises(nightly.SuiteError, match=says):
        nightly.parse_sets([arg.replace("DEFAULT", "x.json")])


def test_a_weights_file_whose_name_holds_an_equals_sign_is_a_file_not_a_name(tmp_path):
    from pipeline import nightly

    odd = tmp_path / "lr=0.1.pt"
    odd.write_bytes(b"x")
    (m,) = nightly.parse_models([str(odd)])
    assert (m.name, m.weights) == ("resnet18", str(odd))
    spread = nightly.parse_models(["champ=DEFAULT"], ["resnet18", "resnet50"])
    assert [m.name for m in spread] == ["champ-resnet18", "champ-resnet50"]


def test_the_error_names_the_real_fault_first(models):
    """A name that cannot be one is called a bad name, not missing weights; a model.pt of
    another architecture than --model is named as such, not as two models of one name."""
    from pipeline import nightly
    from pipeline.errors import UsageError

    with pytest.raises(nightly.SuiteError, match="'my model' cannot name a set or model"):
        nightly.parse_models(["my model=none"])
    with pytest.raises(UsageError, match="is a resnet18 model.pt"):
        nightly.parse_models([models["good"], "none"], ["mobilenet_v3_small"])


def test_a_named_model_pt_of_another_architecture_is_refused_before_ray(models):
    from pipeline import nightly
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="is a resnet18 model.pt"):
        nightly.parse_models([f"champ={models['good']}"], ["mobilenet_v3_small"])
