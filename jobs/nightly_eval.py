"""Nightly evaluation: predict, append to the history table, alarm on a significant regression."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from jobs import _cli
from jobs.predict import CPUS_PER_ACTOR_HELP, THREADS_HELP
from pipeline import nightly, predict


@dataclass(frozen=True)
class NightlyConfig:
    """Predict every image of --data with --weights into HISTORY/runs/<run_id>/ (a normal
    jobs.predict output folder), append one row to HISTORY/history.parquet, compare per-image
    top-1 correctness with the previous run and with the pinned --baseline run (McNemar's exact
    test on the discordant pairs), and write report.md and a self-contained report.html into the
    run folder. A change is significant only if p < --alpha AND the top-1 change exceeds
    --min-effect percentage points. Exit codes: 0 nothing regressed (also the first run),
    1 the run failed (e.g. more decode failures than --max-failed-fraction), 2 bad arguments
    (e.g. an unknown --baseline), 3 significant top-1 regression, 4 not comparable: the
    previous or baseline run used a different data manifest (sha256 differs). A regression
    (3) outranks a refused comparison (4)."""
    data: str = _cli.option("", "shard manifest to evaluate on (val.json from jobs.shard)",
                            required=True)
    weights: str = _cli.option("", "model to evaluate: DEFAULT, IMAGENET1K_V1, none, or a file "
                                   "(model.pt from jobs.finetune, or a state_dict)",
                               required=True)
    history: str = _cli.option("", "history folder (local or s3://...): history.parquet, "
                                   "runs/<run_id>/, latest.html", required=True)
    baseline: str = _cli.option("", "run id (from history.parquet) to compare with as well as "
                                    "the previous run; empty: previous run only")
    alpha: float = _cli.option(0.01, "significance level: a change needs McNemar exact p below "
                                     "this")
    min_effect: float = _cli.option(0.5, "a change also needs |top-1 change| above this many "
                                         "percentage points")
    top_n: int = _cli.option(10, "classes and confused pairs listed in the report")
    latest: bool = _cli.option(True, "also copy the report to HISTORY/latest.html")
    batch_size: int = _cli.option(64, "images per model call")
    precision: str = _cli.option("auto", "auto: bf16 where oneDNN/CUDA support it, fp16 on "
                                         "GPUs without bf16, else fp32",
                                 choices=["auto", "fp32", "bf16", "fp16"])
    use_gpu: bool = _cli.option(False, "one GPU per predictor actor")
    actors: int = _cli.option(1, "predictor actors (on a GPU cluster: the number of GPUs)")
    cpus_per_actor: float = _cli.option(0.0, CPUS_PER_ACTOR_HELP)
    threads: int = _cli.option(0, THREADS_HELP)
    decode_concurrency: int = _cli.option(0, "decode tasks at once (0: Ray Data decides)")
    max_failed_fraction: float = _cli.option(0.0, "exit 1 when more than this fraction of "
                                                  "samples fail to decode")
    progress: bool = _cli.option(False, "show a progress bar (off: cron logs stay readable)")


def run(cfg: NightlyConfig) -> nightly.NightlyResult:
    return nightly.run_nightly(
        cfg.data, cfg.weights, cfg.history, baseline=cfg.baseline, alpha=cfg.alpha,
        min_effect=cfg.min_effect, latest=cfg.latest, top_n=cfg.top_n, config=_cli.to_dict(cfg),
        predict_options={"batch_size": cfg.batch_size, "precision": cfg.precision,
                         "use_gpu": cfg.use_gpu, "actors": cfg.actors,
                         "cpus_per_actor": cfg.cpus_per_actor, "threads": cfg.threads,
                         "decode_concurrency": cfg.decode_concurrency or None,
                         "max_failed_fraction": cfg.max_failed_fraction,
                         "progress": cfg.progress})


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(NightlyConfig, argv, "nightly_eval")
    if not 0 < cfg.alpha <= 1 or cfg.min_effect < 0:
        print("error: --alpha must be in (0, 1] and --min-effect >= 0", file=sys.stderr)
        return nightly.EXIT_USAGE
    _cli.setup_logging()
    _cli.init_ray()
    try:
        result = run(cfg)
    except nightly.BaselineNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return nightly.EXIT_USAGE
    except predict.FailedSamples as e:  # published, but not recorded in the history
        print(f"error: {e}", file=sys.stderr)
        return nightly.EXIT_FAILED
    print(nightly.format_result(result, cfg.alpha, cfg.min_effect))
    for c in result.comparisons:
        if c.outcome == nightly.NOT_COMPARABLE:
            print(f"error: refusing to compare with {c.role} run {c.reference_run_id}: "
                  f"{c.reason}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
