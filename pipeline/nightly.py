"""Nightly evaluation over a suite of sets: predict each set, compare, record, check, report.
The suite and the run live here; the statistics (McNemar, verdicts, exit codes, the regression
rule) in ``pipeline.regression``; the history rows in ``pipeline.history``.

Layout under a history folder (local or a URI):

    HISTORY/history/<run_id>--<set>.parquet  one row per set per run (``pipeline.history``)
    HISTORY/runs/<run_id>/<set>/     a normal prediction folder (jobs.predict --out layout) per set
    HISTORY/runs/<run_id>/           nightly.json, report.md and report.html for the whole run
    HISTORY/latest.html              a copy of the newest report

Each set of a run is compared with that set's previous run (its last history row over the same
data) and, when one is pinned, with a baseline run, image by image (``regression``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import pandas as pd
import pyarrow as pa

from pipeline import metrics, storage
from pipeline.errors import USER_ERRORS, UsageError
from pipeline.history import (HISTORY_SCHEMA, append_history, check_baseline, history_row,
                              read_history, references)
from pipeline.regression import (FAILED, FIDELITY, NOT_COMPARABLE, Comparison, RegressionRule,
                                 comparability_problem, compare_correctness, comparison_dicts,
                                 describe, exit_code, worst)


class SuiteError(UsageError):
    """A --data / --real-labels / --weights argument that names no set, a set twice, or a file
    that is not there (exit 2, before anything starts)."""


def new_run_id() -> str:
    """A sortable, unique run id (``publish.new_run_id``: one format for every job)."""
    from pipeline import publish

    return publish.new_run_id()


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


def check_inputs(sets: list[EvalSet], weights: str, published_file: str = "") -> list:
    """The files a run names, checked before anything starts (``jobs.nightly_eval`` exits 2):
    every set's manifest exists, ``weights`` is DEFAULT, IMAGENET1K_V1, none or an existing
    file, every ``--real-labels`` file loads, and so does ``published_file`` (``--published``,
    '' for none). Returns the published figures to check (``published.BUILTIN`` and the
    file's); SuiteError naming the flag and the path."""
    from pipeline import predict, published

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
    try:
        return published.BUILTIN + (published.load_table(published_file) if published_file
                                    else [])
    except USER_ERRORS as e:
        raise SuiteError(str(e).splitlines()[0]) from None


# --- comparing a set's run with the history -----------------------------------------------

def load_correctness(predictions_dir: str) -> pd.Series:
    """Per-image top-1 correctness of a published prediction folder, indexed by key."""
    df = metrics.read_predictions(predictions_dir, columns=["key", "label", "top1_correct"])
    df = df[df["label"] >= 0]  # unlabelled images have no correctness to compare
    return df.set_index("key")["top1_correct"].astype(bool)


def compare_with(role: str, ref: dict, current_meta: dict, current: pd.Series,
                 rule: RegressionRule) -> Comparison:
    """Compare this run with one history row, refusing runs over different data."""
    problem = comparability_problem(current_meta, ref)
    if problem:
        return Comparison(role, ref["run_id"], NOT_COMPARABLE, reason=problem)
    return compare_correctness(load_correctness(ref["predictions_dir"]), current, rule, role,
                               ref["run_id"])


def read_summary(predictions_dir: str) -> dict:
    """A prediction folder's summary.json as a dict (``run_prediction``'s summary), read whether or
    not the folder holds _SUCCESS. FileNotFoundError when it is missing, InputError for bad JSON."""
    return storage.read_json(storage.join(predictions_dir, "summary.json"))


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


# --- the whole nightly run ---------------------------------------------------------------------

@dataclass(frozen=True)
class SetResult:
    """One set of a nightly run: its name and dataset kind, the prediction folder, the prediction
    summary (summary.json; None when the set failed), the comparisons, the fidelity checks
    (``published.Fidelity``), the set's verdict, for a failed set the error, and why a
    published figure did not apply (``published.NotApplicable``)."""
    name: str
    kind: str
    run_dir: str
    summary: dict | None
    comparisons: list[Comparison]
    fidelity: list
    verdict: str
    error: str = ""
    notes: list = field(default_factory=list)  # lines for the terminal and the report
    not_applicable: list = field(default_factory=list)


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
                rule: RegressionRule = RegressionRule(), latest: bool = True, top_n: int = 10,
                config: dict | None = None, predict_options=None,
                published_table: list | None = None) -> NightlyResult:
    """Predict each set into HISTORY/runs/<run_id>/<set>, compare, record, check, report.

    ``data``: a manifest path (one set, named after the file) or a list of ``EvalSet``.
    ``predict_options`` (a ``predict.PredictOptions``; default: its defaults) go to
    ``pipeline.predict.run_prediction`` unchanged but for each set's ``real_labels``;
    ``published_table`` (default ``published.BUILTIN``) holds the published figures checked,
    each within the measured 95% interval widened by ``rule.fidelity_tolerance`` percentage
    points; ``rule`` also says when a change is significant (``regression.RegressionRule``).
    ``config`` (the job's resolved config) is recorded in nightly.json. Raises
    ``history.BaselineNotFound`` (before predicting) and what ``run_prediction`` raises for
    resources;
    a set whose data or weights fail is recorded as failed and the others still run.
    """
    import dataclasses

    from pipeline import predict, published, shards

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
                                             dataclasses.replace(opts, real_labels=s.real_labels),
                                             label=s.name)
        except UsageError:
            raise
        except USER_ERRORS as e:  # FailedSamples too: not recorded (a bug still raises)
            results.append(SetResult(s.name, kind, out, None, [], [], FAILED,
                                     str(e).strip().splitlines()[0]))
            continue
        current = load_correctness(out)
        meta = {**summary, "run_id": run_id, "dataset": s.name}
        refs = references(old, baseline, s.name, meta)
        notes = [f"baseline run {baseline} did not evaluate set {s.name!r}: compared with its "
                 f"previous run only" for role, ref in refs if ref is None]
        comparisons = [compare_with(role, ref, meta, current, rule)
                       for role, ref in refs if ref is not None]
        checked = published.check(summary, kind, s.name, table, rule.fidelity_tolerance)
        verdict = worst([c.outcome for c in comparisons]
                        + [FIDELITY for f in checked.applied if not f.ok])
        rows.append(history_row(run_id, summary, out, comparisons, verdict, rule, s.name, kind,
                                checked.applied))
        append_history(history, rows[-1])
        results.append(SetResult(s.name, kind, out, summary, comparisons, checked.applied,
                                 verdict, notes=notes, not_applicable=checked.not_applicable))
    verdict = worst(r.verdict for r in results)
    write_run_record(run_dir, {
        "run_id": run_id, "verdict": verdict, "exit_code": exit_code(verdict),
        **asdict(rule),  # alpha, min_effect, fidelity_tolerance
        "sets": [{"name": r.name, "kind": r.kind, "predictions_dir": r.run_dir,
                  "prediction_run_id": (r.summary or {}).get("run_id"), "verdict": r.verdict,
                  "error": r.error, "notes": r.notes,
                  "comparisons": comparison_dicts(r.comparisons),
                  "fidelity": [asdict(f) for f in r.fidelity],
                  "fidelity_not_applicable": [dict(asdict(n), line=n.describe())
                                              for n in r.not_applicable]} for r in results],
        "config": config})
    # the history as this run knows it: what it read, and its own rows (no second read)
    table = pd.concat([old, pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA).to_pandas()],
                      ignore_index=True) if rows else old
    md, page = _write_reports(run_id, run_dir, table, results, verdict, rule,
                              storage.join(history, "latest.html") if latest else None, top_n)
    return NightlyResult(run_id, run_dir, results, verdict, exit_code(verdict), md, page)


