"""Nightly evaluation over a suite of sets: predict, record, test for regressions and drift.

Layout under a history folder (local or a URI):

    HISTORY/history/<run_id>--<set>.parquet  one row (HISTORY_SCHEMA) per set per run, each
                                     written once and never rewritten: two runs at once both
                                     land. Read the folder as one table (``read_history``,
                                     pandas ``read_parquet("HISTORY/history")``, DuckDB
                                     ``read_parquet('HISTORY/history/*.parquet', union_by_name=true)``)
    HISTORY/runs/<run_id>/<set>/     a normal prediction folder (jobs.predict --out layout) per set
    HISTORY/runs/<run_id>/           nightly.json, report.md and report.html for the whole run
    HISTORY/latest.html              a copy of the newest report

A history.parquet from before (one rewritten table) is moved into HISTORY/history/ on first use,
rows unchanged (``migrate_history``).

Each set of a run is compared with that set's previous run (its last history row) and, when one
is pinned, with a baseline run. The comparison is paired: per-image top-1 correctness joined on the image key,
tested with McNemar's exact test (a two-sided binomial test on the discordant pairs). A change
counts as significant only when p < alpha AND the top-1 change exceeds ``min_effect``
percentage points: with ImageNet's 50,000 images tiny drops reach significance, and with a
handful of images large drops do not, so either condition alone would mislead.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import binomtest

from pipeline import metrics, storage
from pipeline.errors import PipelineError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REGRESSION, EXIT_NOT_COMPARABLE = 0, 1, 2, 3, 4
EXIT_FIDELITY = 5

FIRST_RUN = "first run"
NO_CHANGE = "no significant change"
IMPROVEMENT = "significant improvement"
REGRESSION = "significant regression"
NOT_COMPARABLE = "not comparable"
FAILED = "failed"
FIDELITY = "pipeline fidelity failure"
# The overall verdict is the most severe outcome of the comparisons, over every set. A measured
# regression outranks a refused comparison and a set that failed: it is the alarm the nightly
# job exists to raise. A published accuracy outside the measured interval outranks everything:
# the pipeline itself is off, so no figure of the run can be trusted.
SEVERITY = [FIRST_RUN, NO_CHANGE, IMPROVEMENT, NOT_COMPARABLE, FAILED, REGRESSION, FIDELITY]
EXIT_CODES = {FIRST_RUN: EXIT_OK, NO_CHANGE: EXIT_OK, IMPROVEMENT: EXIT_OK,
              NOT_COMPARABLE: EXIT_NOT_COMPARABLE, FAILED: EXIT_FAILED,
              REGRESSION: EXIT_REGRESSION, FIDELITY: EXIT_FIDELITY}

HISTORY_SCHEMA = pa.schema([
    ("date", pa.timestamp("ms", tz="UTC")),  # Parquet has no seconds unit
    ("run_id", pa.string()),
    ("dataset", pa.string()),        # the set's NAME (--data NAME=MANIFEST)
    ("dataset_kind", pa.string()),   # imagenet-val, imagenet-v2, -r, -a, -sketch or ''
    ("scored_over", pa.string()),    # "model classes", or "data classes" for a subset set
    ("model_id", pa.string()),
    ("weights_sha256", pa.string()),
    ("data_manifest", pa.string()),
    ("data_manifest_sha256", pa.string()),
    ("data_fingerprint", pa.string()),  # shards.data_fingerprint: the data, wherever it lives
    ("code_version", pa.string()),
    ("samples", pa.int64()),
    ("failures", pa.int64()),
    ("top1", pa.float64()),
    ("top1_ci95_lo", pa.float64()),
    ("top1_ci95_hi", pa.float64()),
    ("top5", pa.float64()),
    ("top5_ci95_lo", pa.float64()),
    ("top5_ci95_hi", pa.float64()),
    ("real_samples", pa.int64()),    # ImageNet-ReaL: images with a non-empty label list
    ("real_top1", pa.float64()),
    ("real_top1_ci95_lo", pa.float64()),
    ("real_top1_ci95_hi", pa.float64()),
    ("real_top5", pa.float64()),
    ("published_top1", pa.float64()),       # the published figures checked (fidelity)
    ("published_real_top1", pa.float64()),
    ("published_source", pa.string()),
    ("fidelity", pa.string()),       # "ok", "failed", or null when no published figure applies
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


class SuiteError(ValueError):
    """A --data / --real-labels argument that names no set, or a set twice."""


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


def same_data(current: dict, reference: dict) -> bool:
    """Whether two runs scored the same data: the same ``data_fingerprint`` (the shards' sha256,
    the classes and the split, wherever the files live) where both runs recorded one, else the
    same manifest sha256 (rows written before the fingerprint existed)."""
    a, b = current.get("data_fingerprint"), reference.get("data_fingerprint")
    if a and b and isinstance(b, str):
        return a == b
    return current["data_manifest_sha256"] == reference["data_manifest_sha256"]


def comparability_problem(current: dict, reference: dict) -> str:
    """Why two runs cannot be compared image by image ('' when they can)."""
    if same_data(current, reference):
        return ""
    return (f"different data manifests: this run {current['run_id']} used "
            f"{current['data_manifest']} (sha256 {current['data_manifest_sha256']}), "
            f"run {reference['run_id']} used {reference['data_manifest']} "
            f"(sha256 {reference['data_manifest_sha256']}). A paired per-image test needs the "
            f"same images; pin a --baseline run over this manifest, or evaluate on the old one")


def overall_verdict(comparisons: list[Comparison]) -> str:
    """The most severe outcome; FIRST_RUN when there was nothing to compare with."""
    return worst([c.outcome for c in comparisons])


def worst(verdicts) -> str:
    """The most severe of ``verdicts`` (SEVERITY order); FIRST_RUN when there are none."""
    return max(verdicts, key=SEVERITY.index, default=FIRST_RUN)


def exit_code(verdict: str) -> int:
    """The process exit status for an overall verdict (EXIT_CODES: 0 for a first run, no change or
    an improvement, 1 when a set failed, 3 for a regression, 4 when not comparable, 5 for a
    pipeline fidelity failure); KeyError for an unknown verdict."""
    return EXIT_CODES[verdict]


# --- the evaluation suite ----------------------------------------------------------------------

SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class EvalSet:
    """One set of a nightly suite: its ``name`` (history rows and run folders use it),
    ``manifest`` (a shard manifest) and ``real_labels`` (``predict.PredictOptions.real_labels``
    for this set; '' for none)."""
    name: str
    manifest: str
    real_labels: str = ""


def _split_named(arg: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); a bare VALUE (a path or URI, which may hold '=' after
    its scheme or a '/') -> ('', VALUE)."""
    name, sep, value = arg.partition("=")
    if sep and SET_NAME.match(name):
        return name, value
    return "", arg


