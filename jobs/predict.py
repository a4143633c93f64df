"""Batch inference over a shard manifest: per-image predictions to Parquet, published once."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import metrics, predict


CPUS_PER_ACTOR_HELP = ("CPUs each predictor actor reserves in Ray's scheduling (0: 1 with a "
                       "GPU, 0.5 on CPU, where its threads use the cores anyway)")
THREADS_HELP = ("torch threads per predictor actor on CPU (0: the cores of its node, shared "
                "among the actors there; decode tasks time-share them)")


@dataclass(frozen=True)
class PredictConfig:
    """Predict every image of a shard manifest with ResNet-18 on a Ray Data actor pool and write
    OUT/predictions/*.parquet (one row per image, class names included), OUT/failures.parquet,
    OUT/summary.json (top-1/top-5 with 95% intervals, per-class accuracy, confusions, ECE and run
    metadata) and OUT/_SUCCESS. A rerun replaces the published set; a crash leaves it intact.
    Exits 1 when more samples fail to decode than --max-failed-fraction allows."""
    data: str = _cli.option("", "shard manifest (OUT/val.json from jobs.shard)", required=True)
    weights: str = _cli.option("DEFAULT", "DEFAULT, IMAGENET1K_V1, none, or a file (state_dict "
                                          "or model.pt from jobs.finetune)")
    out: str = _cli.option("", "output folder (local or s3://...)", required=True)
    batch_size: int = _cli.option(64, "images per model call")
    precision: str = _cli.option("auto", "auto: bf16 where oneDNN/CUDA support it, fp16 on "
                                         "GPUs without bf16, else fp32", choices=["auto", "fp32", "bf16", "fp16"])
    use_gpu: bool = _cli.option(False, "one GPU per predictor actor")
    actors: int = _cli.option(1, "predictor actors (on a GPU cluster: the number of GPUs)")
    cpus_per_actor: float = _cli.option(0.0, CPUS_PER_ACTOR_HELP)
    threads: int = _cli.option(0, THREADS_HELP)
    decode_concurrency: int = _cli.option(0, "decode tasks at once (0: Ray Data decides)")
    decode_device: str = _cli.option("cpu", "cuda: decode JPEGs with nvJPEG on the GPU (near-"
                                            "identical pixels, for GPU clusters starved by JPEG "
                                            "decoding); falls back to PIL without a GPU",
                                     choices=["cpu", "cuda"])
    resize_size: int = _cli.option(0, "resize shorter side to (0: the model's preset, else 256)")
    crop_size: int = _cli.option(0, "centre crop (0: the model's preset, else 224)")
    topk: int = _cli.option(5, "top-k indices and probabilities kept per image")
    max_failed_fraction: float = _cli.option(0.0, "exit non-zero when more than this fraction "
                                                  "of samples fail to decode")
    verify_checksums: bool = _cli.option(True, "check every shard's size and sha256 against the "
                                               "manifest before predicting")
    progress: bool = _cli.option(True, "show a progress bar")


def run(cfg: PredictConfig) -> dict:
    return predict.run_prediction(
        cfg.data, cfg.weights, cfg.out, batch_size=cfg.batch_size, precision=cfg.precision,
        use_gpu=cfg.use_gpu, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor,
        decode_concurrency=cfg.decode_concurrency or None, topk=cfg.topk,
        max_failed_fraction=cfg.max_failed_fraction, resize_size=cfg.resize_size or None,
        crop_size=cfg.crop_size or None, progress=cfg.progress,
        verify_checksums=cfg.verify_checksums, decode_device=cfg.decode_device,
        threads=cfg.threads)


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(PredictConfig, argv, "predict")
    _cli.setup_logging()
    _cli.init_ray()
    summary = run(cfg)  # FailedSamples: reported by reports_errors, exit 1
    print(metrics.format_table(summary))
    print(f"{summary['images_per_s']:.1f} images/s overall ({summary['precision']}); "
          f"predictions: {cfg.out}/predictions/, summary: {cfg.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
