"""The configuration of ``python -m jobs.benchmark`` (its flags) and where its tables go: shared by
the job and by the tables it runs (bench/cpu_table.py, bench/gpu_table.py, bench/scale.py), so the
tables need not import the job that imports them."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from jobs import _cli
from pipeline import docsection
from pipeline.errors import UsageError

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "BENCHMARKS.md")
DOCS_MARKER = {"cpu": "benchmark", "cuda": "benchmark-cuda", "scale": "benchmark-scale"}
DOCS_BEGIN, DOCS_END = docsection.markers(DOCS_MARKER["cpu"])
# flag -> the one device whose table it sizes (given for the other, it would do nothing)
DEVICE_ONLY = {"train_images": "cpu", "train_crop": "cpu", "workdir": "cpu", "scale": "cpu",
               "heavier_model": "cpu",
               "equiv_images": "cuda", "repeats": "cuda", "weights": "cuda"}


@dataclass(frozen=True)
class BenchmarkConfig:
    """Measure each stage of the pipeline against its baseline and this machine's ceiling, in
    one run, on generated ImageNet-like JPEGs (~500x375, ~110 KB).

    --device cpu (the default): the jobs through a local Ray cluster. Evaluation (the
    prediction job at its defaults and in fp32, against the model alone on pre-decoded tensors
    and against an ImageFolder + DataLoader + fp32 loop), training (the Ray Train job against
    a plain single-process loop), decoding per core (the Ray Data stage against a PIL loop on
    one core), sharding (against `tar cf`, and `tar cf` plus an fsync: the same work) and
    growth (N and 4N images), then the model-alone and job rows of a heavier model
    (--heavier-model, ResNet-50) next to ResNet-18's. The run exits 1 when the job beats the
    model alone by more than 2%.

    --device cuda: the GPU paths on one GPU, without Ray: the model alone (the same row as
    the CPU table's ceiling), the Predictor on host batches, PIL decoding on every core
    against batched nvJPEG, one fine-tuning step, and GPU bf16 against CPU fp32 predictions;
    the goals for one H200 and the nightly time they imply. Needs a CUDA device.

    --scale N: instead of the CPU table, the jobs at the size they are for (bench/scale.py):
    predict, the nightly and one fine-tuning epoch over N ImageNet-size images on a Ray head
    with a 300 MB object store (5,000 images act as a 50,000-image nightly on a default one):
    the steady rate against the CPU bound, the predictor's busy share, start-up, bytes spilled
    and the growth of peak memory, each against its target.

    Each prints a table headed by the machine (CPU, instruction sets, what --precision auto
    ran); --json writes every figure; --write-docs writes the table into docs/BENCHMARKS.md."""
    device: str = _cli.option("cpu", "cpu: the jobs through Ray against their baselines; cuda: "
                                     "the GPU paths on one GPU", ["cpu", "cuda"])
    quick: bool = _cli.option(False, "small sizes (cpu: under ~3 minutes on 2 cores; cuda: a "
                                     "smoke test, not comparable)")
    images: int = _cli.option(0, "cpu: N, the sharding and decode rows run N and 4N images, "
                                 "the evaluation rows 4N and 16N (0: 160, or 64 with --quick); "
                                 "cuda: JPEGs for the decode rows (0: 1024, or 48 with "
                                 "--quick)")
    batch_size: int = _cli.option(0, "images per model call (0: 32 on the CPU; 256 with "
                                     "--device cuda, or 8 with --quick)")
    train_images: int = _cli.option(0, "cpu: images for the training runs (0: 6 batches, or 4 "
                                       "with --quick; at least 3 batches)")
    train_crop: int = _cli.option(112, "cpu: training crop size (reduced from 224 for CPU "
                                       "speed)")
    workdir: str = _cli.option("", "cpu: scratch folder, kept (empty: a temporary one, deleted)")
    heavier_model: str = _cli.option("resnet50", "cpu: a heavier torchvision model whose "
                                                 "model-alone and job rows go next to "
                                                 "ResNet-18's (empty: none; --quick leaves "
                                                 "them out)")
    scale: int = _cli.option(0, "cpu: run the scale rows over this many ImageNet-size images "
                                "instead of the table (5000: ~25 minutes on 2 cores; 0: no)")
    equiv_images: int = _cli.option(0, "cuda: images for the equivalence rows (0: 128, or 16 "
                                       "with --quick)")
    repeats: int = _cli.option(0, "cuda: timed repeats per figure, the best is kept (0: 5, or "
                                  "2 with --quick)")
    weights: str = _cli.option("none", "cuda: model weights for the predictor and equivalence "
                                       "rows: none (random init), DEFAULT, IMAGENET1K_V1 or a "
                                       "file")
    json: str = _cli.option("", "write the figures to this JSON file")
    write_docs: bool = _cli.option(False, "write the table (command, date, machine) into "
                                          "docs/BENCHMARKS.md between its markers for the "
                                          "device; refused when a ceiling check fails")


def resolve(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """``cfg`` with its batch size resolved for its device; UsageError for a flag that sizes
    the other device's table (it would do nothing) and for --device cuda without CUDA."""
    import torch

    defaults = BenchmarkConfig()
    wrong = [f"--{k.replace('_', '-')}" for k, dev in DEVICE_ONLY.items()
             if dev != cfg.device and getattr(cfg, k) != getattr(defaults, k)]
    if wrong:
        other = "cuda" if cfg.device == "cpu" else "cpu"
        raise UsageError(f"{', '.join(wrong)}: only for --device {other}'s table; it does "
                         f"nothing with --device {cfg.device}")
    if cfg.heavier_model:
        from pipeline import architectures

        architectures.check_name(cfg.heavier_model)  # a typo: one line naming the closest
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here; --device cpu measures "
                         "this machine")
    batch = cfg.batch_size or (32 if cfg.device == "cpu" else 8 if cfg.quick else 256)
    return dataclasses.replace(cfg, batch_size=batch)