def parse_sets(data: list[str] | tuple[str, ...], real_labels=()) -> list[EvalSet]:
    """The sets of ``--data NAME=MANIFEST`` arguments (a bare MANIFEST is named after its file:
    ``shards/val.json`` -> ``val``) and ``--real-labels [NAME=]FILE`` (a bare FILE applies to the
    only set). SuiteError for no set, a name given twice, or real labels naming no set."""
    sets: dict[str, EvalSet] = {}
    for arg in data:
        name, manifest = _split_named(arg)
        if not name:
            name = storage.basename(manifest).rsplit(".", 1)[0] or "data"
            if not SET_NAME.match(name):
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("._-") or "data"
        if not manifest:
            raise SuiteError(f"--data {arg}: no manifest after {name}=")
        if name in sets:
            raise SuiteError(f"--data: two sets are named {name!r} ({sets[name].manifest} and "
                             f"{manifest}); name them: --data NAME=MANIFEST")
        sets[name] = EvalSet(name, manifest)
    if not sets:
        raise SuiteError("--data: no set to evaluate")
    for arg in real_labels:
        name, path = _split_named(arg)
        if not name:
            if len(sets) > 1:
                raise SuiteError(f"--real-labels {arg}: with {len(sets)} sets, say which: "
                                 f"--real-labels NAME=FILE (sets: {', '.join(sets)})")
            name = next(iter(sets))
        if name not in sets:
            raise SuiteError(f"--real-labels {arg}: no set named {name!r} (sets: "
                             f"{', '.join(sets)})")
        sets[name] = EvalSet(name, sets[name].manifest, path)
    return list(sets.values())


