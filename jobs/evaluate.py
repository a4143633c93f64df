"""Recompute accuracy and calibration from an existing prediction folder."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import metrics, storage


@dataclass(frozen=True)
class EvaluateConfig:
    """Read OUT/predictions/*.parquet of a published prediction run (jobs.predict) and print
    top-1/top-5 with 95% intervals, worst classes, most confused pairs and ECE; with --write,
    update OUT/summary.json with the recomputed metrics."""
    out: str = _cli.option("", "prediction folder (has _SUCCESS)", required=True)
    write: bool = _cli.option(False, "write the metrics back into OUT/summary.json")


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(EvaluateConfig, argv, "evaluate")
    summary_path = storage.join(cfg.out, "summary.json")
    old = storage.read_json(summary_path) if storage.exists(summary_path) else {}
    df = metrics.read_predictions(cfg.out)
    classes = old.get("classes") or _classes(df)
    new = metrics.evaluate(df, classes)
    new["failures"] = old.get("failures", 0)
    print(metrics.format_table(new))
    if cfg.write:
        storage.write_text_atomic(summary_path, json.dumps({**old, **new}, indent=1))
        print(f"wrote {len(new)} recomputed metrics into {summary_path} ("
              f"{'updated' if old else 'new'}; other keys kept)")
    return 0


def _classes(df) -> list[dict]:
    """Without a summary: class names from the prediction rows themselves (pred -> pred_name)."""
    names = dict(zip(df["pred"], df["pred_name"]))
    return [{"index": int(i), "id": str(i), "name": n} for i, n in names.items()]


if __name__ == "__main__":
    sys.exit(main())
