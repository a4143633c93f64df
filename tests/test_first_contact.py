"""A newcomer's first hour: every job with its default flags finishes on a 2-CPU local Ray
cluster, settings that cannot run are refused at once (exit 2, one line, nothing written), and
no run trains zero steps."""

from __future__ import annotations

import json
import os
import time

import pytest

from jobs import finetune, predict as predict_job
from pipeline import resources, train
from pipeline.errors import UsageError
from tests.conftest import finetune_config

TWO_CPUS = resources.Cluster(cpus=2, gpus=0)


# ------------------------------------------------------------------ the resource plan (fast)

def test_default_training_plan_leaves_the_data_stage_a_cpu_on_two_cpus():
    plan = resources.plan_training(TWO_CPUS, num_workers=2, use_gpu=False)
    assert plan.cpus_per_worker == 0.5 and plan.data_cpus == 1.0 and plan.decode_cpus == 1.0


@pytest.mark.parametrize("cpus,workers", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2), (16, 2),
                                          (96, 8)])
def test_auto_training_plans_always_fit_and_leave_the_data_stage_room(cpus, workers):
    plan = resources.plan_training(resources.Cluster(cpus, 0), workers, use_gpu=False)
    used = workers * plan.cpus_per_worker + plan.decode_cpus
    assert plan.cpus_per_worker > 0 and plan.decode_cpus > 0 and used <= cpus + 1e-9


def test_gpu_training_takes_one_cpu_a_worker_and_leaves_the_rest_to_decoding():
    plan = resources.plan_training(resources.Cluster(96, 8), 8, use_gpu=True)
    assert plan.cpus_per_worker == 1.0 and plan.data_cpus == 88.0


@pytest.mark.parametrize("kw,flags", [
    (dict(num_workers=2, use_gpu=False, cpus_per_worker=1.0), "--cpus-per-worker 1"),
    (dict(num_workers=2, use_gpu=True), "--use-gpu with --num-workers 2 needs 2 GPUs"),
    (dict(num_workers=0, use_gpu=False), "--num-workers must be at least 1"),
])
def test_impossible_training_settings_are_refused_naming_flags_and_cluster(kw, flags):
    with pytest.raises(UsageError, match=flags) as e:
        resources.plan_training(TWO_CPUS, **kw)
    assert "--num-workers" in str(e.value)
    if kw["num_workers"]:
        assert "2 CPUs and 0 GPUs" in str(e.value)


def test_a_cluster_that_may_grow_waits_for_nodes_with_a_warning(caplog):
    growing = resources.Cluster(cpus=2, gpus=0, can_grow=True)
    plan = resources.plan_training(growing, 4, use_gpu=True)
    assert plan.num_workers == 4 and plan.data_cpus is None
    assert "Waiting for the autoscaler" in caplog.text


@pytest.mark.parametrize("actors,cpus_per_actor,ok", [(1, 0, True), (2, 0, True), (4, 0, True),
                                                      (1, 1.0, True), (2, 1.0, False),
                                                      (3, 0.5, True), (3, 0.65, False)])
def test_prediction_plans_on_two_cpus(actors, cpus_per_actor, ok):
    if not ok:
        with pytest.raises(UsageError, match=r"--actors .* leaves no CPU to decode.*2 CPUs"):
            resources.plan_prediction(TWO_CPUS, actors, False, cpus_per_actor)
        return
    plan = resources.plan_prediction(TWO_CPUS, actors, False, cpus_per_actor)
    assert actors * plan.cpus_per_actor + plan.decode_cpus <= 2 + 1e-9
    assert plan.decode_cpus != plan.cpus_per_actor  # equal resources would fuse the two


def test_gpu_decoding_leaves_a_share_of_each_gpu_to_the_decode_tasks():
    plan = resources.plan_prediction(resources.Cluster(16, 1), 1, True, decode_device="cuda")
    assert plan.gpus_per_actor + plan.decode_gpus <= 1.0 and plan.decode_gpus > 0
    with pytest.raises(UsageError, match="needs 2 GPUs"):
        resources.plan_prediction(resources.Cluster(16, 1), 2, True)


@pytest.mark.parametrize("samples,workers,batch,expected", [
    (96, 2, 64, 48), (96, 2, 32, 32), (2, 1, 64, 2), (5, 2, 64, 2), (1000, 8, 64, 64)])
