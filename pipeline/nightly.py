"""Nightly evaluation: predict, record the run in a history table, test for regressions.

Layout under a history folder (local or a URI):

    HISTORY/history.parquet          one row per run (HISTORY_SCHEMA), rewritten atomically
    HISTORY/runs/<run_id>/           a normal prediction folder (jobs.predict --out layout)
                                     plus nightly.json, report.md and report.html
    HISTORY/latest.html              a copy of the newest report

A run is compared with the previous run (the last history row) and, when one is pinned, with a
baseline run. The comparison is paired: per-image top-1 correctness joined on the image key,
tested with McNemar's exact test (a two-sided binomial test on the discordant pairs). A change
counts as significant only when p < alpha AND the top-1 change exceeds ``min_effect``
percentage points: with ImageNet's 50,000 images tiny drops reach significance, and with a
handful of images large drops do not, so either condition alone would mislead.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import binomtest

from pipeline import metrics, storage

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REGRESSION, EXIT_NOT_COMPARABLE = 0, 1, 2, 3, 4

FIRST_RUN = "first run"
NO_CHANGE = "no significant change"
IMPROVEMENT = "significant improvement"
REGRESSION = "significant regression"
NOT_COMPARABLE = "not comparable"
# The overall verdict is the most severe outcome of the comparisons. A measured regression
# outranks a refused comparison: it is the alarm the nightly job exists to raise.
SEVERITY = [FIRST_RUN, NO_CHANGE, IMPROVEMENT, NOT_COMPARABLE, REGRESSION]
EXIT_CODES = {FIRST_RUN: EXIT_OK, NO_CHANGE: EXIT_OK, IMPROVEMENT: EXIT_OK,
              NOT_COMPARABLE: EXIT_NOT_COMPARABLE, REGRESSION: EXIT_REGRESSION}

HISTORY_SCHEMA = pa.schema([
    ("date", pa.timestamp("ms", tz="UTC")),  # Parquet has no seconds unit
    ("run_id", pa.string()),
    ("model_id", pa.string()),
    ("weights_sha256", pa.string()),
    ("data_manifest", pa.string()),
    ("data_manifest_sha256", pa.string()),
    ("code_version", pa.string()),
    ("samples", pa.int64()),
    ("failures", pa.int64()),
    ("top1", pa.float64()),
    ("top1_ci95_lo", pa.float64()),
    ("top1_ci95_hi", pa.float64()),
    ("top5", pa.float64()),
    ("top5_ci95_lo", pa.float64()),
    ("top5_ci95_hi", pa.float64()),
    ("precision", pa.string()),
    ("wall_seconds", pa.float64()),
    ("images_per_s", pa.float64()),
    ("predictions_dir", pa.string()),
    ("previous_run_id", pa.string()),
    ("top1_delta_vs_previous", pa.float64()),
    ("p_vs_previous", pa.float64()),
    ("baseline_run_id", pa.string()),
    ("top1_delta_vs_baseline", pa.float64()),
    ("p_vs_baseline", pa.float64()),
    ("alpha", pa.float64()),
    ("min_effect", pa.float64()),
    ("verdict", pa.string()),
])


class BaselineNotFound(ValueError):
    """--baseline names a run id that the history table does not hold."""


@dataclass(frozen=True)
class Comparison:
    """This run against one reference run. Percentages are over the paired images only."""
    role: str                      # "previous" or "baseline"
    reference_run_id: str
    outcome: str                   # NO_CHANGE, IMPROVEMENT, REGRESSION or NOT_COMPARABLE
    paired: int = 0
    reference_top1: float = float("nan")
    top1: float = float("nan")
    delta_pp: float = float("nan")  # this run minus the reference, percentage points
    lost: int = 0                  # b: right in the reference, wrong now
    gained: int = 0                # c: wrong in the reference, right now
    p_value: float = float("nan")
    reason: str = ""               # why a comparison was refused


def new_run_id() -> str:
    """A sortable, unique run id (``publish.new_run_id``: one format for every job)."""
    from pipeline import publish

    return publish.new_run_id()


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b against b + c at p = 1/2."""
    if lost + gained == 0:
        return 1.0  # no discordant pair: no evidence of any change
    return float(binomtest(lost, lost + gained, 0.5, alternative="two-sided").pvalue)


