"""Accuracy from prediction Parquet: top-1/top-5 with 95% intervals, per-class accuracy, the
most confused pairs and calibration (expected calibration error)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.errors import InputError


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials, as fractions in [0, 1].

    scipy's ``binomtest(k, n).proportion_ci(method="wilson")``, clamped so that
    ``lo <= k / n <= hi`` holds exactly in floating point (at k = 0 and k = n too: the plots'
    error bars are ``value - lo`` and ``hi - value``). ``n == 0`` gives (nan, nan): no estimate.
    Source: Wilson (1927), "Probable inference, the law of succession, and statistical
    inference", JASA 22(158).
    """
    if n == 0:
        return (float("nan"), float("nan"))
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    p = k / n
    return (min(max(0.0, float(ci.low)), p), max(min(1.0, float(ci.high)), p))


def percent_interval(k: int, n: int) -> list[float]:
    """The 95% Wilson interval in percent, with ``lo <= 100 * k / n <= hi`` exactly."""
    value = 100.0 * k / n if n else float("nan")
    lo, hi = (100.0 * v for v in wilson_interval(k, n))
    return [min(lo, value), max(hi, value)] if n else [lo, hi]


def read_predictions(out: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The published predictions of a prediction folder (refuses an unpublished one)."""
    if not storage.exists(storage.join(out, "_SUCCESS")):
        raise FileNotFoundError(f"{out} has no _SUCCESS marker: no complete prediction run "
                                f"was published there")
    import pyarrow.dataset as pads

    fs, p = storage.resolve(storage.join(out, "predictions"))
    return pads.dataset(p, filesystem=fs, format="parquet").to_table(columns=columns).to_pandas()


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = 15) -> tuple[float, list[dict]]:
    """ECE with equal-width confidence bins, and the per-bin table for a reliability diagram."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece, n = [], 0.0, len(confidence)
    for b in range(bins):
        mask = idx == b
        if mask.any():
            conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
            ece += mask.sum() / n * abs(acc - conf)
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]),
                          "count": int(mask.sum()), "confidence": conf, "accuracy": acc})
    return float(ece), table


def evaluate(df: pd.DataFrame, classes: list[dict], top_pairs: int = 10) -> dict:
    """Metrics over the labelled rows of a predictions frame (percentages for accuracies)."""
    df = df[df["label"] >= 0]
    n = len(df)
    if n == 0:
        raise InputError("no labelled predictions to evaluate")
    top1 = df["top1_correct"].astype(bool).to_numpy()
    top5 = df["top5_correct"].astype(bool).to_numpy()
    names = {c["index"]: c["name"] for c in classes}
    ids = {c["index"]: c["id"] for c in classes}
    conf = np.array([p[0] for p in df["topk_prob"]], dtype=np.float64)
    ece, bins = expected_calibration_error(conf, top1)
    per_class = (df.assign(c=top1).groupby("label")["c"].agg(["mean", "size"]).reset_index())
    wrong = df[~top1].groupby(["label", "pred"]).size().sort_values(ascending=False)
    pct = lambda k: 100.0 * k / n  # noqa: E731
    return {
        "samples": n,
        "top1": pct(top1.sum()), "top5": pct(top5.sum()),
        "top1_ci95": percent_interval(int(top1.sum()), n),
        "top5_ci95": percent_interval(int(top5.sum()), n),
        "ece": ece, "reliability": bins,
        "per_class": [{"index": int(r.label), "id": ids.get(int(r.label)),
                       "name": names.get(int(r.label)), "samples": int(r.size),
                       "top1": 100.0 * float(r.mean)} for r in per_class.itertuples()],
        "confused_pairs": [{"label": int(a), "label_name": names.get(int(a)), "pred": int(b),
                            "pred_name": names.get(int(b)), "count": int(c)}
                           for (a, b), c in wrong.head(top_pairs).items()],
    }


REAL_KEY = re.compile(r"(?:^|/)ILSVRC2012_val_(\d{8})$")


