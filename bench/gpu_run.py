"""The prepared GPU run: the real jobs, through a local Ray cluster, on one GPU machine.

    python -m bench.gpu_run OUTDIR [--quick] [--images N] [--write-docs]
    bench/gpu_run.sh OUTDIR [...]       # the same on a node without Ray: installs the bundle

Generates ImageNet-like JPEGs (~500x375, ~110 KB, as the benchmark's) with every core, shards
them once as val and once as train, starts a local Ray cluster (this machine's CPUs and GPUs)
and runs the jobs as a user runs them, each as its own `python -m jobs.NAME` process joining
that cluster, with their default flags where they fit:

  a. jobs.predict over the val shards (the predictor actor gets the GPU when there is one);
  b. the same with --decode-device cuda (on a GPU only: it needs --use-gpu), decoding in the
     tasks and then inside the predictor actor (--decode-in actor);
  c. jobs.finetune --use-gpu --num-workers 1, 2 epochs at crop 224 (--quick: 32), from random
     init (no weights can be downloaded there);
  d. jobs.nightly_eval over the val shards, twice (exit 0, then exit 0: same weights, no change);
  e. jobs.benchmark --device cuda (the model alone, the Predictor, nvJPEG vs PIL on all cores,
     one training step, GPU bf16 vs CPU fp32 agreement), without Ray; on a GPU only;
  f. jobs.classify on a few of the JPEGs with c.'s model.pt.

Each step's exit code, wall time and figures (from the job's own summary.json, history.json or
JSON) go into OUTDIR/gpu_run.json; one Markdown table is printed; --write-docs puts it, with the
machine, date and command, into docs/BENCHMARKS.md between its gpu-run markers. A step that
fails is recorded and the next one still runs; the run exits 1 if any step failed. --quick (a
few hundred images, crop 32 for training) is what the CPU test suite runs: the same steps,
without a GPU, on whatever Ray cluster the machine can start.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "BENCHMARKS.md")
DOCS_MARKER = "gpu-run"
NUM_CLASSES = 10
# One job's limit: on the GPU machine the whole run is sized for ~6 of a command's 10 minutes,
# so a step that hangs must not take them all; on a 2-core CPU (--quick) a step took up to 125 s.
STEP_TIMEOUT_S = {False: 240, True: 540}


def _write_chunk(args) -> int:
    """Worker: JPEGs number first .. first + count - 1 into ROOT/class<i % C>/img<i>.jpg, drawn
    as synthetic.generate_photo_folder draws them (sizes 400-560 x 300-420, a quarter portrait,
    every 50th grayscale, quality 90), seeded by ``first``."""
    import numpy as np

    from pipeline import synthetic

    root, first, count = args
    rng = np.random.default_rng(first)
    for i in range(first, first + count):
        d = os.path.join(root, f"class{i % NUM_CLASSES:02d}")
        os.makedirs(d, exist_ok=True)
        w, h = int(rng.integers(400, 560)), int(rng.integers(300, 420))
        if rng.random() < 0.25:
            w, h = h, w
        mode = "L" if i % 50 == 49 else "RGB"
        synthetic.photo_like(rng, w, h, mode).save(os.path.join(d, f"img{i:06d}.jpg"),
                                                   quality=90)
    return count


def generate(root: str, n: int, cores: int) -> float:
    """``n`` JPEGs into ``root`` with ``cores`` processes; returns the seconds it took."""
    t0 = time.monotonic()
    chunk = max(1, min(256, n // (4 * cores) or 1))
    jobs = [(root, first, min(chunk, n - first)) for first in range(0, n, chunk)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=cores, mp_context=ctx) as pool:
        written = sum(pool.map(_write_chunk, jobs))
    if written != n:
        raise RuntimeError(f"generated {written} of {n} images")
    return time.monotonic() - t0


# The steps that need CUDA: left out on a machine without it (the CPU rehearsal), and said so.
CUDA_STEPS = ("predict-decode-cuda", "predict-decode-cuda-actor", "benchmark-cuda")


def step_commands(out: str, images: str, n: int, gpus: int, quick: bool,
                  write_docs: bool = False) -> list[tuple[str, list[str]]]:
    """The run's steps in order, as (name, ``python -m`` arguments): shard val and train, the
    predictions (the actor on the GPU where there is one, and then with --decode-device cuda),
    fine-tuning, the nightly twice, the benchmark's --device cuda table (with ``write_docs``
    into docs/BENCHMARKS.md; on a GPU only) and classify. Every job that can use a GPU
    gets --use-gpu when ``gpus``: without it a job leaves the GPU idle (a warning, not an
    error)."""
    shards_dir = os.path.join(out, "shards")
    val, train = (os.path.join(shards_dir, f"{s}.json") for s in ("val", "train"))
    per_shard = str(max(16, n // 32))
    gpu_flags = ["--use-gpu"] if gpus else []
    cmds = [(f"shard-{split}", ["jobs.shard", "--source", images, "--split", split, "--out",
                                shards_dir, "--samples-per-shard", per_shard, "--no-progress",
                                *(["--classes-from", val] if split == "train" else [])])
            for split in ("val", "train")]
    # --decode-device cuda needs --use-gpu (the decode tasks share the actors' GPUs)
    # and the two places nvJPEG can run, to be measured against each other (issue 25 item 4):
    # batched in the decode tasks, or inside the predictor actor (raw bytes in)
    decode_cuda = [("predict-decode-cuda", ["--decode-device", "cuda"]),
                   ("predict-decode-cuda-actor", ["--decode-device", "cuda", "--decode-in",
                                                  "actor"])] if gpus else []
    for name, extra in (("predict", []), *decode_cuda):
        cmds.append((name, ["jobs.predict", "--data", val, "--weights", "none", "--out",
                            os.path.join(out, name), "--no-progress", *gpu_flags, *extra]))
    runs = os.path.join(out, "runs")
    cmds.append(("finetune", ["jobs.finetune", "--train", train, "--val", val, "--weights",
                              "none", "--epochs", "2", "--num-workers", "1", *gpu_flags,
                              "--crop-size", str(32 if quick else 224), "--storage-path", runs,
                              "--name", "gpu-run"]))
    model = os.path.join(runs, "gpu-run", "model.pt")
    cmds += [(f"nightly-{k}", ["jobs.nightly_eval", "--data", val, "--weights", model,
                               "--history", os.path.join(out, "nightly"), "--no-progress",
                               *gpu_flags]) for k in (1, 2)]
    if gpus:  # the benchmark's --device cuda table needs CUDA
        cmds.append(("benchmark-cuda", ["jobs.benchmark", "--device", "cuda", "--json",
                                        os.path.join(out, "benchmark_cuda.json"),
                                        *(["--quick"] if quick else []),
                                        *(["--write-docs"] if write_docs else [])]))
    sample = [os.path.join(images, "class00", f"img{i:06d}.jpg")
              for i in range(0, 4 * NUM_CLASSES, NUM_CLASSES)]  # the generator's names
    cmds.append(("classify", ["jobs.classify", *sample, "--weights", model, "--json"]))
    return cmds


class Steps:
    """Runs the jobs as subprocesses on the cluster at ``address``; records each."""

    def __init__(self, out: str, address: str, timeout: float):
        self.out, self.address, self.timeout, self.records = out, address, timeout, []
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def run(self, name: str, argv: list[str], expect: int = 0) -> dict:
        """``python -m argv...`` with RAY_ADDRESS set; its record (exit code, wall, log)."""
        env = {**os.environ, "RAY_ADDRESS": self.address, "PYTHONUNBUFFERED": "1",
               "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        log = os.path.join(self.logs, f"{name}.log")
        cmd = [sys.executable, "-m", *argv]
        print(f"[{name}] {' '.join(shlex.quote(a) for a in cmd[1:])}", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=self.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        rec = {"step": name, "command": " ".join(shlex.quote(a) for a in cmd[2:]),
               "exit": rc, "expected_exit": expect, "ok": rc == expect,
               "wall_s": round(time.monotonic() - t0, 1), "log": log}
        if not rec["ok"]:
            with open(log, errors="replace") as f:
                rec["tail"] = f.read()[-2000:]
            print(f"[{name}] exit {rc} (expected {expect}); last lines:\n{rec['tail']}",
                  flush=True)
        self.records.append(rec)
        return rec


def _json(path: str) -> dict | list | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _predict_figures(out: str) -> dict:
    s = _json(os.path.join(out, "summary.json")) or {}
    keys = ("samples", "images_per_s", "steady_images_per_s", "startup_seconds",
            "wall_seconds", "precision", "failures", "use_gpu", "predictor_busy_share")
    return {k: s.get(k) for k in keys}


def _finetune_figures(run_dir: str) -> dict:
    hist = _json(os.path.join(run_dir, "history.json")) or []
    keys = ("epoch", "train_images", "train_images_per_s", "train_steady_images_per_s",
            "train_first_step_seconds", "train_seconds", "val_top1", "precision",
            "train_data_wait_share")
    return {"epochs": [{k: h.get(k) for k in keys} for h in hist]}


def run(args) -> dict:
    import ray
    import torch

    from pipeline import machine

    out = os.path.abspath(args.outdir)
    os.makedirs(out, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    gpus = torch.cuda.device_count()
    n = args.images or (192 if args.quick else 20_000)
    crop = 32 if args.quick else 224
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime(
                  "%Y-%m-%d %H:%M UTC"),
              "command": "python -m bench.gpu_run " + " ".join(map(shlex.quote, args.argv)),
              "quick": args.quick, "images": n, "train_crop": crop, "cores": cores,
              "gpus": gpus, "gpu": torch.cuda.get_device_name(0) if gpus else None,
              "torch": torch.__version__, "ray": ray.__version__,
              "machine": machine.summary(), "steps": []}
    images = os.path.join(out, "images")
    result["generate_s"] = round(generate(images, n, cores), 1)
    print(f"generated {n} JPEGs in {result['generate_s']} s on {cores} cores", flush=True)

    ray.init(num_cpus=cores, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        steps = Steps(out, ray.get_runtime_context().gcs_address, STEP_TIMEOUT_S[args.quick])
        for name, argv in step_commands(out, images, n, gpus, args.quick, args.write_docs):
            rec = steps.run(name, argv)
            if name.startswith("predict"):
                rec.update(_predict_figures(os.path.join(out, name)))
            elif name == "finetune":
                rec.update(_finetune_figures(os.path.join(out, "runs", "gpu-run")))
            elif name.startswith("nightly"):
                with open(rec["log"], errors="replace") as f:
                    rec["verdict"] = next((ln.split("verdict:", 1)[1].split(";")[0].strip()
                                           for ln in f if ln.startswith("verdict:")), None)
            elif name == "benchmark-cuda":
                rec["figures"] = _json(os.path.join(out, "benchmark_cuda.json"))
            elif name == "classify":
                with open(rec["log"]) as f:
                    rec["lines"] = sum(1 for ln in f if ln.startswith("{"))
        result["steps"] = steps.records
    finally:
        ray.shutdown()
    result["failed"] = [r["step"] for r in result["steps"] if not r["ok"]]
    result["skipped"] = [] if gpus else list(CUDA_STEPS)
    result["goals"] = judge_goals(result)
    return result


def _fmt(v, unit="") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}"
    return f"{v}{unit}"


# The goals for the jobs on one H200 (the model alone's is the benchmark table's own):
# (key, what it says, minimum or maximum)
GOALS = (("predict_img_s", "jobs.predict steady >= 5,000 images/s (the faster decode)", ">=",
          5_000),
         ("predict_vs_ceiling", "jobs.predict steady >= 0.8x the lower of its ceilings (the model "
          "alone; decoding on this node)", ">=", 0.8),
         ("finetune_img_s", "jobs.finetune steady >= 3,000 images/s at crop 224 on one GPU", ">=",
          3_000),
         ("nightly_wall_s", "jobs.nightly_eval over the set < 60 s wall, start-up included", "<",
          60))


def judge_goals(r: dict) -> list[dict]:
    """Each goal with its figure from the run's steps (None where a step gave none) and whether
    it was met: None on a CPU (--quick sizes and no GPU say nothing of an H200) or without a
    figure."""
    steps = {s["step"]: s for s in r["steps"]}
    predicts = [s for n, s in steps.items() if n.startswith("predict")
                and s.get("steady_images_per_s")]
    best = max(predicts, key=lambda s: s["steady_images_per_s"], default=None)
    bench = (steps.get("benchmark-cuda") or {}).get("figures") or {}
    ceiling = None
    if best and bench.get("model_img_s"):
        decode = bench.get("nvjpeg_img_s") if "decode-cuda" in best["step"] \
            else bench.get("cpu_decode_img_s")
        ceiling = min(v for v in (bench["model_img_s"], decode) if v)
    epochs = (steps.get("finetune") or {}).get("epochs") or []
    nightly = steps.get("nightly-2") or {}
    values = {"predict_img_s": best["steady_images_per_s"] if best else None,
              "predict_vs_ceiling": best["steady_images_per_s"] / ceiling
              if best and ceiling else None,
              "finetune_img_s": epochs[-1].get("train_steady_images_per_s") if epochs else None,
              "nightly_wall_s": nightly.get("wall_s") if nightly.get("ok") else None}
    judged = bool(r["gpus"]) and not r["quick"]
    out = []
    for key, text, op, target in GOALS:
        v = values[key]
        met = None if v is None or not judged else (v >= target if op == ">=" else v < target)
        out.append({"key": key, "goal": text, "value": v, "met": met})
    return out


def goals_text(goals: list[dict], judged: bool) -> str:
    from bench.gpu_table import goal_lines

    judged_or_not = "" if judged else " (not judged: no GPU, or --quick)"
    return goal_lines(f"Goals for one H200{judged_or_not}", goals)


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def table(r: dict) -> str:
    """One Markdown table: a row per step, its exit, wall time and figures."""
    m = r["machine"]
    from pipeline import machine

    head = (f"GPU run {r['date']} on {r['gpu'] or 'no GPU'} ({r['gpus']} GPU), "
            f"CPU {machine.describe(m)}; torch {r['torch']}, Ray {r['ray']}; "
            f"{r['images']:,} JPEGs generated in {r['generate_s']} s; `{r['command']}`"
            f"{' (--quick: tiny sizes, not comparable)' if r['quick'] else ''}")
    rows = ["| step | exit | wall | figures |", "|---|---|---|---|"]
    for s in r["steps"]:
        fig = ""
        if s["step"].startswith("predict"):
            fig = (f"{_fmt(s.get('steady_images_per_s'), ' img/s')} steady, "
                   f"{_fmt(s.get('images_per_s'), ' img/s')} overall, start-up "
                   f"{_fmt(s.get('startup_seconds'), ' s')}, {s.get('precision')}"
                   f"{' on the GPU' if s.get('use_gpu') else ' on CPUs'}, predictor busy "
                   f"{_pct(s.get('predictor_busy_share'))}, "
                   f"{s.get('samples')} images, {s.get('failures')} failed")
        elif s["step"] == "finetune":
            fig = "; ".join(f"epoch {e['epoch'] + 1}: {_fmt(e['train_images_per_s'], ' img/s')}"
                            f" ({_fmt(e['train_steady_images_per_s'], ' img/s')} steady, first"
                            f" step {_fmt(e['train_first_step_seconds'], ' s')}, data wait "
                            f"{_pct(e.get('train_data_wait_share'))}), val top-1 "
                            f"{_fmt(e['val_top1'], '%')}, {e['precision']}"
                            for e in s.get("epochs", []))
        elif s["step"].startswith("nightly"):
            fig = f"verdict: {s.get('verdict')}"
        elif s["step"] == "benchmark-cuda" and s.get("figures"):
            g = s["figures"]
            fig = (f"model alone {_fmt(g.get('model_img_s'), ' img/s')} ({g.get('precision')})"
                   f", predictor {_fmt(g.get('predictor_img_s'), ' img/s')}, PIL on "
                   f"{g.get('cores')} cores {_fmt(g.get('cpu_decode_img_s'), ' img/s')}, nvJPEG "
                   f"{_fmt(g.get('nvjpeg_img_s'), ' img/s')}, train step "
                   f"{_fmt(g.get('train_img_s'), ' img/s')}, GPU vs CPU top-1 agreement "
                   f"{_fmt(g.get('equiv_top1_agree_pct'), '%')}")
        elif s["step"] == "classify":
            fig = f"{s.get('lines')} JSON lines"
        exit_ = s["exit"] if s["ok"] else f"**{s['exit']}** (expected {s['expected_exit']})"
        rows.append(f"| {s['step']} | {exit_} | {s['wall_s']} s | {fig} |")
    rows += [f"| {name} | skipped | | needs CUDA: not run on this machine |"
             for name in r.get("skipped", [])]
    goals = r.get("goals") or judge_goals(r)
    return "\n".join([head, "", *rows, "", goals_text(goals, bool(r["gpus"]) and not r["quick"])])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", help="working folder: images, shards, job outputs, logs/, "
                                  "gpu_run.json")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (192 images, crop 32 for training): the CPU rehearsal")
    p.add_argument("--images", type=int, default=0,
                   help="JPEGs to generate (0: 20,000, or 192 with --quick)")
    p.add_argument("--write-docs", action="store_true",
                   help="write the table into docs/BENCHMARKS.md between its gpu-run markers")
    args = p.parse_args(argv)
    args.argv = argv
    r = run(args)
    text = table(r)
    print("\n" + text)
    path = os.path.join(os.path.abspath(args.outdir), "gpu_run.json")
    with open(path, "w") as f:
        json.dump(r, f, indent=1)
    print(f"\nfigures: {path}")
    if args.write_docs:
        from pipeline import docsection

        docsection.write(DOCS, DOCS_MARKER, text)
        print(f"written into {DOCS} ({DOCS_MARKER} section)")
    if r["failed"]:
        print(f"failed steps: {', '.join(r['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