def classify(p_value: float, delta_pp: float, alpha: float, min_effect: float) -> str:
    """Significant only when p < alpha AND |top-1 change| > min_effect percentage points."""
    if p_value < alpha and abs(delta_pp) > min_effect:
        return REGRESSION if delta_pp < 0 else IMPROVEMENT
    return NO_CHANGE


def compare_correctness(reference: pd.Series, current: pd.Series, alpha: float,
                        min_effect: float, role: str = "previous",
                        reference_run_id: str = "") -> Comparison:
    """Paired comparison of two boolean top-1 correctness series indexed by image key."""
    both = pd.concat([reference.rename("ref"), current.rename("cur")], axis=1,
                     join="inner").astype(bool)
    n = len(both)
    if n == 0:
        return Comparison(role, reference_run_id, NOT_COMPARABLE,
                          reason="the two runs share no image key")
    lost = int((both["ref"] & ~both["cur"]).sum())
    gained = int((~both["ref"] & both["cur"]).sum())
    ref_top1, cur_top1 = 100.0 * both["ref"].mean(), 100.0 * both["cur"].mean()
    p = mcnemar_exact(lost, gained)
    delta = cur_top1 - ref_top1
    return Comparison(role, reference_run_id, classify(p, delta, alpha, min_effect), n,
                      ref_top1, cur_top1, delta, lost, gained, p)


def comparability_problem(current: dict, reference: dict) -> str:
    """Why two runs cannot be compared image by image ('' when they can)."""
    if current["data_manifest_sha256"] == reference["data_manifest_sha256"]:
        return ""
    return (f"different data manifests: this run {current['run_id']} used "
            f"{current['data_manifest']} (sha256 {current['data_manifest_sha256']}), "
            f"run {reference['run_id']} used {reference['data_manifest']} "
            f"(sha256 {reference['data_manifest_sha256']}). A paired per-image test needs the "
            f"same images; pin a --baseline run over this manifest, or evaluate on the old one")


def overall_verdict(comparisons: list[Comparison]) -> str:
    """The most severe outcome; FIRST_RUN when there was nothing to compare with."""
    return max((c.outcome for c in comparisons), key=SEVERITY.index, default=FIRST_RUN)


def exit_code(verdict: str) -> int:
    """The process exit status for an overall verdict (EXIT_CODES: 0 for a first run, no change or
    an improvement, 3 for a regression, 4 when not comparable); KeyError for an unknown verdict."""
    return EXIT_CODES[verdict]


# --- the history table -------------------------------------------------------------------------

def history_path(history: str) -> str:
    """Where the history table lives: ``HISTORY/history.parquet`` (a local path or a URI)."""
    return storage.join(history, "history.parquet")


def read_history(history: str) -> pd.DataFrame:
    """The history table (empty, with the schema's columns, before the first run)."""
    path = history_path(history)
    if not storage.exists(path):
        return HISTORY_SCHEMA.empty_table().to_pandas()
    return pq.read_table(io.BytesIO(storage.read_bytes(path))).to_pandas()


def append_history(history: str, row: dict) -> pd.DataFrame:
    """Append one row and rewrite the table atomically; return the whole new table."""
    path = history_path(history)
    new = pa.Table.from_pylist([row], schema=HISTORY_SCHEMA)
    if storage.exists(path):
        old = pq.read_table(io.BytesIO(storage.read_bytes(path)))
        # "default" promotion keeps tables written before a column was added readable
        new = pa.concat_tables([old, new], promote_options="default")
    buf = pa.BufferOutputStream()
    pq.write_table(new, buf)
    storage.write_bytes_atomic(path, buf.getvalue().to_pybytes())
    return new.to_pandas()


