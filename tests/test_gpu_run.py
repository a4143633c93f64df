"""The prepared GPU run: the table it prints and writes into docs/BENCHMARKS.md, the goals it
judges, its commands (every job that can use the GPU is told to), the image generator, the
bundle script's usage, and (slow, ~2.5 min) the whole run with --quick on the CPU."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench import gpu_run
from pipeline import docsection
from pipeline import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(**kw) -> dict:
    base = {"date": "2026-12-04 23:10 UTC", "command": "python -m bench.gpu_run /tmp/gr",
            "quick": False, "images": 20000, "train_crop": 224, "cores": 16, "gpus": 1,
            "gpu": "NVIDIA H200", "torch": "2.11.0", "ray": "2.60.0",
            "generate_s": 31.0, "machine": machine.summary(), "steps": []}
    base.update(kw)
    return base


def test_the_table_has_a_row_per_step_with_its_figures_and_names_a_failure():
    steps = [
        {"step": "predict", "exit": 0, "expected_exit": 0, "ok": True, "wall_s": 21.0,
         "samples": 20000, "images_per_s": 1200.0, "steady_images_per_s": 5100.0,
         "startup_seconds": 12.0, "wall_seconds": 16.0, "precision": "bf16", "failures": 0},
        {"step": "finetune", "exit": 1, "expected_exit": 0, "ok": False, "wall_s": 80.0,
         "epochs": [{"epoch": 0, "train_images_per_s": 2000.0,
                     "train_steady_images_per_s": 3100.0, "train_first_step_seconds": 2.0,
                     "val_top1": 10.5, "precision": "bf16"}]},
        {"step": "nightly-2", "exit": 0, "expected_exit": 0, "ok": True, "wall_s": 30.0,
         "verdict": "no significant change (exit 0)"},
        {"step": "benchmark-cuda", "exit": 0, "expected_exit": 0, "ok": True, "wall_s": 70.0,
         "figures": {"model_img_s": 21_000.0, "precision": "bf16", "predictor_img_s": 19_000.0,
                     "cores": 16, "cpu_decode_img_s": 6_000.0, "nvjpeg_img_s": 8_000.0,
                     "train_img_s": 4_000.0, "equiv_top1_agree_pct": 99.2}},
    ]
    text = gpu_run.table(_record(steps=steps))
    lines = text.splitlines()
    assert lines[0].startswith("GPU run 2026-12-04 23:10 UTC on NVIDIA H200 (1 GPU), CPU ")
    assert machine.describe() in lines[0] and "`python -m bench.gpu_run /tmp/gr`" in lines[0]
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| step")]
    assert [r.split(" | ")[0] for r in rows] == ["| predict", "| finetune", "| nightly-2",
                                                 "| benchmark-cuda"]
    assert "model alone 21,000.0 img/s (bf16)" in rows[3] and "nvJPEG 8,000.0 img/s" in rows[3]
    assert "5,100.0 img/s steady" in rows[0] and "bf16" in rows[0]
    assert "| **1** (expected 0) |" in rows[1] and "3,100.0 img/s steady" in rows[1]
    assert "verdict: no significant change (exit 0)" in rows[2]


def test_the_table_goes_between_the_gpu_run_markers_only(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("intro\n<!-- benchmark:begin -->\nCPU\n<!-- benchmark:end -->\nmiddle\n"
                   "<!-- gpu-run:begin -->\nold\n<!-- gpu-run:end -->\nend\n")
    docsection.write(str(doc), gpu_run.DOCS_MARKER, "NEW TABLE")
    assert doc.read_text() == ("intro\n<!-- benchmark:begin -->\nCPU\n<!-- benchmark:end -->\n"
                               "middle\n<!-- gpu-run:begin -->\nNEW TABLE\n<!-- gpu-run:end -->"
                               "\nend\n")
    text = open(gpu_run.DOCS, encoding="utf-8").read()
    assert text.count("<!-- gpu-run:begin -->") == text.count("<!-- gpu-run:end -->") == 1


def test_the_generator_writes_reproducible_imagenet_sized_jpegs_in_every_class(tmp_path):
    from PIL import Image

    assert gpu_run.generate(str(tmp_path / "a"), 12, cores=1) > 0
    gpu_run.generate(str(tmp_path / "b"), 12, cores=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 12 and len({f.parent for f in files}) == gpu_run.NUM_CLASSES
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        with Image.open(tmp_path / "a" / f) as img:
            assert img.format == "JPEG" and 300 <= min(img.size) and max(img.size) < 560


def test_the_bundle_script_says_how_it_is_used_and_refuses_a_missing_bundle(tmp_path):
    script = os.path.join(ROOT, "bench", "gpu_bundle.sh")
    usage = subprocess.run([script], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "bench/gpu_bundle.sh build" in usage.stdout
    missing = subprocess.run([script, "install", str(tmp_path / "none"), str(tmp_path / "s")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "no bundle in" in missing.stderr


def _parses(argv: list[str]):
    """The config the job's own parser makes of ``argv`` (``python -m`` arguments)."""
    import importlib

    from jobs import _cli

    module = importlib.import_module(argv[0])
    # the job's own config class (jobs.benchmark's lives in bench/config.py, beside its tables)
    config = next(v for k, v in vars(module).items()
                  if k.endswith("Config") and getattr(v, "__module__", "") in (argv[0],
                                                                              "bench.config"))
    return _cli.parse(config, argv[1:], argv[0].split(".")[1])