def check_inputs(sets: list[EvalSet], weights: str) -> None:
    """The files a run names, checked before anything starts (``jobs.nightly_eval`` exits 2):
    every set's manifest exists, ``weights`` is DEFAULT, IMAGENET1K_V1, none or an existing
    file, and every ``--real-labels`` file loads. SuiteError naming the flag and the path."""
    from pipeline import predict

    for s in sets:
        if not storage.exists(s.manifest):
            raise SuiteError(f"--data {s.name}={s.manifest}: no such manifest")
        if s.real_labels and s.real_labels != "builtin" and not storage.exists(s.real_labels):
            raise SuiteError(f"--real-labels {s.name}={s.real_labels}: no such file")
        if s.real_labels:
            try:
                predict.load_real_labels(s.real_labels)
            except (OSError, ValueError) as e:
                raise SuiteError(f"--real-labels {s.name}={s.real_labels}: "
                                 f"{str(e).splitlines()[0]}") from None
    if weights.upper() not in ("DEFAULT", "IMAGENET1K_V1", "NONE") and not storage.exists(weights):
        raise SuiteError(f"--weights {weights}: not DEFAULT, IMAGENET1K_V1, none, nor an "
                         f"existing file")


# --- the history: one file per set per run, never rewritten ------------------------------------

LEGACY_HISTORY = "history.parquet"  # the single rewritten table of earlier versions


def history_dir(history: str) -> str:
    """Where the history rows live: ``HISTORY/history/`` (a local path or a URI)."""
    return storage.join(history, "history")


def _table_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def migrate_history(history: str) -> bool:
    """Move an earlier version's ``HISTORY/history.parquet`` into ``HISTORY/history/`` as one file
    (``legacy-history.parquet``; each row gets ``dataset`` = its manifest's file stem, as a bare
    ``--data MANIFEST`` is named now) and rename the old file to ``history.parquet.migrated``.
    Safe to run by two jobs at once: both write the same bytes. Returns whether it migrated."""
    legacy = storage.join(history, LEGACY_HISTORY)
    if not storage.exists(legacy):
        return False
    old = pq.read_table(io.BytesIO(storage.read_bytes(legacy))).to_pandas()
    if "dataset" not in old.columns:
        old["dataset"] = [storage.basename(m).rsplit(".", 1)[0] for m in old["data_manifest"]]
    rows = old.reindex(columns=HISTORY_SCHEMA.names).to_dict("records")
    rows = [{k: (None if v is pd.NaT or (isinstance(v, float) and v != v) else v)
             for k, v in r.items()} for r in rows]
    table = pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)
    storage.write_bytes_atomic(storage.join(history_dir(history), "legacy-history.parquet"),
                               _table_bytes(table))
    try:
        storage.write_bytes_atomic(legacy + ".migrated", storage.read_bytes(legacy))
        storage.delete_file(legacy)
    except FileNotFoundError:
        pass  # another run migrated it at the same time
    return True


def read_history(history: str) -> pd.DataFrame:
    """Every history row, oldest first (by date, then run id and set name); empty, with the
    schema's columns, before the first run. Migrates a legacy history.parquet first."""
    import pyarrow.dataset as pads

    migrate_history(history)
    folder = history_dir(history)
    if not storage.exists(folder):
        return HISTORY_SCHEMA.empty_table().to_pandas()
    fs, p = storage.resolve(folder)
    # the schema is given: files written before a column was added read it as null
    table = pads.dataset(p, filesystem=fs, format="parquet", schema=HISTORY_SCHEMA).to_table()
    df = table.to_pandas()
    return df.sort_values(["date", "run_id", "dataset"], kind="stable").reset_index(drop=True)


def append_history(history: str, row: dict) -> str:
    """Record one row as its own file, ``HISTORY/history/<run_id>--<dataset>.parquet``, written
    once (no read-modify-write: concurrent runs cannot lose each other's rows). Returns the
    path. ValueError when that file exists already (a run id and set recorded twice)."""
    path = storage.join(history_dir(history), f"{row['run_id']}--{row['dataset']}.parquet")
    if storage.exists(path):
        raise ValueError(f"{path} exists: run {row['run_id']} already recorded set "
                         f"{row['dataset']}")
    storage.write_bytes_atomic(path, _table_bytes(pa.Table.from_pylist([row],
                                                                       schema=HISTORY_SCHEMA)))
    return path