def history_row(run_id: str, summary: dict, predictions_dir: str,
                comparisons: list[Comparison], verdict: str, alpha: float,
                min_effect: float) -> dict:
    """One history row from a run's summary.json and its comparisons."""
    by_role = {c.role: c for c in comparisons}
    prev, base = by_role.get("previous"), by_role.get("baseline")
    date = pd.Timestamp(summary["started_at"]).to_pydatetime()
    return {
        "date": date, "run_id": run_id, "model_id": summary["model_id"],
        "weights_sha256": summary["weights_sha256"],
        "data_manifest": summary["data_manifest"],
        "data_manifest_sha256": summary["data_manifest_sha256"],
        "code_version": summary["code_version"], "samples": summary["samples"],
        "failures": summary["failures"], "top1": summary["top1"],
        "top1_ci95_lo": summary["top1_ci95"][0], "top1_ci95_hi": summary["top1_ci95"][1],
        "top5": summary["top5"],
        "top5_ci95_lo": summary["top5_ci95"][0], "top5_ci95_hi": summary["top5_ci95"][1],
        "precision": summary["precision"], "wall_seconds": summary["wall_seconds"],
        "images_per_s": summary["images_per_s"], "predictions_dir": predictions_dir,
        "previous_run_id": prev.reference_run_id if prev else None,
        "top1_delta_vs_previous": _finite(prev.delta_pp) if prev else None,
        "p_vs_previous": _finite(prev.p_value) if prev else None,
        "baseline_run_id": base.reference_run_id if base else None,
        "top1_delta_vs_baseline": _finite(base.delta_pp) if base else None,
        "p_vs_baseline": _finite(base.p_value) if base else None,
        "alpha": alpha, "min_effect": min_effect, "verdict": verdict,
    }


def _finite(x: float) -> float | None:
    return None if x != x else x  # NaN (a refused comparison) is stored as null


def references(history: pd.DataFrame, baseline: str) -> list[tuple[str, dict]]:
    """(role, history row) of the previous run and the pinned baseline, if any."""
    refs = []
    if len(history):
        refs.append(("previous", history.iloc[-1].to_dict()))
    if baseline:
        rows = history[history["run_id"] == baseline]
        if rows.empty:
            known = ", ".join(history["run_id"].tail(5)) or "none yet"
            raise BaselineNotFound(f"--baseline {baseline} is not in the history table "
                                   f"(latest run ids: {known})")
        refs.append(("baseline", rows.iloc[-1].to_dict()))
    return refs


def load_correctness(predictions_dir: str) -> pd.Series:
    """Per-image top-1 correctness of a published prediction folder, indexed by key."""
    df = metrics.read_predictions(predictions_dir, columns=["key", "label", "top1_correct"])
    df = df[df["label"] >= 0]  # unlabelled images have no correctness to compare
    return df.set_index("key")["top1_correct"].astype(bool)


def compare_with(role: str, ref: dict, current_meta: dict, current: pd.Series, alpha: float,
                 min_effect: float) -> Comparison:
    """Compare this run with one history row, refusing runs over different data."""
    problem = comparability_problem(current_meta, ref)
    if problem:
        return Comparison(role, ref["run_id"], NOT_COMPARABLE, reason=problem)
    return compare_correctness(load_correctness(ref["predictions_dir"]), current, alpha,
                               min_effect, role, ref["run_id"])


def read_summary(predictions_dir: str) -> dict:
    """A prediction folder's summary.json as a dict (``run_prediction``'s summary), read whether or
    not the folder holds _SUCCESS. FileNotFoundError when it is missing, ValueError for bad JSON."""
    return json.loads(storage.read_text(storage.join(predictions_dir, "summary.json")))


def write_run_record(run_dir: str, record: dict) -> None:
    """nightly.json: the resolved config, the comparisons and the verdict, next to the run."""
    storage.write_text_atomic(storage.join(run_dir, "nightly.json"),
                              json.dumps(record, indent=1, default=str))


def comparison_dicts(comparisons: list[Comparison]) -> list[dict]:
    """The comparisons as plain dicts (``dataclasses.asdict``; NaN where a figure was not measured),
    for nightly.json and the report."""
    return [asdict(c) for c in comparisons]


def describe(c: Comparison, alpha: float, min_effect: float) -> str:
    """One line per comparison for the terminal."""
    if c.outcome == NOT_COMPARABLE:
        return f"vs {c.role} run {c.reference_run_id}: NOT COMPARABLE: {c.reason}"
    return (f"vs {c.role} run {c.reference_run_id}: top-1 {c.reference_top1:.2f}% -> "
            f"{c.top1:.2f}% ({c.delta_pp:+.2f} pp over {c.paired} paired images; "
            f"lost {c.lost}, gained {c.gained}; McNemar exact p={c.p_value:.3g}): "
            f"{c.outcome} (rule: p < {alpha:g} and |change| > {min_effect:g} pp)")


