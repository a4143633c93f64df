"""Nightly evaluation over a suite of sets and one or more models: predict each set with each
model, compare, record, check, report.
The suite and the run live here; the statistics (McNemar, verdicts, exit codes, the regression
rule) in ``pipeline.regression``; the history rows in ``pipeline.history``.

Layout under a history folder (local or a URI):

    HISTORY/history/<run_id>--<set>--<model>.parquet  one row per set and model per run
                                     (``pipeline.history``)
    HISTORY/runs/<run_id>/<set>/     a normal prediction folder (jobs.predict --out layout) per set
    HISTORY/runs/<run_id>/<model>/<set>/   the same, in a night of several models
    HISTORY/runs/<run_id>/           nightly.json, report.md and report.html for the whole run
    HISTORY/latest.html              a copy of the newest report

Each set of a run is compared with that set's previous run for the same model (its last history
row over the same data) and, when one is pinned, with a baseline run, image by image
(``regression``); in a night of several models each model is also compared with the first.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

import pandas as pd
import pyarrow as pa

from pipeline import deadline, metrics, publish, storage
from pipeline.errors import EXIT_OVERLAP, USER_ERRORS, PipelineError, UsageError, exit_code_of
from pipeline.history import (HISTORY_SCHEMA, SetResult, append_history, check_baseline,
                              history_row, own_rows, read_history, references, unfinished_row)
from pipeline.predictions import Summary
from pipeline.regression import (DEADLINE, DID_NOT_FINISH, FAILED, FIDELITY, IMPROVEMENT,
                                 NOT_COMPARABLE,
                                 REGRESSION, RUNNING, Comparison, RegressionRule,
                                 comparability_problem, compare_correctness, comparison_dicts,
                                 describe, exit_code, worst)


class SuiteError(UsageError):
    """A --data / --real-labels / --weights argument that names no set, a set twice, or a file
    that is not there (exit 2, before anything starts)."""


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


RESERVED = ("nightly.json", "report.md", "report.html")  # files of the run folder itself


def _check_name(flag: str, name: str) -> str:
    """``name`` when it can name a set or a model (a folder of the run and part of a history
    file's name, ``<run_id>--<set>--<model>``): SET_NAME's characters, no '--', none of the
    run folder's own files; SuiteError otherwise."""
    if not SET_NAME.match(name) or "--" in name or name in RESERVED:
        raise SuiteError(f"{flag}: {name!r} cannot name a set or model: use letters, digits, "
                         f"'_', '.' and single '-', and none of {', '.join(RESERVED)}")
    return name


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
        _check_name("--data", name)
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


@dataclass(frozen=True)
class EvalModel:
    """One model of a night: its ``name`` (the history's ``model`` column and, in a night of
    several, its run folder), its ``weights`` (``model.load_weights``'s spec) and its torchvision
    architecture ``arch`` ('': a model.pt's own, else resnet18)."""
    name: str
    weights: str
    arch: str = ""


def _runs_as(weights: str, arch: str) -> str:
    """The architecture weights ``weights`` run as: ``arch``, else a model.pt's own, else
    resnet18 (weights that do not load run as that too, and fail in the night). UsageError for a
    model.pt of another architecture than ``arch``, before any name is made from it."""
    from pipeline import architectures, model as modellib

    if weights.lower() == "none" or not storage.exists(weights):
        return arch or architectures.DEFAULT_MODEL
    try:
        return modellib.load_weights(weights, arch).arch
    except UsageError:  # a model.pt of another architecture than --model: say so first
        raise
    except USER_ERRORS:  # weights that do not load: named as they would run, fail in the night
        return arch or architectures.DEFAULT_MODEL


def parse_models(weights: list[str] | tuple[str, ...], models=()) -> list[EvalModel]:
    """The models of ``--weights [NAME=]SPEC`` and ``--model ARCH`` arguments, in order (the
    first is the one the others are compared with). One --model applies to every --weights, one
    --weights to every --model (a NAME=SPEC so spread is named NAME-ARCH for each); otherwise
    they pair in order. An unnamed model is named after the architecture it runs as (resnet18
    for DEFAULT, a model.pt's own), so its history goes on when its weights change. An existing
    file whose own name holds '=' (``lr=0.1.pt``) is a file, not NAME=SPEC. SuiteError for no
    weights, counts that do not pair, a name given twice, or one that cannot name a folder and
    a history file (``_check_name``)."""
    weights, models = list(weights), list(models)
    if not weights:
        raise SuiteError("--weights: no model to evaluate")
    spread = len(models) > 1 and len(weights) == 1  # one weights for several architectures
    if spread:
        weights = weights * len(models)
    if len(models) <= 1:
        models = (models or [""]) * len(weights)
    if len(models) != len(weights):
        raise SuiteError(f"{len(weights)} --weights and {len(models)} --model: give one "
                         f"--model for all, or one per --weights, in the same order")
    out: dict[str, EvalModel] = {}
    for arg, arch in zip(weights, models):
        name, spec = _split_named(arg)
        if name and storage.exists(arg) and not storage.exists(spec):
            name, spec = "", arg  # a file whose own name holds '=' (lr=0.1.pt)
        elif not name and "=" in arg and "/" not in arg.partition("=")[0] \
                and not storage.exists(arg):
            _check_name("--weights", arg.partition("=")[0])  # 'my model=none': say why
        if not spec:
            raise SuiteError(f"--weights {arg}: no weights after {name}=")
        if name and spread:
            name = f"{name}-{arch}"  # one NAME=SPEC for several --model: one name each
        runs_as = _runs_as(spec, arch)  # and a model.pt of another --model: exit 2, named or not
        name = _check_name("--weights", name or runs_as)
        if name in out:
            raise SuiteError(f"--weights: two models are named {name!r} ({out[name].weights} "
                             f"and {spec}); name them: --weights NAME=SPEC")
        out[name] = EvalModel(name, spec, arch)
    return list(out.values())


def check_inputs(sets: list[EvalSet], models: list[EvalModel] | str,
                 published_file: str = "", model: str = "") -> list:
    """The files a run names, checked before anything starts (``jobs.nightly_eval`` exits 2):
    every set's manifest exists, every model's weights are DEFAULT, a member of its
    architecture's weights enum (default resnet18), none or an existing file, every
    ``--real-labels`` file loads, and so does ``published_file`` (``--published``, '' for
    none). ``models``: ``EvalModel``s, or one weights spec for torchvision model ``model``.
    Returns the published figures to check (``published.BUILTIN`` and the file's);
    SuiteError naming the flag and the path."""
    from pipeline import model as modellib, published

    if isinstance(models, str):
        models = [EvalModel("", models, model)]
    for s in sets:
        if not storage.exists(s.manifest):
            raise SuiteError(f"--data {s.name}={s.manifest}: no such manifest")
        if s.real_labels and s.real_labels != "builtin" and not storage.exists(s.real_labels):
            raise SuiteError(f"--real-labels {s.name}={s.real_labels}: no such file")
        if s.real_labels:
            try:
                metrics.load_real_labels(s.real_labels)
            except (OSError, ValueError) as e:
                raise SuiteError(f"--real-labels {s.name}={s.real_labels}: "
                                 f"{str(e).splitlines()[0]}") from None
    for m in models:
        try:
            modellib.check_weights_spec(m.weights, m.arch)
        except FileNotFoundError as e:
            raise SuiteError(f"--weights {m.weights}: {str(e).split(': ', 1)[1]}") from None
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
    record: dict = field(default_factory=dict)  # nightly.json's content
    notes: list = field(default_factory=list)  # lines about the night as a whole

    @property
    def summary(self) -> dict | None:
        """The first set's prediction summary (the only one for a run over one set)."""
        return self.sets[0].summary

    @property
    def comparisons(self) -> list[Comparison]:
        """Every set's comparisons, in set order."""
        return [c for s in self.sets for c in s.comparisons]


class NightRunning(PipelineError):
    """The previous night on this history folder still holds its lease (exit 8): this night did
    not start, and wrote nothing."""
    exit_code = EXIT_OVERLAP


NIGHT_LEASE_SECONDS = 120.0  # the night's lease on HISTORY: renewed every 40 s while it lives


@dataclass(frozen=True)
class NightlyOptions:
    """How a night judges and reports its sets (``run_nightly``): the pinned ``baseline`` run
    id ('' for none), the regression ``rule``, whether to copy the report to
    HISTORY/latest.html (``latest``), the classes per report table (``top_n``), the job's
    resolved ``config`` (recorded in nightly.json), the ``predict_options`` of every set (a
    ``predict.PredictOptions``; None: its defaults) and the ``published_table`` of figures
    checked (None: ``published.BUILTIN``)."""
    baseline: str = ""
    rule: RegressionRule = RegressionRule()
    latest: bool = True
    top_n: int = 10
    config: dict | None = None
    predict_options: object = None
    published_table: list | None = None


def run_nightly(data, weights, history: str, options: NightlyOptions = NightlyOptions(),
                **overrides) -> NightlyResult:
    """Predict each set with each model into HISTORY/runs/<run_id>/<set>/ (a night of several
    models: HISTORY/runs/<run_id>/<model>/<set>/), compare, record, check, report.

    ``data``: a manifest path (one set, named after the file) or a list of ``EvalSet``.
    ``weights``: a weights spec (one model, of ``predict_options.model``'s architecture) or a
    list of ``EvalModel`` (``parse_models``), the first the one the others are compared with.
    ``options`` (``NightlyOptions``), with ``overrides`` (its field names) applied on top.
    Its ``predict_options`` (a ``predict.PredictOptions``; default: its defaults) go to
    ``pipeline.predict.run_prediction`` unchanged but for each set's ``real_labels`` and each
    model's architecture; ``published_table`` (default ``published.BUILTIN``) holds the
    published figures checked, each within the measured 95% interval widened by
    ``rule.fidelity_tolerance`` percentage points; ``rule`` also says when a change is
    significant (``regression.RegressionRule``). ``config`` (the job's resolved config) is
    recorded in nightly.json. Raises ``history.BaselineNotFound`` (before predicting) and what
    ``run_prediction`` raises for resources.

    Each model of each set is compared with its own previous run (history rows keyed by set and
    model) and the pinned baseline run; in a night of several models, each model after the first
    is also compared with the first on the same images (McNemar's exact test; shown side by
    side in the report, never part of the verdict).

    One night at a time per history folder: the run holds HISTORY's lease (``pipeline.lease``)
    from before it reads the history to its end; NightRunning (exit 8, nothing written) while
    another night holds it. A night whose driver died leaves a lease that expires (or, on the
    same machine, whose process is gone); the next night takes it over and records the dead
    night as "did not finish" (``name_unfinished``).

    Every night leaves one history row per set and model and a report, whatever the outcome: a
    set whose data or weights fail is recorded as failed and the others still run; when the
    job's deadline (``pipeline.deadline``) runs out, the set at work and those after it are
    recorded as "deadline exceeded" and the report says how far it got; an error that ends the
    night early (a resource plan refused, --max-wait) is recorded, then raised.
    """
    import dataclasses

    from pipeline import lease as leaselib, predict, published, shards

    options = dataclasses.replace(options, **overrides)
    if options.predict_options is None:
        options = dataclasses.replace(options, predict_options=predict.PredictOptions())
    if options.published_table is None:
        options = dataclasses.replace(options, published_table=published.BUILTIN)
    sets = parse_sets([data]) if isinstance(data, str) else list(data)
    models = (parse_models([weights], [options.predict_options.model])
              if isinstance(weights, str) else list(weights))
    run_id = publish.new_run_id()
    try:
        night = leaselib.Lease(history, run_id, NIGHT_LEASE_SECONDS)
        night.__enter__()
    except leaselib.LeaseHeld:
        holder = leaselib.read_holder(history)
        who = holder.describe() if holder else "another night"
        raise NightRunning(f"previous night still running: {who}. This night ({run_id}) did not "
                           f"start; nothing written") from None
    try:
        old = read_history(history)
        check_baseline(old, options.baseline)  # a bad --baseline fails before predicting
        manifests = {s.name: shards.load_manifest(s.manifest) for s in sets}
        night_notes, dead_rows = name_unfinished(history, night, run_id, options.rule, old)
        old = _with_rows(old, dead_rows)  # what was just written: no second read
        return _Night(sets, manifests, models, history, run_id, old, options,
                      night_notes).run()
    finally:
        night.__exit__(None, None, None)


def _with_rows(table: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """The history ``table`` with ``rows`` (history rows this run wrote) after it."""
    if not rows:
        return table
    return pd.concat([table, pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA).to_pandas()],
                     ignore_index=True)


def name_unfinished(history: str, night, run_id: str, rule: RegressionRule,
                    old: pd.DataFrame) -> tuple[list[str], list[dict]]:
    """When this night (``run_id``) took the history's lease over from a night whose driver
    died (``night.taken_from``): record that night as "did not finish", a history row per set
    and model it was running (unless ``old``, the history as read, holds one) and its
    nightly.json's verdict. Returns the line that says so (for the terminal and the report) and
    the rows written; ([], []) when there is none."""
    holder = night.taken_from
    if holder is None:
        return [], []
    run_dir = storage.join(history, "runs", holder.run_id)
    path = storage.join(run_dir, "nightly.json")
    try:
        record = storage.read_json(path)
    except (OSError, ValueError):
        record = None
    why = (f"its driver (pid {holder.pid} on {holder.host}) ended without finishing: "
           f"{night.taken_because}; named by run {run_id}")
    line = f"previous night {holder.run_id} did not finish: {why}"
    if record is None or record.get("verdict") != RUNNING:
        return ([line] if record is None else []), []
    mine = old[old["run_id"] == holder.run_id]
    recorded = set(zip(mine["dataset"], mine["model"].fillna("")))
    rows = [unfinished_row(holder.run_id, record["started_at"], s["name"], s.get("kind", ""),
                           s.get("manifest", ""), DID_NOT_FINISH, why, rule, s.get("model", ""))
            for s in record.get("sets", [])
            if (s["name"], s.get("model") or "") not in recorded]
    for row in rows:
        with deadline.deferred():
            append_history(history, row)
    record.update(verdict=DID_NOT_FINISH, exit_code=None, error=why)
    write_run_record(run_dir, record)
    return [line], rows


@dataclass
class _Night:
    """One night under HISTORY's lease: what ``run_nightly`` resolved, and what it runs."""
    sets: list
    manifests: dict
    models: list  # EvalModel, the first the one the others are compared with
    history: str
    run_id: str
    old: pd.DataFrame  # the history as read before this night
    options: NightlyOptions  # its predict_options and published_table resolved
    notes: list  # lines about the night as a whole (a previous night that did not finish)
    rows: list = field(default_factory=list)  # the history rows this night wrote

    @property
    def rule(self) -> RegressionRule:
        return self.options.rule

    @property
    def run_dir(self) -> str:
        return storage.join(self.history, "runs", self.run_id)

    @property
    def several(self) -> bool:
        """Whether this night evaluates several models (their folders and titles name them)."""
        return len(self.models) > 1

    def entries(self) -> list[tuple[EvalSet, EvalModel]]:
        """What the night predicts, in order: each set with each model (the first model of a
        set first, so the others are compared with it as they finish)."""
        return [(s, m) for s in self.sets for m in self.models]

    def out_dir(self, s: EvalSet, m: EvalModel) -> str:
        """The prediction folder of set ``s`` with model ``m``."""
        if self.several:
            return storage.join(self.run_dir, m.name, s.name)
        return storage.join(self.run_dir, s.name)

    def record(self, verdict: str, code, results: list, started: str, error: str = "") -> dict:
        """nightly.json's content: the night's verdict and exit code, and per set and model
        what it got."""
        done = {(r.name, r.model): r for r in results}
        return {
            "run_id": self.run_id, "started_at": started, "verdict": verdict, "exit_code": code,
            "error": error, "notes": self.notes, **asdict(self.rule),
            "models": [asdict(m) for m in self.models],
            "sets": [_set_record(s, m.name, self.manifests[s.name], done.get((s.name, m.name)))
                     for s, m in self.entries()],
            "config": self.options.config}

    def run(self) -> NightlyResult:
        started = time_now()
        write_run_record(self.run_dir, self.record(RUNNING, None, [], started))
        entries = self.entries()
        results, raised, stopped = [], None, ""
        try:
            for s, m in entries:
                if stopped:
                    results.append(self.unfinished(s, m, DEADLINE, f"not started: {stopped}"))
                    continue
                try:
                    with deadline.translated():
                        results.append(self.one_set(s, m, results))
                except deadline.DeadlineExceeded as e:
                    stopped = str(e).strip()
                    results.append(self.unfinished(s, m, DEADLINE, stopped))
        except (UsageError, deadline.ResourcesUnavailable, KeyboardInterrupt) as e:
            raised = e  # the night cannot go on: the sets not done are recorded as failed
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            results += [self.unfinished(s, m, FAILED, why) for s, m in entries[len(results):]]
        verdict = worst(r.verdict for r in results)
        code = exit_code(verdict)  # an error that ended the night early: its own code, unless
        if isinstance(raised, Exception) and verdict not in (REGRESSION, FIDELITY):  # worse
            code = exit_code_of(raised)
        # the record and the report are short writes: a deadline running out during them
        # does not leave the night without either (deferred, then dropped)
        with deadline.deferred(drop=True):
            record = self.record(verdict, code, results, started,
                                 error=str(raised or stopped).strip())
            write_run_record(self.run_dir, record)
            history_now = _with_rows(self.old, self.rows)  # no second read
            md, page = self.write_reports(history_now, results, verdict)
        if raised is not None and code == exit_code_of(raised):
            raise raised
        if raised is not None:  # a set before it regressed or failed fidelity: that code stands
            self.notes.append(f"the night stopped early: {str(raised).strip().splitlines()[0]}")
        return NightlyResult(self.run_id, self.run_dir, results, verdict, code, md, page,
                             record, self.notes)

    def prefix(self, r: SetResult) -> str:
        """The title prefix of a result's report sections: the set (and in a night of several
        models, the model); none for a night of one set and one model."""
        if self.several:
            return f"{r.name} / {r.model}: "
        return f"{r.name}: " if len(self.sets) > 1 else ""

    def write_reports(self, table: pd.DataFrame, results: list[SetResult],
                      verdict: str) -> tuple[str, str]:
        """report.md and report.html of the night (and a copy of the page at HISTORY/latest.html
        with ``options.latest``) from the history ``table`` with this night's rows in it."""
        from pipeline import report

        run_id, rule, top_n = self.run_id, self.rule, self.options.top_n
        first = self.models[0].name
        sections = [report.suite_section(run_id, results, verdict, rule, self.notes,
                                         models=self.several)]
        if self.several:
            sections += [report.models_section(s.name, [r for r in results if r.name == s.name],
                                               first, rule) for s in self.sets]
        for r in results:
            own = table[own_rows(table, r.name, r.model, r.model == first)]
            if r.summary is None:  # no metrics: why, and the set's trend with this night in it
                prefix = self.prefix(r) or f"{r.name}: "
                sections.append(report.Section(f"{prefix}{r.verdict}", r.error))
                if len(own):
                    sections.append(report.history_section(own, prefix=prefix))
                continue
            # per-class changes only mean something against a comparable previous run
            prev = next((c for c in r.comparisons if c.role == "previous"
                         and c.outcome != NOT_COMPARABLE), None)
            prev_summary = None
            if prev is not None:
                rows = own[own["run_id"] == prev.reference_run_id]
                prev_summary = Summary.read(rows["predictions_dir"].iloc[-1])
            sections += report.build_sections(
                run_id, r, own, rule, (prev_summary, prev.reference_run_id if prev else ""),
                top_n, prefix=self.prefix(r))
        latest = storage.join(self.history, "latest.html") if self.options.latest else None
        return report.write_report(self.run_dir, f"Nightly evaluation {run_id}: {verdict}",
                                   sections, latest)

    def one_set(self, s: EvalSet, m: EvalModel, done: list[SetResult]) -> SetResult:
        """Predict set ``s`` with model ``m``, compare it (with its own previous run, the
        baseline and, for a model after the first, the first model's result among ``done``),
        check it and write its history row. A set whose data or weights fail is recorded as
        failed."""
        import dataclasses

        from pipeline import predict, published

        out = self.out_dir(s, m)
        kind = published.dataset_kind(self.manifests[s.name])
        what = f"set {s.name}" + (f" with model {m.name}" if self.several else "")
        try:
            with deadline.doing(f"predicting {what}"):
                summary = predict.run_prediction(
                    s.manifest, m.weights, out,
                    dataclasses.replace(self.options.predict_options, real_labels=s.real_labels,
                                        model=m.arch),
                    label=s.name + (f"/{m.name}" if self.several else ""))
        except (UsageError, deadline.DeadlineExceeded, deadline.ResourcesUnavailable):
            raise
        except USER_ERRORS as e:  # FailedSamples too (a bug still raises)
            return self.unfinished(s, m, FAILED, str(e).strip().splitlines()[0])
        current = load_correctness(out)
        meta = {**summary, "run_id": self.run_id, "dataset": s.name}
        is_first = m is self.models[0]
        refs = references(self.old, self.options.baseline, s.name, meta, m.name, is_first)
        notes = [f"baseline run {self.options.baseline} did not evaluate set {s.name!r}"
                 + (f" with model {m.name!r}" if self.several else "")
                 + ": compared with its previous run only" for role, ref in refs if ref is None]
        comparisons = [compare_with(role, ref, meta, current, self.rule)
                       for role, ref in refs if ref is not None]
        versus = None
        if not is_first:
            first = self.models[0].name
            champion = next((r for r in done if r.name == s.name and r.model == first), None)
            if champion is not None and champion.summary is not None:
                versus = compare_correctness(load_correctness(champion.run_dir), current,
                                             self.rule, "first model", first)
            else:
                why = champion.verdict if champion is not None else "not run"
                versus = Comparison("first model", first, NOT_COMPARABLE,
                                    reason=f"the first model, {first}, has no result on set "
                                           f"{s.name} ({why})")
        checked = published.check(summary, kind, s.name, self.options.published_table,
                                  self.rule.fidelity_tolerance)
        verdict = worst([c.outcome for c in comparisons]
                        + [FIDELITY for f in checked.applied if not f.ok])
        result = SetResult(s.name, kind, out, summary, comparisons, checked.applied, verdict,
                           notes=notes, not_applicable=checked.not_applicable, model=m.name,
                           versus_first=versus)
        row = history_row(self.run_id, result, self.rule)
        with deadline.deferred():
            append_history(self.history, row)
        self.rows.append(row)
        return result

    def unfinished(self, s: EvalSet, m: EvalModel, verdict: str, error: str) -> SetResult:
        """The result, and the history row, of a set without metrics (``NO_METRICS``)."""
        from pipeline import published

        kind = published.dataset_kind(self.manifests[s.name])
        row = unfinished_row(self.run_id, time_now(), s.name, kind, s.manifest, verdict, error,
                             self.rule, m.name)
        with deadline.deferred():
            append_history(self.history, row)
        self.rows.append(row)
        return SetResult(s.name, kind, self.out_dir(s, m), None, [], [], verdict, error,
                         model=m.name)


def time_now() -> str:
    """Now, UTC, ISO 8601 (as summary.json's started_at)."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _set_record(s: EvalSet, model: str, manifest, r: SetResult | None) -> dict:
    """One set with one model in nightly.json: what it is, and once done what it got."""
    from pipeline import published

    base = {"name": s.name, "model": model, "manifest": s.manifest,
            "kind": published.dataset_kind(manifest)}
    if r is None:
        return {**base, "verdict": RUNNING}
    return {**base, "predictions_dir": r.run_dir,
            "prediction_run_id": (r.summary or {}).get("run_id"), "verdict": r.verdict,
            "error": r.error, "notes": r.notes,
            "comparisons": comparison_dicts(r.comparisons),
            "versus_first_model": (comparison_dicts([r.versus_first])[0]
                                   if r.versus_first else None),
            "fidelity": [asdict(f) for f in r.fidelity],
            "fidelity_not_applicable": [dict(asdict(n), line=n.describe())
                                        for n in r.not_applicable]}


def track(result: NightlyResult, history: str, uri: str) -> None:
    """Log the night to MLflow (``pipeline.tracking``; nothing when ``uri`` is ''): one run
    named after the night's run id, in the experiment ``nightly HISTORY`` (every night of one
    history folder in one experiment, so MLflow's charts show the trend). Per set
    ``SET.top1``, ``SET.top5``, their 95% interval bounds, ``SET.ece`` and the ReaL figures as
    metrics (in a night of several models, ``MODEL.SET.top1`` ... for each model after the
    first, whose keys stay ``SET.top1`` ... so its series goes on when a model is added); the
    verdict, exit code and each set's verdict as tags; report.html and nightly.json as
    artifacts. A tracking server that fails is one warning: the night's own outputs and exit
    code stand."""
    from pipeline import tracking

    if not uri:
        return
    where = history if storage.is_uri(history) else os.path.abspath(history)
    t = tracking.Tracker.start(uri, f"nightly {where}", result.run_id,
                               tags={"job": "jobs.nightly_eval", "history": where})
    first = result.sets[0].model if result.sets else ""

    def key(r: SetResult) -> str:  # SET for the first model, MODEL.SET for the others
        return r.name if r.model == first else f"{r.model}.{r.name}"
    t.metrics({f"{key(r)}.{k}": v for r in result.sets if r.summary is not None
               for k, v in tracking.summary_figures(r.summary).items()})
    t.tags({"verdict": result.verdict, "exit_code": result.exit_code,
            **{f"{key(r)}.verdict": r.verdict for r in result.sets}})
    for name in ("report.html", "nightly.json"):
        path = storage.join(result.run_dir, name)
        if storage.exists(path):
            t.artifact(path)
    t.end(True)


def describe_versus(c: Comparison, rule: RegressionRule) -> str:
    """One line for a model against the night's first model on the same images (never part of
    the verdict: which model is better is the night's news, not an alarm)."""
    if c.outcome == NOT_COMPARABLE:
        return f"vs first model {c.reference_run_id}: not compared: {c.reason}"
    word = {REGRESSION: "significantly worse than", IMPROVEMENT: "significantly better than"}
    return (f"vs first model {c.reference_run_id}: top-1 {c.reference_top1:.2f}% -> "
            f"{c.top1:.2f}% ({c.delta_pp:+.2f} pp over {c.paired} paired images; lost {c.lost}, "
            f"gained {c.gained}; McNemar exact p={c.p_value:.3g}): "
            f"{word.get(c.outcome, 'no significant difference from')} {c.reference_run_id} "
            f"({rule.describe()})")


def format_result(result: NightlyResult, rule: RegressionRule) -> str:
    """The terminal summary: per set its metrics, comparisons and fidelity checks, then the
    verdict and where the outputs are."""
    lines = list(result.notes)
    several = len({r.model for r in result.sets}) > 1
    for r in result.sets:
        lines.append(f"== set {r.name}" + (f" ({r.kind})" if r.kind else "")
                     + (f", model {r.model}" if several else "") + f": {r.verdict}")
        if r.summary is None:
            lines.append(f"{r.verdict}: {r.error}")
            continue
        lines.append(metrics.format_table(r.summary))
        lines += [describe(c, rule) for c in r.comparisons] or [
            "no earlier run of this model to compare with" if several
            else "no earlier run to compare with"]
        if r.versus_first is not None:
            lines.append(describe_versus(r.versus_first, rule))
        lines += [f.describe() for f in r.fidelity]
        lines += [n.describe() for n in r.not_applicable] + r.notes
    lines += [f"run {result.run_id}",
              f"verdict: {result.verdict} (exit {result.exit_code}); significance rule: "
              f"{rule.describe()}",
              f"predictions: {result.run_dir}/{'<model>/' if several else ''}<set>/, report: "
              f"{result.report_html} (and report.md beside it)"]
    return "\n".join(lines)
