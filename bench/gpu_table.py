"""The ``--device cuda`` table of ``python -m jobs.benchmark``: the project's GPU paths measured
directly on one machine, without Ray.

What it measures, on generated ImageNet-like JPEGs (~500x375, ~110 KB, a few grayscale):

1. the model alone: ``pipeline.benchmark.model_alone_rate``, the CPU table's ceiling row on the
   device: ResNet-18 at 224x224 on a device-resident batch, BatchNorm folded, channels_last,
   softmax and top-5, in the predictor's precision (bf16) and fp32;
2. ``pipeline.predictor.Predictor`` (the class the Ray job runs) on pre-decoded uint8 batches,
   and its ratio to (1): what host-to-device copy, normalisation and top-k cost;
3. decoding: the project's CPU path (``data.decode_image`` + ``presets.eval_image``) in a
   process pool over every core, against nvJPEG (batched ``torchvision.io.decode_jpeg``) plus
   the same eval preset on the GPU, and how many images nvJPEG could not decode;
4. one fine-tuning step (``pipeline.train_worker.train_step`` on ``build_state``'s model and
   optimizer, jobs.finetune's recipe: bf16 autocast, SGD with nesterov);
5. equivalence: the GPU bf16 model against the CPU fp32 model (same weights), and nvJPEG +
   GPU preset inputs against PIL + ``presets.eval_image`` inputs.

It prints one Markdown table, the goals for one H200 and an estimate of the nightly
50,000-image evaluation. Ray, webdataset and pandas are never imported: it runs on a bare GPU
machine with torch, torchvision, pillow, numpy and pyarrow. ``measure(cfg, "cpu")`` (the tests)
runs it on a CPU: the GPU-only rows read "no CUDA device: not measured" and no goal is judged.
Any error in a measured path raises with its traceback: a failure here is a finding, not
something to summarise.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import io
import multiprocessing
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision
from torch import nn

from pipeline import benchmark, data, machine, model as modellib, presets
from pipeline import synthetic, train_worker
from pipeline.predictor import Predictor, PredictorSpec
from pipeline.errors import InputError

if TYPE_CHECKING:
    from bench.config import BenchmarkConfig

NOT_MEASURED = "no CUDA device: not measured"
NIGHTLY_IMAGES, NIGHTLY_NODES = 50_000, 8
CROP = presets.CROP_SIZE

# Table row names (the tests look for them in the output).
ROW_MODEL = "model alone"
ROW_PREDICTOR = "predictor"
ROW_CPU_DECODE = "decode, CPU"
ROW_NVJPEG = "decode, nvJPEG"
ROW_TRAIN = "fine-tuning step"
ROW_EQUIV_MODEL = "GPU bf16 vs CPU fp32 model"
ROW_EQUIV_DECODE = "nvJPEG vs PIL inputs"
ROWS = (ROW_MODEL, ROW_PREDICTOR, ROW_CPU_DECODE, ROW_NVJPEG, ROW_TRAIN, ROW_EQUIV_MODEL,
        ROW_EQUIV_DECODE)

# Goals for one H200: (figure key, minimum, what it says).
GOALS = (("model_img_s", 20_000, "model alone >= 20,000 images/s (bf16, channels_last)"),
         ("predictor_vs_model", 0.9, "predictor >= 0.9x model alone"),
         ("nvjpeg_img_s", 5_000, "nvJPEG decode >= 5,000 images/s"),
         ("train_img_s", 5_000, "fine-tuning step >= 5,000 images/s"))


@dataclass(frozen=True)
class Sizes:
    batch: int
    images: int
    equiv_images: int
    repeats: int
    calls: int  # model calls per timed repeat
    warmup: int  # untimed calls first: cudnn.benchmark and oneDNN pick their kernels here


def sizes_for(cfg: BenchmarkConfig) -> Sizes:
    """The sizes ``cfg``'s flags give (0: the defaults, smaller with --quick)."""
    q = cfg.quick
    return Sizes(batch=cfg.batch_size or (8 if q else 256),
                 images=cfg.images or (48 if q else 1024),
                 equiv_images=cfg.equiv_images or (16 if q else 128),
                 repeats=cfg.repeats or (2 if q else 5),
                 calls=1 if q else 10, warmup=1 if q else 5)