# --- the whole nightly run ---------------------------------------------------------------------

@dataclass(frozen=True)
class NightlyResult:
    """What ``run_nightly`` returns: the run id and folder, the prediction summary (summary.json),
    the comparisons, the overall verdict and its exit code, and the paths of report.md and
    report.html."""
    run_id: str
    run_dir: str
    summary: dict
    comparisons: list[Comparison]
    verdict: str
    exit_code: int
    report_md: str
    report_html: str


def run_nightly(manifest: str, weights: str, history: str, *, baseline: str = "",
                alpha: float = 0.01, min_effect: float = 0.5, latest: bool = True,
                top_n: int = 10, config: dict | None = None,
                predict_options=None) -> NightlyResult:
    """Predict into HISTORY/runs/<run_id>, compare, append to the history table, report.

    ``predict_options`` (a ``predict.PredictOptions``; default: its defaults) go to
    ``pipeline.predict.run_prediction`` unchanged; ``config`` (the job's resolved config) is
    recorded in the run's nightly.json.
    """
    from pipeline import predict

    refs = references(read_history(history), baseline)  # a bad --baseline fails before predicting
    run_id = new_run_id()
    run_dir = storage.join(history, "runs", run_id)
    summary = predict.run_prediction(manifest, weights, run_dir, predict_options)
    current = load_correctness(run_dir)
    meta = {**summary, "run_id": run_id}  # summary["run_id"] is the prediction's own id
    comparisons = [compare_with(role, ref, meta, current, alpha, min_effect) for role, ref in refs]
    verdict = overall_verdict(comparisons)
    table = append_history(history, history_row(run_id, summary, run_dir, comparisons, verdict,
                                                alpha, min_effect))
    write_run_record(run_dir, {"run_id": run_id, "prediction_run_id": summary["run_id"],
                               "verdict": verdict, "exit_code": exit_code(verdict),
                               "alpha": alpha, "min_effect": min_effect,
                               "comparisons": comparison_dicts(comparisons), "config": config})
    md, page = _write_reports(run_id, run_dir, history, summary, table, comparisons, verdict,
                              alpha, min_effect, latest, top_n)
    return NightlyResult(run_id, run_dir, summary, comparisons, verdict, exit_code(verdict),
                         md, page)


def _write_reports(run_id, run_dir, history, summary, table, comparisons, verdict, alpha,
                   min_effect, latest, top_n) -> tuple[str, str]:
    from pipeline import report

    # per-class changes only mean something against a comparable previous run
    prev = next((c for c in comparisons if c.role == "previous"
                 and c.outcome != NOT_COMPARABLE), None)
    prev_summary = None
    if prev is not None:
        prev_dir = table.loc[table["run_id"] == prev.reference_run_id, "predictions_dir"].iloc[-1]
        prev_summary = read_summary(prev_dir)
    sections = report.build_sections(run_id, summary, table, comparison_dicts(comparisons),
                                     verdict, alpha, min_effect, prev_summary,
                                     prev.reference_run_id if prev else "", top_n)
    return report.write_report(run_dir, f"Nightly evaluation {run_id}: {verdict}", sections,
                               storage.join(history, "latest.html") if latest else None)


def format_result(result: NightlyResult, alpha: float, min_effect: float) -> str:
    """The terminal summary: metrics, each comparison, the verdict and where the outputs are."""
    lines = [metrics.format_table(result.summary), f"run {result.run_id}"]
    lines += [describe(c, alpha, min_effect) for c in result.comparisons] or [
        "no earlier run to compare with"]
    lines += [f"verdict: {result.verdict} (exit {result.exit_code}); significance rule: "
              f"McNemar exact p < alpha={alpha:g} AND |top-1 change| > min-effect="
              f"{min_effect:g} pp",
              f"predictions: {result.run_dir}, report: {result.report_html}"]
    return "\n".join(lines)
