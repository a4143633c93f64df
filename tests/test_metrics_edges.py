"""Metrics, intervals and the report at the edges: 0% and 100%, one image, no image, classes
with no images. Every interval holds its value; every plot and report renders."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import metrics, nightly, regression, report


@pytest.mark.parametrize("n", range(0, 120))
def test_wilson_interval_holds_its_value_at_every_edge(n):
    for k in sorted({0, 1, n - 1, n} & set(range(1, n + 1)) | ({0} if n else set())):
        lo, hi = metrics.percent_interval(k, n)
        value = 100.0 * k / n
        assert 0.0 <= lo <= value <= hi <= 100.0, (k, n, lo, value, hi)
    if n == 0:
        assert all(math.isnan(v) for v in metrics.percent_interval(0, 0))


def test_wilson_interval_matches_the_published_formula():
    # Wilson (1927): centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2)
    # / (1 + z^2/n); 3 of 7 at 95% (z = 1.959964).
    z, k, n = 1.959964, 3, 7
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = metrics.wilson_interval(k, n)
    assert lo == pytest.approx(centre - half, abs=1e-7) and hi == pytest.approx(centre + half,
                                                                               abs=1e-7)


def _frame(labels, preds, num_classes) -> pd.DataFrame:
    """A predictions frame as jobs.predict writes it, top-k from a one-hot guess."""
    k = min(5, num_classes)
    rows = []
    for i, (y, p) in enumerate(zip(labels, preds)):
        topk = [p] + [c for c in range(num_classes) if c != p][: k - 1]
        rows.append({"key": f"k{i}", "label": y, "pred": p, "pred_name": f"c{p}",
                     "topk_index": topk, "topk_prob": [0.9] + [0.1 / k] * (k - 1),
                     "top1_correct": y == p, "top5_correct": y in topk})
    return pd.DataFrame(rows)


CLASSES = [{"index": i, "id": f"n{i:08d}", "name": f"c{i}"} for i in range(4)]
CASES = {
    # 10 images: the hand-written interval before scipy's put 100% above its upper bound here
    "all right (top-1 and top-5 100%)": ([0, 1, 2, 3] * 2 + [0, 1], [0, 1, 2, 3] * 2 + [0, 1]),
    "all wrong (top-1 0%, top-5 100%: 4 classes)": ([0, 1, 2, 3], [1, 2, 3, 0]),
    "one image": ([2], [2]),
    "classes with no images (only class 0 in the data)": ([0, 0, 0], [0, 1, 0]),
}


def _history(summary, runs=2) -> pd.DataFrame:
    rows = []
    for i in range(runs):
        rows.append({"date": pd.Timestamp("2026-11-29", tz="UTC"), "run_id": f"r{i}",
                     "top1": summary["top1"], "top1_ci95_lo": summary["top1_ci95"][0],
                     "top1_ci95_hi": summary["top1_ci95"][1], "top5": summary["top5"],
                     "top5_ci95_lo": summary["top5_ci95"][0],
                     "top5_ci95_hi": summary["top5_ci95"][1], "samples": summary["samples"],
                     "verdict": regression.NO_CHANGE if i else regression.FIRST_RUN})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_every_report_section_renders_at_the_edges(case):
    labels, preds = CASES[case]
    summary = metrics.evaluate(_frame(labels, preds, len(CLASSES)), CLASSES)
    for name in ("top1", "top5"):
        lo, hi = summary[f"{name}_ci95"]
        assert lo <= summary[name] <= hi
    summary.update(started_at="2026-11-29T00:00:00Z", model_id="m", weights_sha256="w",
                   data_manifest="d", data_manifest_sha256="s", code_version="v",
                   precision="fp32", failures=0, wall_seconds=1.0, images_per_s=1.0)
    result = nightly.SetResult("val", "", "out", summary, [], [], regression.NO_CHANGE)
    sections = report.build_sections("r1", result, _history(summary),
                                     regression.RegressionRule(), (summary, "r0"))
    page = report.render_html("t", sections)
    md = report.render_markdown("t", sections)
    assert page.count("data:image/png;base64,") >= 3 and "## Worst classes" in md
    print(metrics.format_table(summary))


def test_an_empty_prediction_set_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="no labelled predictions"):
        metrics.evaluate(_frame([], [], 4).reindex(columns=["label", "top1_correct"]), CLASSES)


def test_history_plot_draws_a_run_with_no_interval():
    h = pd.DataFrame({"run_id": ["a", "b"], "top1": [100.0, np.nan],
                      "top1_ci95_lo": [80.0, np.nan], "top1_ci95_hi": [100.0, np.nan],
                      "top5": [100.0, 100.0], "top5_ci95_lo": [90.0, 90.0],
                      "top5_ci95_hi": [100.0, 100.0], "verdict": ["first run", "x"]})
    assert report.plot_history(h)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_terminal_table_says_when_top5_holds_every_class():
    labels, preds = CASES["all wrong (top-1 0%, top-5 100%: 4 classes)"]
    summary = metrics.evaluate(_frame(labels, preds, len(CLASSES)), CLASSES)
    assert "4 classes: every image's top-5 holds every class" in \
        metrics.format_table(dict(summary, classes=CLASSES))
    many = [{"index": i, "id": f"n{i:08d}", "name": f"c{i}"} for i in range(6)]
    summary = metrics.evaluate(_frame(labels, preds, len(many)), many)
    assert "every class" not in metrics.format_table(dict(summary, classes=many))
