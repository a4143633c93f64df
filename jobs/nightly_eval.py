"""Nightly evaluation: predict, append to the history table, alarm on a significant regression."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import nightly, predict


@dataclass(frozen=True)
class NightlyConfig(predict.PredictOptions):
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
    progress: bool = _cli.option(False, "show a progress bar (off: cron logs stay readable)")


def run(cfg: NightlyConfig) -> nightly.NightlyResult:
    return nightly.run_nightly(
        cfg.data, cfg.weights, cfg.history, baseline=cfg.baseline, alpha=cfg.alpha,
        min_effect=cfg.min_effect, latest=cfg.latest, top_n=cfg.top_n, config=_cli.to_dict(cfg),
        predict_options=predict.PredictOptions.of(cfg))


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