def test_per_worker_batch_gives_every_epoch_a_step(samples, workers, batch, expected):
    got, note = train.per_worker_batch(samples, workers, batch)
    assert got == expected and (samples // workers) // got >= 1
    assert bool(note) == (expected != batch)


def test_too_few_train_images_for_the_workers_is_refused():
    with pytest.raises(UsageError, match="3 images: with --num-workers 2 each worker gets 1"):
        train.per_worker_batch(3, 2, 64)


# --------------------------------------------------------- the jobs, default flags, 2 CPUs

def _job(main, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.err + out.out


def test_finetune_with_default_flags_finishes_on_two_cpus(shard_set, tmp_path, ray_local,
                                                          capsys):
    """96 images would be 0 steps at the default batch of 64 on 2 workers (48 rows each,
    drop_last); with every default the job used to hang: 2 workers x 1 CPU held both CPUs."""
    assert ray_local.cluster_resources()["CPU"] == 2
    t0 = time.monotonic()
    code, out = _job(finetune.main, ["--train", str(shard_set / "train.json"), "--val",
                                     str(shard_set / "val.json"), "--weights", "none",
                                     "--epochs", "1", "--storage-path", str(tmp_path / "runs")],
                     capsys)
    assert code == 0, out
    assert time.monotonic() - t0 < 300
    history = json.loads((tmp_path / "runs" / "resnet18-finetune" / "history.json").read_text())
    # 32 train images, 2 workers: 16 rows each, the default batch of 64 lowered to 16
    assert "using a per-worker batch of 16" in out
    assert history[0]["train_images"] == 32 and history[0]["precision"] in ("bf16", "fp32")
    config = json.loads((tmp_path / "runs" / "resnet18-finetune" / "config.json").read_text())
    assert config["resolved"] == {"cpus_per_worker": 0.5, "batch_size_per_worker": 16}


def test_impossible_finetune_settings_exit_2_at_once_writing_nothing(shard_set, tmp_path,
                                                                     ray_local, capsys):
    t0 = time.monotonic()
    code, out = _job(finetune.main, ["--train", str(shard_set / "train.json"), "--val",
                                     str(shard_set / "val.json"), "--weights", "none",
                                     "--cpus-per-worker", "1", "--storage-path",
                                     str(tmp_path / "runs")], capsys)
    assert code == 2 and time.monotonic() - t0 < 30
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--num-workers 2 x --cpus-per-worker 1" in lines[0]
    assert "2 CPUs and 0 GPUs" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_predict_with_impossible_actors_exits_2_at_once(shard_set, tmp_path, ray_local, capsys):
    code, out = _job(predict_job.main, ["--data", str(shard_set / "val.json"), "--weights",
                                        "none", "--out", str(tmp_path / "o"), "--actors", "3",
                                        "--cpus-per-actor", "0.7"], capsys)
    assert code == 2 and "--actors 3 x --cpus-per-actor 0.7" in out
    assert not (tmp_path / "o").exists()


def test_a_prediction_plan_that_leaves_a_fraction_of_a_cpu_runs(shard_set, tmp_path, ray_local,
                                                                capsys):
    """3 actors x 0.6 CPU leave 0.2 CPU: the decode tasks get it, and so must the read tasks
    (Ray's default of one CPU each hung this run until the test timed out)."""
    code, out = _job(predict_job.main, ["--data", str(shard_set / "val.json"), "--weights",
                                        "none", "--out", str(tmp_path / "o"), "--actors", "3",
                                        "--cpus-per-actor", "0.6", "--no-progress"], capsys)
    assert code == 0, out
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["samples"] == 16


@pytest.mark.slow
def test_a_refused_resume_is_one_line_and_changes_nothing(shard_set, tmp_path, ray_local, capsys):
    out = finetune.run(finetune_config(shard_set, tmp_path, epochs=1, name="r"))
    run_dir = tmp_path / "runs" / "r"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    config = (run_dir / "config.json").read_text()
    argv = ["--train", str(shard_set / "train.json"), "--val", str(shard_set / "val.json"),
            "--weights", "none", "--epochs", "2", "--num-workers", "2", "--cpus-per-worker",
            "0.5", "--threads", "1", "--storage-path", str(tmp_path / "runs"), "--name", "r",
            "--batch-size", "8", "--lr", "0.05", "--crop-size", "32", "--shuffle-buffer", "16",
            "--warmup-epochs", "0.5", "--precision", "fp32"]
    assert out["epoch"] == 0
    t0 = time.monotonic()
    code, err = _job(finetune.main, [a if a != "0.05" else "0.5" for a in argv], capsys)
    assert code == 2 and time.monotonic() - t0 < 30, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "lr 0.05 -> 0.5" in lines[0] and "Traceback" not in err
    assert (run_dir / "config.json").read_text() == config
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    # the same settings resume: epoch 2 of 2
    code, err = _job(finetune.main, argv, capsys)
    assert code == 0 and "resuming run r at epoch 2 of 2" in err, err
    assert json.loads((run_dir / "history.json").read_text())[-1]["epoch"] == 1
    # and once more: nothing left to train, said at once, no worker group started
    t0 = time.monotonic()
    code, err = _job(finetune.main, argv, capsys)
    assert code == 0 and "has already trained 2 of 2 epochs: nothing to train" in err, err
    assert time.monotonic() - t0 < 30
    assert len(json.loads((run_dir / "history.json").read_text())) == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["one image per class, 4 classes",
                                  "2 classes, fewer val images than workers"])
def test_tiny_splits_train_and_validate(case, tmp_path, ray_local):
    from pipeline import shards, sources, synthetic

    per = {"train": 1, "val": 1} if case.startswith("one") else {"train": 4, "val": 1}
    classes = 4 if case.startswith("one") else 2
    synthetic.generate_image_folder(str(tmp_path / "img"), per, num_classes=classes, seed=3,
                                    size_range=(48, 64))
    out = tmp_path / "s"
    tm = shards.write_shards(sources.scan_source(str(tmp_path / "img" / "train"), "train"),
                             str(out), progress=False)
    vsrc = sources.with_classes(sources.scan_source(str(tmp_path / "img" / "val"), "val"),
                                tm["classes"])
    if "fewer" in case:
        vsrc.items[:] = vsrc.items[:1]  # one val image, two workers
    shards.write_shards(vsrc, str(out), progress=False)
    assert json.loads((out / "val.json").read_text())["total_samples"] == per["val"] * (
        classes if case.startswith("one") else 1)
    res = finetune.run(finetune_config(out, tmp_path, epochs=1, name="tiny", batch_size=64))
    assert res["train_images"] == (4 if case.startswith("one") else 8)
    assert res["val_images"] == (4 if case.startswith("one") else 1)
    assert os.path.exists(res["model"])


@pytest.mark.parametrize("argv", [["--quick"], [], ["--quick", "--batch-size", "8"]])
def test_benchmark_training_rows_get_several_steady_steps_an_epoch(argv):
    from jobs import _cli, benchmark

    cfg = _cli.parse(benchmark.BenchmarkConfig, argv, "benchmark")
    assert benchmark.train_images(cfg) // cfg.batch_size >= benchmark.MIN_TRAIN_STEPS


def test_benchmark_refuses_sizes_with_no_steady_step():
    from jobs import _cli, benchmark

    cfg = _cli.parse(benchmark.BenchmarkConfig, ["--train-images", "48"], "benchmark")
    with pytest.raises(UsageError, match="1 steps an epoch"):
        benchmark.train_images(cfg)


def test_summary_records_the_precision_the_actors_ran(shard_set, tmp_path, ray_local,
                                                      monkeypatch):
    """The driver's own resolution may differ from the actors' (a CPU-only head driving GPUs
    without bf16): make the driver's say fp16, which no actor here runs."""
    import pyarrow.parquet as pq
    import torch

    from pipeline import model as modellib, predict

    monkeypatch.setattr(modellib, "resolve_precision", lambda *a: torch.float16)
    summary = predict.run_prediction(str(shard_set / "val.json"), "none", str(tmp_path / "o"),
                                     precision="fp32", progress=False)
    assert summary["precision"] == "fp32"
    part = next((tmp_path / "o" / "predictions").glob("*.parquet"))
    assert pq.read_schema(part).metadata[b"precision"] == b"fp32"


def test_a_folder_with_system_and_hidden_files_shards_with_default_flags(tmp_path, ray_local,
                                                                         capsys):
    """.DS_Store, Thumbs.db and a top-level README are in most real folders: listed in the
    manifest, never counted as skipped images (they made the default threshold of 0 fail)."""
    from jobs import shard as shard_job
    from pipeline import synthetic

    synthetic.generate_image_folder(str(tmp_path / "img"), {"train": 2}, num_classes=2, seed=5,
                                    size_range=(48, 64))
    root = tmp_path / "img" / "train"
    for junk in (".DS_Store", "circle/.DS_Store", "square/Thumbs.db", "README.txt"):
        (root / junk).write_bytes(b"\x00junk")
    code, out = _job(shard_job.main, ["--source", str(root), "--out", str(tmp_path / "s"),
                                      "--no-progress"], capsys)
    assert code == 0, out
    m = json.loads((tmp_path / "s" / "train.json").read_text())
    assert m["total_samples"] == 4 and len(m["skipped"]) == 4
    assert "4 hidden or system files, or files outside the class folders" in out
    (root / "circle" / "broken.jpg").write_bytes(b"not a jpeg")  # a real image lost: counted
    code, out = _job(shard_job.main, ["--source", str(root), "--out", str(tmp_path / "s"),
                                      "--no-progress"], capsys)
    assert code == 1 and "1 of 5 source files were skipped" in out


def test_fraction_flags_refuse_a_percentage(capsys):
    from jobs import shard as shard_job

    with pytest.raises(SystemExit) as e:
        shard_job.main(["--source", "x", "--out", "y", "--max-skipped-fraction", "25"])
    assert e.value.code == 2
    assert "is a fraction in [0, 1] (0.05 is 5%), not 25" in capsys.readouterr().err


def test_programming_errors_keep_their_traceback_user_errors_get_one_line(capsys):
    """RuntimeError (a torch shape or device bug) used to print one line and exit 1."""
    from jobs import _cli
    from pipeline.errors import PipelineError

    def job(exc):
        @_cli.reports_errors
        def main(argv=None):
            raise exc
        return main

    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        job(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))()
    assert job(PipelineError("run r stopped"))() == 1
    assert job(UsageError("--actors 3 x ..."))() == 2
    assert job(FileNotFoundError("manifest m does not exist"))() == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: run r stopped", "error: --actors 3 x ...", "error: manifest m does not exist"]
