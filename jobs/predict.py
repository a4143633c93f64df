"""Batch inference over a shard manifest: per-image predictions to Parquet, published once."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import deadline, metrics, predict, tracking


@dataclass(frozen=True)
class PredictConfig(predict.PredictOptions):
    """Predict every image of a shard manifest with ResNet-18 (or --model) on a Ray Data actor
    pool and write OUT/predictions/*.parquet (one row per image, class names included),
    OUT/failures.parquet,
    OUT/summary.json (top-1/top-5 with 95% intervals, per-class accuracy, confusions, ECE and run
    metadata) and OUT/_SUCCESS. A rerun replaces the published set; a crash leaves it intact.
    Exits 1 when more samples fail to decode than --max-failed-fraction allows."""
    data: str = _cli.option("", "shard manifest (OUT/val.json from jobs.shard)", required=True)
    weights: str = _cli.option("DEFAULT", "DEFAULT, a member of --model's weights enum "
                                          "(IMAGENET1K_V1, ...), none, or a file (state_dict "
                                          "or model.pt from jobs.finetune)")
    out: str = _cli.option("", "output folder (local or s3://...)", required=True)
    mlflow_uri: str = _cli.option("", tracking.URI_HELP, recorded=False)
    deadline: str = _cli.deadline_option("0")


def run(cfg: PredictConfig) -> dict:
    return predict.run_prediction(cfg.data, cfg.weights, cfg.out, predict.PredictOptions.of(cfg))


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(PredictConfig, argv, "predict")
    budget = deadline.parse_duration("--deadline", cfg.deadline)
    predict.check_inputs(cfg.data, cfg.weights, predict.PredictOptions.of(cfg))  # before Ray
    with deadline.job_deadline(budget):  # DeadlineExceeded: exit 6
        _cli.setup_logging()
        _cli.init_ray()
        summary = run(cfg)  # FailedSamples: reported by reports_errors, exit 1
    print(metrics.format_table(summary))
    print(f"{summary['images_per_s']:.1f} images/s overall ({summary['precision']}); "
          f"predictions: {cfg.out}/predictions/, summary: {cfg.out}/summary.json")
    print(summary.busy_text())
    track(summary, cfg.out, tracking.uri_of(cfg.mlflow_uri))
    return 0


TRACKING_EXPERIMENT = "resnet-pipeline predict"


def track(summary, out: str, uri: str) -> None:
    """Log a published run's summary figures to MLflow (nothing when ``uri`` is ''): a run
    named after its run id in TRACKING_EXPERIMENT, the model, weights and data as tags."""
    t = tracking.Tracker.start(uri, TRACKING_EXPERIMENT, summary.run_id,
                               tags={"job": "jobs.predict", "out": out, "arch": summary.arch,
                                     "model_id": summary.model_id,
                                     "weights_sha256": summary.weights_sha256,
                                     "data_manifest": summary.data_manifest,
                                     "precision": summary.precision})
    t.metrics({**tracking.summary_figures(summary),
               **{k: summary.get(k) for k in ("steady_images_per_s", "startup_seconds",
                                              "predictor_busy_share", "wall_seconds")}})
    t.end(True)


if __name__ == "__main__":
    sys.exit(main())
