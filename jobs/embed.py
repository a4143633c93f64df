"""Per-image embeddings over a shard manifest: the input of any backbone's head (ResNet-18's
pooled 512-d feature), for any labelled data, to Parquet, published once (jobs.predict's code
and contract, no head)."""

from __future__ import annotations

import dataclasses
import sys

from jobs import _cli
from pipeline import deadline, predict
from pipeline.predictor import Rows

# the options of jobs.predict that an embedding pass has (their help text is predict's own)
_SHARED = ("model", "batch_size", "precision", "use_gpu", "actors", "cpus_per_actor", "threads",
           "decode_concurrency", "decode_device", "decode_in", "resize_size", "crop_size",
           "embedding_dtype", "max_failed_fraction", "verify_checksums", "progress", "max_wait")

EmbedConfig = dataclasses.make_dataclass(
    "EmbedConfig",
    [("data", "str", _cli.option("", "shard manifest (OUT/<split>.json from jobs.shard)",
                                 required=True)),
     ("weights", "str", _cli.option("DEFAULT", "the backbone: DEFAULT, a member of --model's "
                                               "weights enum, none, or "
                                               "a file (state_dict or model.pt); its head is "
                                               "not used, so its classes need not be the "
                                               "data's")),
     ("out", "str", _cli.option("", "output folder (local or s3://...)", required=True)),
     ("deadline", "str", _cli.deadline_option("0"))]
    + [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
       for f in dataclasses.fields(predict.PredictOptions) if f.name in _SHARED],
    frozen=True)
EmbedConfig.__doc__ = (
    "Write each image's embedding (the input of the model's head: ResNet-18's pooled 512-d "
    "feature before fc, ResNet-50's 2048-d, ConvNeXt-T's 768-d; raw, not L2-normalised) with "
    "its label: OUT/predictions/*.parquet (key, label, class_id, embedding as "
    "fixed_size_list<float16>[D]), OUT/failures.parquet, OUT/summary.json "
    "(counts, weights sha256, preset, precision) and OUT/_SUCCESS, published once as "
    "jobs.predict publishes. The input of jobs.probe.")


def options(cfg) -> predict.PredictOptions:
    """The prediction options an EmbedConfig sets (predict's defaults for the rest)."""
    return predict.PredictOptions(**{n: getattr(cfg, n) for n in _SHARED})


def run(cfg) -> dict:
    return predict.run_prediction(cfg.data, cfg.weights, cfg.out, options(cfg),
                                  rows=Rows.EMBEDDINGS)


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(EmbedConfig, argv, "embed")
    budget = deadline.parse_duration("--deadline", cfg.deadline)
    predict.check_inputs(cfg.data, cfg.weights, options(cfg), Rows.EMBEDDINGS)  # before Ray
    with deadline.job_deadline(budget):  # DeadlineExceeded: exit 6
        _cli.setup_logging()
        _cli.init_ray()
        summary = run(cfg)  # FailedSamples: reported by reports_errors, exit 1
    print(f"{summary['samples']} embeddings ({summary['embedding']['dtype']}, "
          f"{summary['embedding']['dim']}-d), {summary['failures']} failed; "
          f"{summary['images_per_s']:.1f} images/s ({summary['precision']}); "
          f"embeddings: {cfg.out}/predictions/, summary: {cfg.out}/summary.json")
    print(summary.busy_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
