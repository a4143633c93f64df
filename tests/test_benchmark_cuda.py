"""``jobs.benchmark --device cuda`` (bench/gpu_table.py): needs no Ray or webdataset, measures
what a CPU can when the tests run it there, marks the rest, and is refused without CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from bench import gpu_table
from bench import config
from jobs import benchmark
from pipeline import benchmark as bench

ROOT = os.path.join(os.path.dirname(__file__), "..")
CPU_RATES = ("model_img_s", "model_fp32_img_s", "predictor_img_s", "cpu_decode_img_s",
             "train_img_s")
GPU_FIGURES = ("nvjpeg_img_s", "nvjpeg_failed", "equiv_top1_agree_pct", "equiv_max_prob_diff",
               "nvjpeg_max_pixel_diff", "nvjpeg_top1_agree_pct")

# The table as a bare GPU machine runs it: importing ray, webdataset or pandas (directly or
# through a pipeline module) raises ImportError, and the child says whether they are still
# blocked. On a CPU (the tests) the table runs on "cpu": jobs.benchmark refuses --device cuda
# without CUDA.
BLOCKED_RUN = """
import json, sys
sys.modules["ray"] = None
sys.modules["webdataset"] = None
sys.modules["pandas"] = None
import torch
import dataclasses
from jobs import _cli
from bench import config, gpu_table
cfg = _cli.parse(config.BenchmarkConfig, ["--device", "cuda", "--quick"], "benchmark")
cfg = dataclasses.replace(cfg, batch_size=8)  # resolve() without its CUDA check
r = gpu_table.measure(cfg, "cuda" if torch.cuda.is_available() else "cpu")
print(gpu_table.report(r))
with open(sys.argv[1], "w") as f:
    json.dump(r, f, allow_nan=False)
assert sys.modules["ray"] is None and sys.modules["webdataset"] is None
assert sys.modules["pandas"] is None
"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "g.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out, time.monotonic() - t0


def test_quick_run_needs_no_ray_and_exits_0(quick_run):
    proc, out, seconds = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists()
    assert seconds < 120, f"--quick took {seconds:.0f} s"


def test_quick_run_prints_every_row_and_the_machine(quick_run):
    proc, _, _ = quick_run
    text = proc.stdout
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    for name in gpu_table.ROWS:
        assert sum(f"| {name} |" in ln for ln in table) == 1, f"row {name!r} missing:\n{text}"
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    assert f" on {device}:" in text and f"torch {torch.__version__}" in text
    assert "Written by the harness" in text
    for goal in gpu_table.GOALS:
        assert goal[2] in text


def test_quick_run_json_has_cpu_rates_and_marks_gpu_rows(quick_run):
    proc, out, _ = quick_run
    r = json.loads(out.read_text())
    for key in CPU_RATES:
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["predictor_vs_model"] == pytest.approx(r["predictor_img_s"] / r["model_img_s"])
    assert r["date"] and r["torch"] and r["torchvision"] and r["quick"] is True
    import torch

    if torch.cuda.is_available():
        assert r["cuda"] and r["nvjpeg_img_s"] > 0 and r["nightly"]
        assert all(r[k] is not None for k in GPU_FIGURES) and not r["not_measured"]
        return
    assert r["device"] == "CPU" and r["cuda"] is False and r["nightly"] is None
    for key in GPU_FIGURES:
        assert r[key] is None and r["not_measured"][key] == gpu_table.NOT_MEASURED
    rows = {ln.split(" | ")[1]: ln for ln in proc.stdout.splitlines() if ln.startswith("| ")}
    for name in (gpu_table.ROW_NVJPEG, gpu_table.ROW_EQUIV_MODEL, gpu_table.ROW_EQUIV_DECODE):
        assert gpu_table.NOT_MEASURED in rows[name]
    for name in (gpu_table.ROW_MODEL, gpu_table.ROW_PREDICTOR, gpu_table.ROW_CPU_DECODE,
                 gpu_table.ROW_TRAIN):
        assert gpu_table.NOT_MEASURED not in rows[name] and "images/s" in rows[name]
    # A CPU says nothing about an H200: no goal is judged.
    assert all(g["met"] is None for g in r["goals"])
    assert " met" not in proc.stdout and "MISSED" not in proc.stdout