def history_row(run_id: str, summary: dict, predictions_dir: str,
                comparisons: list[Comparison], verdict: str, alpha: float,
                min_effect: float, dataset: str = "", kind: str = "",
                fidelity: list | None = None) -> dict:
    """One history row from a set's summary.json, its comparisons and fidelity checks."""
    by_role = {c.role: c for c in comparisons}
    prev, base = by_role.get("previous"), by_role.get("baseline")
    date = pd.Timestamp(summary["started_at"]).to_pydatetime()
    real = summary.get("real_top1_ci95", [None, None])
    checked = {f.metric: f for f in fidelity or []}
    return {
        "date": date, "run_id": run_id, "dataset": dataset, "dataset_kind": kind,
        "scored_over": summary.get("scored_over"), "model_id": summary["model_id"],
        "weights_sha256": summary["weights_sha256"],
        "data_manifest": summary["data_manifest"],
        "data_manifest_sha256": summary["data_manifest_sha256"],
        "data_fingerprint": summary.get("data_fingerprint"),
        "code_version": summary["code_version"], "samples": summary["samples"],
        "failures": summary["failures"], "top1": summary["top1"],
        "top1_ci95_lo": summary["top1_ci95"][0], "top1_ci95_hi": summary["top1_ci95"][1],
        "top5": summary["top5"],
        "top5_ci95_lo": summary["top5_ci95"][0], "top5_ci95_hi": summary["top5_ci95"][1],
        "real_samples": summary.get("real_samples"),
        "real_top1": _finite(summary.get("real_top1")),
        "real_top1_ci95_lo": _finite(real[0]), "real_top1_ci95_hi": _finite(real[1]),
        "real_top5": _finite(summary.get("real_top5")),
        "published_top1": checked["top1"].published if "top1" in checked else None,
        "published_real_top1": (checked["real_top1"].published if "real_top1" in checked
                                else None),
        "published_source": "; ".join(dict.fromkeys(f.source for f in fidelity or [])) or None,
        "fidelity": None if not fidelity else ("ok" if all(f.ok for f in fidelity)
                                               else "failed"),
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


def _finite(x: float | None) -> float | None:
    return None if x is None or x != x else x  # NaN (a refused comparison) is stored as null


def check_baseline(history: pd.DataFrame, baseline: str) -> None:
    """BaselineNotFound when ``baseline`` is set and no history row has that run id."""
    if baseline and not (history["run_id"] == baseline).any():
        known = ", ".join(dict.fromkeys(history["run_id"].tail(10))) or "none yet"
        raise BaselineNotFound(f"--baseline {baseline} is not in the history table "
                               f"(latest run ids: {known})")


def references(history: pd.DataFrame, baseline: str, dataset: str,
               current: dict | None = None) -> list[tuple[str, dict | None]]:
    """(role, history row) of set ``dataset``'s previous run and of the pinned baseline run, if
    any (``check_baseline`` has vetted its id); the baseline's row is None when that run did not
    evaluate this set. With ``current`` (this run's summary), the previous run is the latest one
    over the same data (``same_data``), so one night on other data does not make the next night
    not comparable too; when no earlier run used this data, it is the latest run (and the
    comparison says why it cannot be made)."""
    rows = history[history["dataset"] == dataset].to_dict("records")
    refs: list[tuple[str, dict | None]] = []
    if rows:
        same = [r for r in rows if current is not None and same_data(current, r)]
        refs.append(("previous", (same or rows)[-1]))
    if baseline:
        pinned = [r for r in rows if r["run_id"] == baseline]
        refs.append(("baseline", pinned[-1] if pinned else None))
    return refs


def load_correctness(predictions_dir: str) -> pd.Series:
    """Per-image top-1 correctness of a published prediction folder, indexed by key."""
    df = metrics.read_predictions(predictions_dir, columns=["key", "label", "top1_correct"])
    df = df[df["label"] >= 0]  # unlabelled images have no correctness to compare
    return df.set_index("key")["top1_correct"].astype(bool)


def compare_with(role: str, ref: dict, current_meta: dict, current: pd.Series,
                 alpha: float, min_effect: float) -> Comparison:
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


def _strict(obj):
    """``obj`` with every NaN float as None, so that the JSON is strict (JavaScript, jq, any
    parser): a refused comparison has no p-value, not a NaN one."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_run_record(run_dir: str, record: dict) -> None:
    """nightly.json: the resolved config, the comparisons and the verdict, next to the run
    (strict JSON: no NaN)."""
    storage.write_text_atomic(storage.join(run_dir, "nightly.json"),
                              json.dumps(_strict(record), indent=1, default=str,
                                         allow_nan=False))


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
class SetResult:
    """One set of a nightly run: its name and dataset kind, the prediction folder, the prediction
    summary (summary.json; None when the set failed), the comparisons, the fidelity checks
    (``published.Fidelity``), the set's verdict and, for a failed set, the error."""
    name: str
    kind: str
    run_dir: str
    summary: dict | None
    comparisons: list[Comparison]
    fidelity: list
    verdict: str
    error: str = ""
    notes: list = field(default_factory=list)  # lines for the terminal and the report


@dataclass(frozen=True)
class NightlyResult:
    """What ``run_nightly`` returns: the run id and folder, one SetResult per set, the overall
    verdict (the worst set's) and its exit code, and the paths of report.md and report.html."""
    run_id: str
    run_dir: str
    sets: list[SetResult]
    verdict: str
    exit_code: int
    report_md: str
    report_html: str

    @property
    def summary(self) -> dict | None:
        """The first set's prediction summary (the only one for a run over one set)."""
        return self.sets[0].summary

    @property
    def comparisons(self) -> list[Comparison]:
        """Every set's comparisons, in set order."""
        return [c for s in self.sets for c in s.comparisons]


def run_nightly(data, weights: str, history: str, *, baseline: str = "",
                alpha: float = 0.01, min_effect: float = 0.5, latest: bool = True,
                top_n: int = 10, config: dict | None = None, predict_options=None,
                published_table: list | None = None,
                fidelity_tolerance: float = 0.05) -> NightlyResult:
    """Predict each set into HISTORY/runs/<run_id>/<set>, compare, record, check, report.

    ``data``: a manifest path (one set, named after the file) or a list of ``EvalSet``.
    ``predict_options`` (a ``predict.PredictOptions``; default: its defaults) go to
    ``pipeline.predict.run_prediction`` unchanged but for each set's ``real_labels``;
    ``published_table`` (default ``published.BUILTIN``) holds the published figures checked,
    each within the measured 95% interval widened by ``fidelity_tolerance`` percentage points.
    ``config`` (the job's resolved config) is recorded in nightly.json. Raises
    BaselineNotFound (before predicting) and what ``run_prediction`` raises for resources;
    a set whose data or weights fail is recorded as failed and the others still run.
    """
    import dataclasses

    from pipeline import predict, published, shards
    from pipeline.errors import UsageError

    sets = parse_sets([data]) if isinstance(data, str) else list(data)
    table = published.BUILTIN if published_table is None else published_table
    opts = predict_options or predict.PredictOptions()
    old = read_history(history)
    check_baseline(old, baseline)  # a bad --baseline fails before predicting
    manifests = {s.name: shards.load_manifest(s.manifest) for s in sets}  # fail before predicting
    run_id = new_run_id()
    run_dir = storage.join(history, "runs", run_id)
    results, rows = [], []
    for s in sets:
        out = storage.join(run_dir, s.name)
        kind = published.dataset_kind(manifests[s.name])
        try:
            summary = predict.run_prediction(s.manifest, weights, out,
                                             dataclasses.replace(opts, real_labels=s.real_labels))
        except UsageError:
            raise
        except (PipelineError, ValueError, OSError) as e:  # FailedSamples too: not recorded
            results.append(SetResult(s.name, kind, out, None, [], [], FAILED,
                                     str(e).strip().splitlines()[0]))
            continue
        current = load_correctness(out)
        meta = {**summary, "run_id": run_id, "dataset": s.name}
        refs = references(old, baseline, s.name, meta)
        notes = [f"baseline run {baseline} did not evaluate set {s.name!r}: compared with its "
                 f"previous run only" for role, ref in refs if ref is None]
        comparisons = [compare_with(role, ref, meta, current, alpha, min_effect)
                       for role, ref in refs if ref is not None]
        fidelity = published.check(summary, kind, s.name, table, fidelity_tolerance)
        verdict = worst([c.outcome for c in comparisons]
                        + [FIDELITY for f in fidelity if not f.ok])
        rows.append(history_row(run_id, summary, out, comparisons, verdict, alpha, min_effect,
                                s.name, kind, fidelity))
        append_history(history, rows[-1])
        results.append(SetResult(s.name, kind, out, summary, comparisons, fidelity, verdict,
                                 notes=notes))
    verdict = worst(r.verdict for r in results)
    write_run_record(run_dir, {
        "run_id": run_id, "verdict": verdict, "exit_code": exit_code(verdict),
        "alpha": alpha, "min_effect": min_effect, "fidelity_tolerance": fidelity_tolerance,
        "sets": [{"name": r.name, "kind": r.kind, "predictions_dir": r.run_dir,
                  "prediction_run_id": (r.summary or {}).get("run_id"), "verdict": r.verdict,
                  "error": r.error, "notes": r.notes,
                  "comparisons": comparison_dicts(r.comparisons),
                  "fidelity": [asdict(f) for f in r.fidelity]} for r in results],
        "config": config})
    # the history as this run knows it: what it read, and its own rows (no second read)
    table = pd.concat([old, pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA).to_pandas()],
                      ignore_index=True) if rows else old
    md, page = _write_reports(run_id, run_dir, history, table, results, verdict, alpha,
                              min_effect, latest, top_n)
    return NightlyResult(run_id, run_dir, results, verdict, exit_code(verdict), md, page)


