"""The decoded data in flight is bounded whatever the size of the set (issue 33): on a Ray head
whose object store holds less than the set's decoded batches, jobs.predict spills nothing, and
Ray's spill counter, read the way the scale rows read it, does count a spill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import scale

pytestmark = pytest.mark.slow


def test_predict_over_more_decoded_images_than_the_object_store_holds_spills_nothing(tmp_path):
    # 1,500 ImageNet-size images: 225 MB of decoded 224-pixel batches on a 100 MB store. Before
    # the chunked reader and the decode-task cap, the decode stage ran a whole shard ahead.
    scale.photo_folder(str(tmp_path / "img"), 1500, distinct=300)
    head = scale.Head(cpus=2, store_mb=100)
    try:
        env = head.env
        scale.run_job(["jobs.shard", "--source", str(tmp_path / "img"), "--split", "val",
                       "--out", str(tmp_path / "sh"), "--no-progress"], env,
                      str(tmp_path / "shard.log"))
        before = head.spilled()
        out = scale.run_job(["jobs.predict", "--data", str(tmp_path / "sh" / "val.json"),
                             "--weights", "none", "--out", str(tmp_path / "p"), "--no-progress",
                             "--precision", "fp32"], env, str(tmp_path / "predict.log"))
        spilled = head.spilled() - before
        summary = json.loads((tmp_path / "p" / "summary.json").read_text())
        assert summary["samples"] == 1500 and out["rc"] == 0
        assert spilled == 0, (spilled, open(tmp_path / "predict.log").read()[-3000:])
        # the counter is live: 150 MB held on the 100 MB store must spill
        probe = ("import ray, numpy as np; from pipeline import ray_compat; "
                 "ray.init(logging_level='ERROR'); "
                 "refs = [ray.put(np.ones(30 * 2**20 // 8)) for _ in range(5)]; "
                 "print(ray_compat.spilled_bytes())")
        got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        assert int(got.stdout.strip().splitlines()[-1]) - before >= 50 * 2**20, got.stdout
    finally:
        head.stop()


def test_progress_lines_reach_a_log_without_a_terminal(tmp_path):
    """The nightly's progress without a TTY: plain lines with the set name, counts, rate, ETA.
    A line every 10% however fast the machine (at most one every 20 s by default: 700 images
    took 20 s or more on one machine, less on another, which then printed none)."""
    scale.photo_folder(str(tmp_path / "img"), 700, distinct=100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RESNET_PIPELINE_PROGRESS_MIN_SECONDS"] = "0"
    subprocess.run([sys.executable, "-m", "jobs.shard", "--source", str(tmp_path / "img"),
                    "--split", "val", "--out", str(tmp_path / "sh"), "--no-progress"], env=env,
                   check=True, capture_output=True, timeout=600)
    got = subprocess.run([sys.executable, "-m", "jobs.nightly_eval", "--data",
                          f"v={tmp_path / 'sh' / 'val.json'}", "--weights", "none", "--history",
                          str(tmp_path / "h"), "--precision", "fp32"], env=env,
                         capture_output=True, text=True, timeout=900)
    lines = [ln for ln in got.stderr.splitlines() if "predict v: " in ln]
    assert got.returncode == 0, got.stderr[-3000:]
    assert lines and all(" of 700 images (" in ln and "images/s, ETA " in ln for ln in lines), (
        got.stderr[-3000:])