def test_help_says_what_each_device_measures_and_that_cuda_needs_no_ray(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "without Ray" in text and "nvJPEG" in text and "Predictor" in text
    assert "--device {cpu,cuda}" in text and "--quick" in text


def test_cuda_without_a_gpu_and_flags_for_the_other_table_are_refused(monkeypatch, capsys):
    """A flag that sizes the other device's table would do nothing: one line, exit 2."""
    import torch

    from tests.conftest import run_job

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out = run_job(benchmark.main, ["--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: torch sees no CUDA device here" in out
    code, out = run_job(benchmark.main, ["--train-crop", "64", "--device", "cuda"], capsys)
    assert code == 2 and "--train-crop: only for --device cpu's table" in out
    code, out = run_job(benchmark.main, ["--weights", "DEFAULT", "--repeats", "3"], capsys)
    assert code == 2 and "--repeats, --weights: only for --device cuda's table" in out
    cfg = config.resolve(config.BenchmarkConfig())
    assert cfg.device == "cpu" and cfg.batch_size == 32


def _figures(**kw) -> dict:
    r = {**dict.fromkeys(("nvjpeg_img_s", "model_img_s", "predictor_vs_model", "train_img_s")),
         "cuda": True}
    r.update(kw)
    return r


def test_goals_are_judged_only_on_cuda():
    r = _figures(model_img_s=25_000.0, predictor_vs_model=0.85, nvjpeg_img_s=5_000.0,
                 train_img_s=4_999.0)
    met = {g["key"]: g["met"] for g in gpu_table.judge_goals(r)}
    assert met == {"model_img_s": True, "predictor_vs_model": False, "nvjpeg_img_s": True,
                   "train_img_s": False}
    r["goals"] = gpu_table.judge_goals(r)
    text = gpu_table.goals_text(r)
    assert text.count(" met") == 2 and text.count("MISSED") == 2
    r = _figures(model_img_s=25_000.0, predictor_vs_model=0.95, cuda=False)
    assert [g["met"] for g in gpu_table.judge_goals(r)] == [None] * 4


def test_nightly_estimate_takes_the_slower_of_decode_and_predictor():
    r = {"predictor_img_s": 10_000.0, "cpu_decode_img_s": 2_500.0, "nvjpeg_img_s": 20_000.0}
    cpu, nv = gpu_table.nightly_estimate(r)
    assert cpu["bound"] == "decode" and cpu["node_img_s"] == 2_500.0
    assert cpu["seconds_1_node"] == pytest.approx(20.0)
    assert cpu["seconds_8_nodes"] == pytest.approx(2.5)
    assert nv["bound"] == "compute" and nv["seconds_1_node"] == pytest.approx(5.0)


def test_best_rate_times_the_calls_and_keeps_the_best_repeat():
    import torch

    # warm-up, then two repeats of two calls; sleeps long enough that a busy 2-core machine's
    # oversleep (a few ms) cannot blur the two repeats (0.4 s and 0.1 s)
    delays = iter([0.0, 0.2, 0.2, 0.05, 0.05])

    def fn():
        time.sleep(next(delays))
    rate = bench.best_rate(fn, 4, torch.device("cpu"), repeats=2, warmup=1, calls=2)
    assert 8 / 0.2 < rate <= 8 / 0.1  # the faster repeat (2 x 0.05 s), not the mean (8 / 0.25)


def test_a_broken_jpeg_raises_in_the_decode_worker():
    good = gpu_table._make_jpegs(0, 2)
    assert gpu_table._decode_chunk(good) == 2
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError: not swallowed, not counted
        gpu_table._decode_chunk([good[0], good[1][:100]])


def test_generated_jpegs_are_imagenet_like_and_reproducible():
    import io

    from PIL import Image

    a, b = gpu_table._make_jpegs(40, 12), gpu_table._make_jpegs(40, 12)
    assert a == b
    sizes = [Image.open(io.BytesIO(j)).size for j in a]
    assert all(300 <= min(s) and max(s) < 560 for s in sizes)
    assert [Image.open(io.BytesIO(j)).mode for j in a].count("L") == 1  # number 49
    assert 50_000 < sum(map(len, a)) / len(a) < 200_000


def test_the_nvjpeg_rows_run_the_pipelines_batched_decode_and_count_bad_images():
    """The GPU rows' decode is ``data.decode_jpegs`` + the eval preset on tensors; run here
    with torchvision's CPU decoder, the same code: a truncated JPEG is counted, not fatal."""
    import torch

    jpegs = gpu_table._make_jpegs(0, 4)
    jpegs[2] = jpegs[2][:len(jpegs[2]) // 2]
    raws = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    ok = gpu_table.nvjpeg_decodable(raws, 3, "cpu")
    assert ok == [0, 1, 3]
    out = gpu_table.nvjpeg_preset([raws[i] for i in ok], "cpu")
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.uint8
    with pytest.raises(RuntimeError, match="decoded none of 1"):
        gpu_table.nvjpeg_decodable([raws[2]], 3, "cpu")