def _write_reports(run_id, run_dir, history, table, results, verdict, alpha, min_effect, latest,
                   top_n) -> tuple[str, str]:
    from pipeline import report

    sections = [report.suite_section(run_id, results, verdict, alpha, min_effect)]
    for r in results:
        if r.summary is None:
            sections.append(report.Section(f"{r.name}: failed", r.error))
            continue
        # per-class changes only mean something against a comparable previous run
        prev = next((c for c in r.comparisons if c.role == "previous"
                     and c.outcome != NOT_COMPARABLE), None)
        prev_summary = None
        if prev is not None:
            rows = table[(table["run_id"] == prev.reference_run_id)
                         & (table["dataset"] == r.name)]
            prev_summary = read_summary(rows["predictions_dir"].iloc[-1])
        own = table[table["dataset"] == r.name]
        sections += report.build_sections(run_id, r.summary, own, comparison_dicts(r.comparisons),
                                          r.verdict, alpha, min_effect, prev_summary,
                                          prev.reference_run_id if prev else "", top_n,
                                          prefix=f"{r.name}: " if len(results) > 1 else "",
                                          fidelity=r.fidelity)
    return report.write_report(run_dir, f"Nightly evaluation {run_id}: {verdict}", sections,
                               storage.join(history, "latest.html") if latest else None)


def format_result(result: NightlyResult, alpha: float, min_effect: float) -> str:
    """The terminal summary: per set its metrics, comparisons and fidelity checks, then the
    verdict and where the outputs are."""
    lines = []
    for r in result.sets:
        lines.append(f"== set {r.name}" + (f" ({r.kind})" if r.kind else "") + f": {r.verdict}")
        if r.summary is None:
            lines.append(f"failed: {r.error}")
            continue
        lines.append(metrics.format_table(r.summary))
        lines += [describe(c, alpha, min_effect) for c in r.comparisons] or [
            "no earlier run to compare with"]
        lines += [f.describe() for f in r.fidelity] + r.notes
    lines += [f"run {result.run_id}",
              f"verdict: {result.verdict} (exit {result.exit_code}); significance rule: "
              f"McNemar exact p < alpha={alpha:g} AND |top-1 change| > min-effect="
              f"{min_effect:g} pp",
              f"predictions: {result.run_dir}/<set>/, report: {result.report_html}"]
    return "\n".join(lines)