def best_rate(fn, images_per_call: int, sz: Sizes, device: torch.device,
              calls: int | None = None) -> float:
    """``pipeline.benchmark.best_rate`` at the sizes ``sz`` (its repeats, warm-up and calls a
    run unless ``calls`` is given)."""
    return benchmark.best_rate(fn, images_per_call, device, repeats=sz.repeats,
                               warmup=sz.warmup, calls=sz.calls if calls is None else calls)


# --- generated JPEGs and the CPU decode pool ----------------------------------------------------

def _make_jpegs(first: int, count: int) -> list[bytes]:
    """JPEGs number ``first`` .. ``first + count - 1``: ImageNet-like (sizes drawn as
    synthetic.generate_photo_folder draws them), the same for the same numbers."""
    rng = np.random.default_rng(first)
    out = []
    for i in range(count):
        w, h = int(rng.integers(400, 560)), int(rng.integers(300, 420))
        if rng.random() < 0.25:
            w, h = h, w  # some portraits
        mode = "L" if (first + i) % 50 == 49 else "RGB"  # ImageNet has some grayscale
        buf = io.BytesIO()
        synthetic.photo_like(rng, w, h, mode).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _decode_chunk(jpegs: list[bytes]) -> int:
    """The project's CPU decode, per image. Returns the count only: the pixels stay in the
    worker, so the figure is the cores' decode rate, not this pool's pipe (Ray moves the
    batches through its shared-memory object store instead)."""
    for raw in jpegs:
        img = presets.eval_image(data.decode_image(raw))
        if img.shape != (3, CROP, CROP) or img.dtype != np.uint8:
            raise RuntimeError(f"eval_image gave {img.shape} {img.dtype}")
    return len(jpegs)


def decode_pool(cores: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn, not fork: forking a process that holds a CUDA context is unsafe.
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=cores, mp_context=multiprocessing.get_context("spawn"))


def make_jpegs(pool, n: int, chunk: int = 16) -> list[bytes]:
    """``n`` JPEGs generated in the pool, which also starts its workers: their start-up then
    stays out of the decode timing."""
    firsts = range(0, n, chunk)
    counts = [min(chunk, n - s) for s in firsts]
    return [j for part in pool.map(_make_jpegs, firsts, counts) for j in part]