def test_on_a_gpu_every_job_that_can_use_it_is_told_to_and_every_command_parses(tmp_path):
    """The prepared run once called jobs.predict and the nightly without --use-gpu: on the H200
    they would have predicted on its CPUs."""
    for gpus in (1, 0):
        cmds = dict(gpu_run.step_commands(str(tmp_path), str(tmp_path / "img"), 20_000, gpus,
                                          quick=False))
        assert ("predict-decode-cuda" in cmds) == bool(gpus)  # it needs --use-gpu
        assert ("predict-decode-cuda-actor" in cmds) == bool(gpus)
        for name, argv in cmds.items():
            cfg = _parses(argv)
            if hasattr(cfg, "use_gpu"):
                assert cfg.use_gpu == bool(gpus), name
        assert _parses(cmds["finetune"]).crop_size == 224
    assert [n for n, _ in gpu_run.step_commands(str(tmp_path), "img", 192, 1, True)] == [
        "shard-val", "shard-train", "predict", "predict-decode-cuda",
        "predict-decode-cuda-actor", "finetune", "nightly-1",
        "nightly-2", "benchmark-cuda", "classify"]
    # the CPU rehearsal leaves out the steps that need CUDA
    assert "benchmark-cuda" not in dict(gpu_run.step_commands(str(tmp_path), "img", 192, 0, True))
    bench_cuda = dict(gpu_run.step_commands(str(tmp_path), "img", 192, 1, False, True))[
        "benchmark-cuda"]
    assert _parses(bench_cuda).device == "cuda" and _parses(bench_cuda).write_docs


def _goal_steps(predict_rate: float, finetune_rate: float, nightly_s: float) -> list[dict]:
    ran = {"exit": 0, "expected_exit": 0, "wall_s": 1.0}
    return [{**ran, **s} for s in [
        {"step": "predict", "ok": True, "steady_images_per_s": predict_rate / 2},
        {"step": "predict-decode-cuda", "ok": True, "steady_images_per_s": predict_rate},
        {"step": "finetune", "ok": True,
         "epochs": [{"epoch": e, "train_images_per_s": 1.0, "train_steady_images_per_s": r,
                     "train_first_step_seconds": 1.0, "val_top1": 10.0, "precision": "bf16"}
                    for e, r in ((0, 1.0), (1, finetune_rate))]},
        {"step": "nightly-2", "ok": True, "wall_s": nightly_s},
        {"step": "benchmark-cuda", "ok": True,
         "figures": {"model_img_s": 20_000.0, "nvjpeg_img_s": 7_000.0,
                     "cpu_decode_img_s": 3_000.0}}]]


def test_the_jobs_goals_are_judged_on_a_gpu_from_the_steps_figures_only():
    goals = {g["key"]: g for g in gpu_run.judge_goals(
        _record(steps=_goal_steps(6_000.0, 2_900.0, 59.0)))}
    # the faster predict (nvJPEG) against the lower of its ceilings (nvJPEG's 7,000)
    assert goals["predict_img_s"]["value"] == 6_000.0 and goals["predict_img_s"]["met"]
    assert goals["predict_vs_ceiling"]["value"] == pytest.approx(6_000 / 7_000)
    assert goals["predict_vs_ceiling"]["met"]
    assert goals["finetune_img_s"]["value"] == 2_900.0 and goals["finetune_img_s"]["met"] is False
    assert goals["nightly_wall_s"]["met"] is True
    text = gpu_run.table(_record(steps=[]))
    assert "Goals for one H200:" in text and "not measured" in text and " met" not in text
    # a CPU rehearsal, or --quick, judges nothing
    for kw in ({"gpus": 0}, {"quick": True}):
        r = _record(steps=_goal_steps(6_000.0, 4_000.0, 10.0))
        r.update(kw)
        assert all(g["met"] is None for g in gpu_run.judge_goals(r))
        assert "(not judged" in gpu_run.table(r)


@pytest.mark.slow
def test_the_prepared_gpu_run_goes_through_on_the_cpu_with_quick(tmp_path):
    """The whole prepared run (bench/gpu_run.sh --quick: 192 images, every step as its own job
    process on its own local Ray cluster), as it must go through before a GPU session spends
    minutes on it: every step exits 0 and the figures the GPU run reports are there. ~2.5 min
    on 2 cores (the steps that need CUDA are left out here)."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    proc = subprocess.run([os.path.join(ROOT, "bench", "gpu_run.sh"), str(tmp_path / "gr"),
                           "--quick"], capture_output=True, text=True, timeout=900, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((tmp_path / "gr" / "gpu_run.json").read_text())
    steps = {s["step"]: s for s in r["steps"]}
    assert list(steps) == [n for n, _ in gpu_run.step_commands(
        str(tmp_path / "gr"), "img", 192, 0, True)] and not r["failed"]
    assert steps["predict"]["samples"] == 192 and steps["predict"]["failures"] == 0
    assert 0 < steps["predict"]["predictor_busy_share"] <= 1
    assert [e["epoch"] for e in steps["finetune"]["epochs"]] == [0, 1]
    assert all(0 <= e["train_data_wait_share"] <= 1 for e in steps["finetune"]["epochs"])
    assert steps["nightly-1"]["verdict"].startswith("first run")
    assert steps["nightly-2"]["verdict"].startswith("no significant change")
    assert steps["classify"]["lines"] == 4
    assert all(g["met"] is None for g in r["goals"])  # a CPU judges no H200 goal
    assert r["skipped"] == list(gpu_run.CUDA_STEPS)  # and says which steps it left out
    for name in gpu_run.CUDA_STEPS:
        assert f"| {name} | skipped | | needs CUDA" in proc.stdout
    assert "| predict | 0 |" in proc.stdout and "Goals for one H200 (not judged" in proc.stdout