def _write_reports(run_id: str, run_dir: str, table: pd.DataFrame, results: list[SetResult],
                   verdict: str, rule: RegressionRule, latest: str | None,
                   top_n: int) -> tuple[str, str]:
    """report.md and report.html of the run (and a copy of the page at ``latest``)."""
    from pipeline import report

    sections = [report.suite_section(run_id, results, verdict, rule)]
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
        sections += report.build_sections(
            run_id, r, own, rule, (prev_summary, prev.reference_run_id if prev else ""), top_n,
            prefix=f"{r.name}: " if len(results) > 1 else "")
    return report.write_report(run_dir, f"Nightly evaluation {run_id}: {verdict}", sections,
                               latest)


def format_result(result: NightlyResult, rule: RegressionRule) -> str:
    """The terminal summary: per set its metrics, comparisons and fidelity checks, then the
    verdict and where the outputs are."""
    lines = []
    for r in result.sets:
        lines.append(f"== set {r.name}" + (f" ({r.kind})" if r.kind else "") + f": {r.verdict}")
        if r.summary is None:
            lines.append(f"failed: {r.error}")
            continue
        lines.append(metrics.format_table(r.summary))
        lines += [describe(c, rule) for c in r.comparisons] or [
            "no earlier run to compare with"]
        lines += [f.describe() for f in r.fidelity]
        lines += [n.describe() for n in r.not_applicable] + r.notes
    lines += [f"run {result.run_id}",
              f"verdict: {result.verdict} (exit {result.exit_code}); significance rule: "
              f"{rule.describe()}",
              f"predictions: {result.run_dir}/<set>/, report: {result.report_html}"]
    return "\n".join(lines)