def real_accuracy(df: pd.DataFrame, classes: list[dict], real: list[list[int]]) -> dict:
    """ImageNet-ReaL top-1/top-5 (Beyer et al. 2020, "Are we done with ImageNet?").

    ``df``: prediction rows (``key``, ``topk_index`` in the class space of ``classes``);
    ``real``: entry i lists the right sorted-wnid indices for ``ILSVRC2012_val_{i+1:08d}``.
    Rows are matched by key (``ILSVRC2012_val_NNNNNNNN``, the file stem); an image counts as
    right when its prediction (any of its top 5) is one of its labels, compared by wnid. Images
    whose list is empty, and keys that are no val image, are left out of these figures only.
    Returns ``real_top1``/``real_top5`` (percent, None when nothing is scored), their 95% Wilson
    intervals and ``real_samples``. InputError when ``classes`` are not ImageNet wnids or a key's
    number lies past the end of ``real``."""
    from pipeline import sources

    position = {w: i for i, w in enumerate(sources.imagenet_wnids())}
    ids = [c["id"] for c in classes]
    if not set(ids) <= position.keys():
        raise InputError(f"ReaL labels are ImageNet classes, but the model's classes are not "
                         f"ImageNet wnids (e.g. {[i for i in ids if i not in position][:3]})")
    to_real = np.array([position[i] for i in ids], dtype=np.int64)
    top1 = top5 = n = 0
    for key, topk in zip(df["key"], df["topk_index"]):
        m = REAL_KEY.search(str(key))
        if not m:
            continue
        number = int(m.group(1))
        if not 1 <= number <= len(real):
            raise InputError(f"image {key}: ReaL labels hold {len(real)} entries, not "
                             f"{number}")
        right = set(real[number - 1])
        if not right:
            continue
        guesses = [int(to_real[i]) for i in list(topk)[:5] if i >= 0]
        n += 1
        top1 += bool(guesses) and guesses[0] in right
        top5 += any(g in right for g in guesses)
    pct = (lambda k: 100.0 * k / n) if n else (lambda k: None)  # noqa: E731
    return {"real_samples": n, "real_top1": pct(top1), "real_top5": pct(top5),
            "real_top1_ci95": percent_interval(top1, n),
            "real_top5_ci95": percent_interval(top5, n)}


REAL_LABELS_BUILTIN = "builtin"


def load_real_labels(spec: str) -> list[list[int]]:
    """ImageNet-ReaL labels: entry i lists the sorted-wnid class indices that are right for
    ``ILSVRC2012_val_{i+1:08d}`` (possibly none). ``spec`` is ``builtin`` (the 50,000 lists of
    google-research/reassessed-imagenet's real.json, Beyer et al. 2020, "Are we done with
    ImageNet?", Apache-2.0, shipped in pipeline/reference/) or a path or URI to such a JSON file.
    InputError naming the file when it is not a list of lists of ints in 0..999."""
    import json
    from importlib import resources

    if spec == REAL_LABELS_BUILTIN:
        text = resources.files("pipeline").joinpath("reference",
                                                    "imagenet_real_labels.json").read_text()
    else:
        text = storage.read_text(spec)
    try:
        labels = json.loads(text)
    except ValueError as e:
        raise InputError(f"--real-labels {spec}: not JSON ({e})") from None
    if not isinstance(labels, list) or not all(
            isinstance(row, list) and all(isinstance(v, int) and 0 <= v < 1000 for v in row)
            for row in labels):
        raise InputError(f"--real-labels {spec}: expected a JSON list of lists of class indices "
                         f"0..999 (entry i for ILSVRC2012_val_{{i+1:08d}})")
    return labels


def _few_classes(summary: dict) -> str:
    """The note for a top-5 line over 5 classes or fewer (every class is in every top-5)."""
    n = len(summary.get("classes") or [])
    return f"  [{n} classes: every image's top-5 holds every class]" if 0 < n <= 5 else ""


def format_table(summary: dict, worst: int = 5) -> str:
    """A short text table of a summary for the terminal."""
    lines = [f"{'samples':<22}{summary['samples']}",
             f"{'decode failures':<22}{summary.get('failures', 0)}",
             f"{'top-1 %':<22}{summary['top1']:.3f}  (95% CI {summary['top1_ci95'][0]:.2f}"
             f"-{summary['top1_ci95'][1]:.2f})",
             f"{'top-5 %':<22}{summary['top5']:.3f}  (95% CI {summary['top5_ci95'][0]:.2f}"
             f"-{summary['top5_ci95'][1]:.2f})" + _few_classes(summary),
             f"{'ECE':<22}{summary['ece']:.4f}"]
    if summary.get("real_samples") == 0:
        lines.append(f"{'ReaL':<22}no image has ReaL labels (keys ILSVRC2012_val_NNNNNNNN "
                     f"with a non-empty list): nothing scored")
    elif "real_samples" in summary:
        lines.append(f"{'ReaL top-1 / top-5 %':<22}{summary['real_top1']:.3f} / "
                     f"{summary['real_top5']:.3f}  ({summary['real_samples']} images with labels)")
    worst_classes = sorted(summary["per_class"], key=lambda c: c["top1"])[:worst]
    if worst_classes:
        lines.append("worst classes: " + ", ".join(f"{c['name']} {c['top1']:.1f}%"
                                                   for c in worst_classes))
    if summary["confused_pairs"]:
        p = summary["confused_pairs"][0]
        lines.append(f"most confused: {p['label_name']} -> {p['pred_name']} ({p['count']}x)")
    return "\n".join(lines)
