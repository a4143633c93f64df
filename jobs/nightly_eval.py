"""Nightly evaluation over a suite of sets: predict, record one history row per set, alarm on a
significant regression or on a published accuracy the pipeline no longer reproduces."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import architectures, deadline, nightly, predict, regression, resources
from pipeline import tracking
from pipeline.errors import USER_ERRORS, UsageError, exit_code_of


@dataclass(frozen=True)
class NightlyConfig(predict.PredictOptions):
    """Predict every image of each --data set with --weights into HISTORY/runs/<run_id>/<set>/ (a
    normal jobs.predict output folder; several --weights: HISTORY/runs/<run_id>/<model>/<set>/),
    record one row per set and model in HISTORY/history/ (one file each, never rewritten),
    compare each set's per-image top-1 correctness with that set's previous run of the same
    model and with the pinned --baseline run (McNemar's exact test on the discordant pairs),
    compare each model with the first on the same images (shown, never an alarm), check the
    published accuracy of known weights (torchvision's, or --published), and
    write report.md and a self-contained report.html (all sets side by side, then a section per
    set) into the run folder. A change is significant only if p < --alpha AND the top-1 change
    exceeds --min-effect percentage points. Exit codes, for the worst set: 0 nothing regressed
    (also the first run), 1 a set failed (e.g. more decode failures than --max-failed-fraction;
    recorded in the history as failed), 2 bad arguments (a missing manifest, weights or labels
    file, an unknown --baseline), 3 significant top-1 regression, 4 not comparable: the previous
    or baseline run used a different data manifest (sha256 differs), 5 pipeline fidelity: a
    published accuracy lies outside the measured 95% interval widened by --fidelity-tolerance,
    6 --deadline exceeded (the set at work and those after it are recorded as "deadline
    exceeded"), 7 the cluster did not give the plan's resources within --max-wait, 8 the
    previous night on the same --history still runs (this one did not start). Severity over the
    sets and models: 5 > 3 > 6 > 1 > 4 > 0 (2 and 8 come before any set, 7 ends the night where
    it stands). Every night that starts leaves a history row per set and a report, and
    names a previous night whose driver died ("did not finish")."""
    data: tuple = _cli.repeated("a set to evaluate, repeatable: NAME=MANIFEST (e.g. "
                                "val=shards/val.json v2=shards-v2/val.json), or a bare MANIFEST "
                                "(named after its file: val.json -> val)", "[NAME=]MANIFEST",
                                required=True)
    weights: tuple = _cli.repeated(
        "model to evaluate, repeatable (several models: one report side by side, each compared "
        "with the first by McNemar's test and with its own previous run); SPEC is "
        "DEFAULT, a member of --model's weights enum (IMAGENET1K_V1, ...), none, or a file "
        "(model.pt from jobs.finetune, or a state_dict); NAME keys the model's history (default: "
        "the architecture it runs as, e.g. resnet18)", "[NAME=]SPEC", required=True)
    model: tuple = _cli.repeated(
        "torchvision classifier (resnet18, resnet50, efficientnet_b0, convnext_tiny, vit_b_16, "
        "mobilenet_v3_large, ...): once for every --weights, or once per --weights in the same "
        "order (a model.pt's own must match); absent: a model.pt's own, else resnet18",
        "MODEL")
    history: str = _cli.option("", "history folder (local or s3://...): history/ (one Parquet "
                                   "file per set and model per run), runs/<run_id>/, latest.html",
                               required=True)
    real_labels: tuple = _cli.repeated(
        "ImageNet-ReaL labels for a set of ImageNet val images, repeatable: NAME=FILE, or a bare "
        "FILE with a single set; FILE 'builtin' is the shipped real.json (Beyer et al. 2020)",
        "[NAME=]FILE")
    baseline: str = _cli.option("", "run id (from the history) to compare with as well as "
                                    "the previous run; empty: previous run only")
    alpha: float = _cli.option(0.01, "significance level: a change needs McNemar exact p below "
                                     "this")
    min_effect: float = _cli.option(0.5, "a change also needs |top-1 change| above this many "
                                         "percentage points")
    published: str = _cli.option("", "JSON file of more published figures to check (a list of "
                                      "{model, dataset, top1, top5, samples, source}; model is a "
                                      "model_id or weights sha256, dataset a kind such as "
                                      "imagenet-v2 or a set NAME); torchvision's ResNet-18 "
                                      "figures are built in")
    fidelity_tolerance: float = _cli.option(0.05, "percentage points the measured 95%% interval "
                                                  "is widened by before a published figure "
                                                  "outside it fails the run (exit 5)")
    top_n: int = _cli.option(10, "classes and confused pairs listed in the report")
    latest: bool = _cli.option(True, "also copy the report to HISTORY/latest.html")
    deadline: str = _cli.deadline_option("8h")
    mlflow_uri: str = _cli.option("", tracking.URI_HELP + ". One MLflow run per night, in the "
                                      "experiment 'nightly HISTORY'", recorded=False)
    notify_command: str = _cli.option("", "a command run (through /bin/sh) when the night exits "
                                          "non-zero, with the night's JSON summary (nightly.json, "
                                          "or the error) on stdin: wire in a Slack or pager "
                                          "script. Its own failure is a warning")
    progress: bool = _cli.option(True, "show each set's progress: a bar on a terminal, else a "
                                       "line about every 10%% or minute (images done, rate, "
                                       "ETA), readable in a cron log")


@dataclass(frozen=True)
class Checked:
    """What the flags resolve to before Ray starts: the sets, the models, the published figures
    to check (torchvision's and --published's) and the regression rule."""
    sets: list
    published_table: list
    rule: regression.RegressionRule
    models: list


def check(cfg: NightlyConfig) -> Checked:
    """Every setting and file that can be checked without Ray, each once: UsageError (exit 2)
    for values that cannot work, SuiteError (exit 2) for sets or files that are not there."""
    rule = regression.RegressionRule(cfg.alpha, cfg.min_effect, cfg.fidelity_tolerance)
    resources.check_decode_device(cfg.decode_device, cfg.use_gpu)
    deadline.parse_duration("--deadline", cfg.deadline)
    deadline.parse_duration("--max-wait", cfg.max_wait)
    sets = nightly.parse_sets(cfg.data, cfg.real_labels)
    for arch in cfg.model:  # a typo: one line naming the closest names
        architectures.check_name(arch)
    # a model.pt of another architecture than its --model: exit 2 (parse_models loads it)
    models = nightly.parse_models(cfg.weights, cfg.model)
    table = nightly.check_inputs(sets, models, cfg.published)
    opts = dataclasses.replace(predict.PredictOptions.of(cfg), model="")
    for m in models:
        for s in sets:  # what needs the model's classes too (ReaL labels on other classes)
            if s.real_labels:
                try:
                    predict.resolve_inputs(s.manifest, m.weights, dataclasses.replace(
                        opts, real_labels=s.real_labels, model=m.arch))
                except UsageError:
                    raise
                except USER_ERRORS:  # weights that do not load: the set fails, recorded
                    pass
    return Checked(sets, table, rule, models)


def run(cfg: NightlyConfig, checked: Checked) -> nightly.NightlyResult:
    """``nightly.run_nightly`` over the checked suite (on the Ray cluster the job joined)."""
    opts = dataclasses.replace(predict.PredictOptions.of(cfg), real_labels="", model="")
    return nightly.run_nightly(checked.sets, checked.models, cfg.history, nightly.NightlyOptions(
        baseline=cfg.baseline, rule=checked.rule, latest=cfg.latest, top_n=cfg.top_n,
        config=_cli.to_dict(cfg),
        predict_options=opts, published_table=checked.published_table))


def notify(command: str, summary: dict) -> None:
    """Run --notify-command with ``summary`` (JSON) on stdin; a warning when it fails or takes
    over NOTIFY_SECONDS: the night's own exit code stands either way."""
    try:
        done = subprocess.run(["/bin/sh", "-c", command], input=_cli.dump(summary), text=True,
                              timeout=NOTIFY_SECONDS, capture_output=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"warning: --notify-command failed: {e}", file=sys.stderr)
        return
    if done.returncode:
        print(f"warning: --notify-command exited {done.returncode}: "
              f"{(done.stderr or done.stdout).strip()[-300:]}", file=sys.stderr)


NOTIFY_SECONDS = 60


def main(argv=None) -> int:
    """The job: the night's exit code (see NightlyConfig); --notify-command hears of any that
    is not 0, an error before the night started included."""
    try:
        cfg = _cli.parse(NightlyConfig, argv, "nightly_eval")
    except SystemExit as e:  # bad flags (argparse said why): a cron line with a typo pages too
        command = _flag_value(sys.argv[1:] if argv is None else argv, "--notify-command")
        if e.code and command:
            notify(command, {"verdict": "error", "exit_code": e.code,
                             "error": "bad arguments (see the job's output)"})
        raise
    summary: dict = {}
    try:
        code = _cli.reports_errors(lambda _: night(cfg, summary))(None)
    except BaseException as e:  # a bug (a traceback follows), Ctrl-C: heard of all the same
        if cfg.notify_command and not isinstance(e, SystemExit):
            notify(cfg.notify_command, summary or {
                "verdict": "error", "exit_code": 1, "error": f"{type(e).__name__}: {e}"})
        raise
    if code and cfg.notify_command:
        notify(cfg.notify_command, summary)
    return code


def _flag_value(argv: list[str], flag: str) -> str:
    """The value of ``flag`` in raw ``argv`` (``--flag V`` or ``--flag=V``), '' when absent."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return ""


def night(cfg: NightlyConfig, summary: dict) -> int:
    """Check, run and print one night; ``summary`` gets nightly.json's content."""
    try:
        checked = check(cfg)  # exit 2 before Ray starts
        with deadline.job_deadline(deadline.parse_duration("--deadline", cfg.deadline)):
            _cli.setup_logging()
            _cli.init_ray()
            result = run(cfg, checked)  # an unknown --baseline: exit 2 before predicting
    except USER_ERRORS as e:  # reported by reports_errors; the summary says it too
        summary.update(verdict="error", exit_code=exit_code_of(e), error=str(e).strip(),
                       history=cfg.history)
        raise
    summary.update(result.record)
    print(nightly.format_result(result, checked.rule))
    nightly.track(result, cfg.history, tracking.uri_of(cfg.mlflow_uri))
    several = len(checked.models) > 1
    for r in result.sets:
        what = f"set {r.name}" + (f", model {r.model}" if several else "")
        if r.error:
            print(f"error: {what}: {r.error}", file=sys.stderr)
        for c in r.comparisons:
            if c.outcome == regression.NOT_COMPARABLE:
                print(f"error: {what}: refusing to compare with {c.role} run "
                      f"{c.reference_run_id}: {c.reason}", file=sys.stderr)
        for f in r.fidelity:
            if not f.ok:
                print(f"error: {what}: pipeline fidelity: {f.describe()}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