def cpu_decode_rate(pool, jpegs: list[bytes], cores: int, sz: Sizes) -> float:
    """Images/s of the project's PIL decode + eval preset over every core."""
    per = max(1, len(jpegs) // (4 * cores))  # several chunks per core: no core idles at the end
    chunks = [jpegs[s:s + per] for s in range(0, len(jpegs), per)]

    def run():
        done = sum(pool.map(_decode_chunk, chunks))
        if done != len(jpegs):
            raise RuntimeError(f"decoded {done} of {len(jpegs)} images")
    return best_rate(run, len(jpegs), dataclasses.replace(sz, warmup=1),
                     torch.device("cpu"), calls=1)


# --- model alone, predictor, train step --------------------------------------------------------

def model_rates(sz: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    """Row 1: ``pipeline.benchmark.model_alone_rate`` (the CPU table's ceiling row) on
    ``device``, in the predictor's precision and in fp32."""
    return {key: benchmark.model_alone_rate(device, dt, sz.batch, repeats=sz.repeats,
                                            warmup=sz.warmup, calls=sz.calls)
            for key, dt in (("model_img_s", dtype), ("model_fp32_img_s", torch.float32))}


def predictor_batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch as the Ray decode stage hands it to the predictor (see data.decode_batch)."""
    rng = np.random.default_rng(seed)
    return {"key": np.array([f"img{i:06d}" for i in range(n)], dtype=object),
            "label": rng.integers(0, 1000, n).astype(np.int64),
            "image": rng.integers(0, 256, (n, 3, CROP, CROP), dtype=np.uint8),
            "error": np.full(n, "", dtype=object),
            "shard": np.full(n, "benchmark-cuda", dtype=object)}


def predictor_rate(sz: Sizes, device: torch.device, weights: str) -> tuple[float, str]:
    """Images/s of pipeline.predictor.Predictor called on host-memory uint8 batches, and its
    precision."""
    pred = Predictor(PredictorSpec(weights, modellib.imagenet_classes(),
                                   use_gpu=device.type == "cuda"))
    batch = predictor_batch(sz.batch)
    out = pred(batch)
    if len(out["pred"]) != sz.batch or (out["pred"] < 0).any():
        raise RuntimeError(f"the predictor returned {len(out['pred'])} rows for {sz.batch} "
                           f"images, {int((out['pred'] < 0).sum())} without a prediction")
    return best_rate(lambda: pred(batch), sz.batch, sz, device), \
        modellib.precision_name(pred.dtype)


def train_rate(sz: Sizes, device: torch.device, amp_dtype: torch.dtype) -> float:
    """Images/s of ``train_worker.train_step`` on the state ``train_worker.build_state`` gives
    jobs.finetune's default recipe (random init, 1000 classes, batch ``sz.batch``, one worker)."""
    from jobs import finetune

    cfg = dataclasses.replace(
        finetune.loop_config(finetune.FinetuneConfig(train="-", val="-", weights="none",
                                                     batch_size=sz.batch)),
        classes=tuple(modellib.imagenet_classes()), num_classes=1000,
        train_samples=100 * sz.batch, world_size=1, amp_dtype=amp_dtype)
    state = train_worker.build_state(cfg, device)
    state.model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")
    images = torch.randint(0, 256, (sz.batch, 3, CROP, CROP), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (sz.batch,), device=device)
    ok = torch.ones(sz.batch, dtype=torch.bool, device=device)

    def step():
        return train_worker.train_step(state, images, labels, ok, loss_fn, amp_dtype)
    rate = best_rate(step, sz.batch, sz, device)
    loss, _ = step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"train_step gave a non-finite loss {float(loss)}")
    return rate


# --- nvJPEG and the equivalence rows (CUDA only) -------------------------------------------------

def nvjpeg_preset(raws: list[torch.Tensor], device: str = "cuda") -> torch.Tensor:
    """JPEG byte tensors -> uint8 N x 3 x 224 x 224 on the GPU, as --decode-device cuda does it:
    ``data.decode_jpegs`` (one batched nvJPEG call) and the eval preset on each GPU tensor
    (``presets.EvalTransform.on_tensor``: shorter side 256, bilinear, antialiased; centre crop
    224). For images nvJPEG decodes (``nvjpeg_decodable``). ``device`` "cpu": torchvision's
    CPU decoder, the same code (the tests)."""
    transform = presets.EvalTransform()
    return torch.stack([transform.on_tensor(im) for im in data.decode_jpegs(raws, device)])


def nvjpeg_decodable(raws: list[torch.Tensor], batch: int, device: str = "cuda") -> list[int]:
    """Indices nvJPEG decodes (``data.decode_jpegs``, batch by batch: a batch that fails is
    retried image by image there, so the images, not batches, it cannot take are counted)."""
    ok = [s + j for s in range(0, len(raws), batch)
          for j, im in enumerate(data.decode_jpegs(raws[s:s + batch], device)) if im is not None]
    if not ok:  # every image failing is a broken decoder or device, not data
        raise RuntimeError(f"nvJPEG decoded none of {len(raws)} generated JPEGs")
    return ok


def nvjpeg_rate(jpegs: list[bytes], sz: Sizes) -> tuple[float, int, list[int]]:
    """(images/s of nvJPEG + GPU preset over the decodable images, how many failed, the
    decodable indices)."""
    raws = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    ok = nvjpeg_decodable(raws, sz.batch)
    good = [raws[i] for i in ok]
    batches = [good[s:s + sz.batch] for s in range(0, len(good), sz.batch)]

    def run():
        for b in batches:
            nvjpeg_preset(b)
    rate = best_rate(run, len(good), sz, torch.device("cuda"), calls=1)
    return rate, len(jpegs) - len(ok), ok


def reference_net(weights: str) -> nn.Module:
    """The fp32 model both equivalence sides start from (random init is seeded)."""
    torch.manual_seed(0)
    net, _, replaced = modellib.build_model(modellib.load_weights(weights),
                                            modellib.imagenet_classes())
    if replaced:
        raise InputError(f"weights {weights} are not a 1000-class ImageNet model")
    return net.eval()


@torch.inference_mode()
def probs(net: nn.Module, x: torch.Tensor, device, dtype, batch: int) -> torch.Tensor:
    """fp32 softmax on the CPU of ``net`` over uint8 images, as the predictor computes them."""
    out = [net(presets.normalize(x[s:s + batch].to(device), dtype)).float().softmax(1).cpu()
           for s in range(0, len(x), batch)]
    return torch.cat(out)


def model_equivalence(net_fp32: nn.Module, pil: torch.Tensor, dtype,
                      batch: int) -> tuple[dict, nn.Module]:
    """GPU model in the predictor's precision vs the same weights in fp32 on the CPU; returns
    the figures and the GPU model (row 5b reuses it)."""
    gpu = modellib.for_inference(net_fp32, "cuda", dtype)  # as the predictor runs it
    p_gpu = probs(gpu, pil, "cuda", dtype, batch)
    p_cpu = probs(net_fp32, pil, "cpu", torch.float32, batch)
    return {"equiv_top1_agree_pct": 100.0 * float((p_gpu.argmax(1) == p_cpu.argmax(1))
                                                  .float().mean()),
            "equiv_max_prob_diff": float((p_gpu - p_cpu).abs().max()),
            # A random-init model can name one class for every image: agreement is then
            # trivially 100%, and this count says so.
            "equiv_distinct_top1": int(p_cpu.argmax(1).unique().numel()),
            "equiv_images": len(pil)}, gpu


def decode_equivalence(gpu_net: nn.Module, jpegs: list[bytes], pil: torch.Tensor, dtype,
                       batch: int) -> dict:
    """nvJPEG + GPU preset inputs vs PIL + presets.eval_image inputs, and what the same GPU
    model predicts on each."""
    raws = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    nv = torch.cat([nvjpeg_preset(raws[s:s + batch]).cpu() for s in range(0, len(raws), batch)])
    diff = (nv.int() - pil.int()).abs()
    same = probs(gpu_net, nv, "cuda", dtype, batch).argmax(1) == \
        probs(gpu_net, pil, "cuda", dtype, batch).argmax(1)
    return {"nvjpeg_max_pixel_diff": int(diff.max()),
            "nvjpeg_mean_pixel_diff": float(diff.float().mean()),
            "nvjpeg_top1_agree_pct": 100.0 * float(same.float().mean()),
            "nvjpeg_equiv_images": len(jpegs)}


# --- the run ----------------------------------------------------------------------------------

def measure(cfg: BenchmarkConfig, device: str = "cuda") -> dict:
    """Every figure, in one run on ``device`` ("cuda", or "cpu" for the tests: the GPU-only
    figures are then None)."""
    sz, device = sizes_for(cfg), torch.device(device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # fixed shapes: let cuDNN pick the fastest kernels
    dtype = modellib.resolve_precision("auto", device)  # what the predictor and training use
    cores = len(os.sched_getaffinity(0))
    r = {"device": torch.cuda.get_device_name(0) if cuda else "CPU", "cuda": cuda,
         "torch": torch.__version__, "torchvision": torchvision.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "cores": cores, "quick": cfg.quick, "batch_size": sz.batch, "images": sz.images,
         "repeats": sz.repeats, "equiv_images": sz.equiv_images, "weights": cfg.weights,
         "precision": modellib.precision_name(dtype), "machine": machine.summary()}
    with decode_pool(cores) as pool:  # CPU work first, before the GPU rows keep a core busy
        jpegs = make_jpegs(pool, sz.images)
        r["cpu_decode_img_s"] = cpu_decode_rate(pool, jpegs, cores, sz)
    r["jpeg_mean_kb"] = sum(map(len, jpegs)) / len(jpegs) / 1e3
    r.update(model_rates(sz, device, dtype))
    r["predictor_img_s"], r["predictor_precision"] = predictor_rate(sz, device, cfg.weights)
    r["predictor_vs_model"] = r["predictor_img_s"] / r["model_img_s"]
    r["train_img_s"] = train_rate(sz, device, dtype)
    gpu_keys = ("nvjpeg_img_s", "nvjpeg_failed", "equiv_top1_agree_pct", "equiv_max_prob_diff",
                "equiv_distinct_top1", "nvjpeg_max_pixel_diff", "nvjpeg_mean_pixel_diff",
                "nvjpeg_top1_agree_pct")
    r.update(dict.fromkeys(gpu_keys))
    r["not_measured"] = {} if cuda else dict.fromkeys(gpu_keys, NOT_MEASURED)
    if cuda:
        r.update(gpu_rows(cfg, sz, jpegs, dtype))
    r["goals"] = judge_goals(r)
    r["nightly"] = nightly_estimate(r) if cuda else None
    return r


def gpu_rows(cfg: BenchmarkConfig, sz: Sizes, jpegs: list[bytes], dtype) -> dict:
    """nvJPEG decode and both equivalence rows."""
    out = {}
    out["nvjpeg_img_s"], out["nvjpeg_failed"], ok = nvjpeg_rate(jpegs, sz)
    sample = [jpegs[i] for i in ok[:sz.equiv_images]]  # images both decoders take
    pil = torch.from_numpy(np.stack([presets.eval_image(data.decode_image(j)) for j in sample]))
    equiv, gpu_net = model_equivalence(reference_net(cfg.weights), pil, dtype, sz.batch)
    out.update(equiv)
    out.update(decode_equivalence(gpu_net, sample, pil, dtype, sz.batch))
    return out


def judge_goals(r: dict) -> list[dict]:
    """Each H200 goal with its figure; ``met`` is None off CUDA (a CPU says nothing of it)."""
    return [{"goal": text, "key": key, "target": target, "value": r[key],
             "met": (r[key] >= target) if r["cuda"] and r[key] is not None else None}
            for key, target, text in GOALS]


def nightly_estimate(r: dict) -> list[dict]:
    """Nightly eval time per decode path: each node runs at the slower of its predictor and its
    decoder (this machine's cores, or nvJPEG); nodes add up linearly, start-up left out. nvJPEG
    shares the GPU with the model, so its line is optimistic."""
    out = []
    for path, decode in (("CPU decode", r["cpu_decode_img_s"]), ("nvJPEG", r["nvjpeg_img_s"])):
        rate = min(r["predictor_img_s"], decode)
        out.append({"decode": path, "node_img_s": rate,
                    "bound": "decode" if decode < r["predictor_img_s"] else "compute",
                    "seconds_1_node": NIGHTLY_IMAGES / rate,
                    f"seconds_{NIGHTLY_NODES}_nodes": NIGHTLY_IMAGES / (NIGHTLY_NODES * rate)})
    return out


# --- output -----------------------------------------------------------------------------------

def _rate(v) -> str:
    return NOT_MEASURED if v is None else f"{v:,.0f} images/s"


def table(r: dict) -> str:
    b, cores, p = r["batch_size"], r["cores"], r["predictor_precision"]
    gpu = r["cuda"]
    rows = [
        (ROW_MODEL, f"ResNet-18 224x224, batch {b}, {r['precision']} weights, channels_last, "
         f"input on the device", _rate(r["model_img_s"]),
         f"fp32: {_rate(r['model_fp32_img_s'])}"),
        (ROW_PREDICTOR, f"pipeline.predictor.Predictor ({p}), uint8 batches of {b} in host memory",
         _rate(r["predictor_img_s"]), f"{r['predictor_vs_model']:.2f}x model alone"),
        (ROW_CPU_DECODE, f"data.decode_image + presets.eval_image, {cores} processes",
         _rate(r["cpu_decode_img_s"]), f"{r['images']} JPEGs, {r['jpeg_mean_kb']:.0f} KB mean"),
        (ROW_NVJPEG, "batched decode_jpeg(device=cuda) + eval preset on the GPU",
         _rate(r["nvjpeg_img_s"]),
         f"{r['nvjpeg_img_s'] / r['cpu_decode_img_s']:.1f}x CPU decode; {r['nvjpeg_failed']} "
         f"of {r['images']} not decodable" if gpu else ""),
        (ROW_TRAIN, f"train_worker.train_step, batch {b}, {r['precision']} autocast, SGD nesterov",
         _rate(r["train_img_s"]), ""),
        (ROW_EQUIV_MODEL, f"same weights, {r['equiv_images']} images",
         f"top-1 agreement {r['equiv_top1_agree_pct']:.1f}%" if gpu else NOT_MEASURED,
         f"max softmax diff {r['equiv_max_prob_diff']:.2g}, {r['equiv_distinct_top1']} distinct "
         f"top-1 classes" if gpu else ""),
        (ROW_EQUIV_DECODE, "nvJPEG + GPU preset vs PIL + presets.eval_image",
         f"max pixel diff {r['nvjpeg_max_pixel_diff']} (mean {r['nvjpeg_mean_pixel_diff']:.3f})"
         if gpu else NOT_MEASURED,
         f"top-1 agreement {r['nvjpeg_top1_agree_pct']:.1f}%" if gpu else ""),
    ]
    command = f", `{r['command']}`" if r.get("command") else ""
    lines = [f"Measured {r['date']} on {r['device']}{command}: torch {r['torch']}, torchvision "
             f"{r['torchvision']}, {cores} CPU cores, weights {r['weights']}"
             f"{' (--quick: tiny sizes, not comparable)' if r['quick'] else ''}. Written by the "
             f"harness: do not edit.",
             f"CPU: {machine.describe(r['machine'])}", "",
             "| # | measurement | what | result | compared with |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {name} | {what} | {res} | {cmp} |"
              for i, (name, what, res, cmp) in zip(("1", "2", "3a", "3b", "4", "5a", "5b"), rows)]
    if gpu and r["equiv_distinct_top1"] < max(2, r["equiv_images"] // 10):
        lines.append(f"\nNote: the model names only {r['equiv_distinct_top1']} class(es) for "
                     f"{r['equiv_images']} images, so the top-1 agreements say little; run with "
                     f"--weights DEFAULT (torchvision's file in the torch hub cache) or a "
                     f"model.pt for a telling figure.")
    return "\n".join(lines)


def goal_lines(title: str, goals: list[dict]) -> str:
    """``title:`` and a line a goal: its words (``goal``), its figure (``value``: two decimals
    under 10, else whole; "not measured" when None) and "met" or "MISSED" (``met``; nothing
    when None: not judged). This table's goals and the GPU run's."""
    lines = [f"{title}:"]
    for g in goals:
        v = g["value"]
        shown = "not measured" if v is None else f"{v:,.2f}" if abs(v) < 10 else f"{v:,.0f}"
        verdict = "" if g["met"] is None else " met" if g["met"] else " MISSED"
        lines.append(f"- {g['goal']}: {shown}{verdict}")
    return "\n".join(lines)


def goals_text(r: dict) -> str:
    return "\n" + goal_lines("Goals for one H200" + ("" if r["cuda"] else
                                                     " (not judged: no CUDA device)"), r["goals"])


def nightly_text(r: dict) -> str:
    if not r["nightly"]:
        return "Nightly 50,000-image evaluation estimate: needs a CUDA device (not estimated)."
    lines = [f"Nightly {NIGHTLY_IMAGES:,}-image evaluation estimate (each node at the slower of "
             f"its predictor and its decoder, linear in nodes, start-up left out; nvJPEG shares "
             f"the GPU with the model, so its line is optimistic):"]
    for e in r["nightly"]:
        lines.append(f"- {e['decode']}: {e['node_img_s']:,.0f} images/s per node, "
                     f"{e['seconds_1_node']:.1f} s on 1 node, "
                     f"{e[f'seconds_{NIGHTLY_NODES}_nodes']:.1f} s on {NIGHTLY_NODES} nodes, "
                     f"{e['bound']}-bound")
    return "\n".join(lines)


def report(r: dict) -> str:
    """What ``python -m jobs.benchmark --device cuda`` prints and --write-docs writes: the
    table, the goals and the nightly estimate."""
    return f"{table(r)}\n{goals_text(r)}\n\n{nightly_text(r)}"
