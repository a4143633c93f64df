"""The nightly's statistics: whether a run regressed against a reference run, and what the
process exits with (``pipeline.nightly`` runs the suite; ``pipeline.history`` stores the rows).

The comparison is paired: per-image top-1 correctness joined on the image key, tested with
McNemar's test (McNemar 1947) in its exact form: a two-sided binomial test of the discordant
pairs at p = 1/2. A change counts as significant only when p < alpha AND the
top-1 change exceeds ``min_effect`` percentage points (``RegressionRule``): with ImageNet's
50,000 images tiny drops reach significance, and with a handful of images large drops do not,
so either condition alone would mislead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
from scipy.stats import binomtest

from pipeline.errors import EXIT_DEADLINE, EXIT_FAILED, EXIT_OK

EXIT_REGRESSION, EXIT_NOT_COMPARABLE, EXIT_FIDELITY = 3, 4, 5

FIRST_RUN = "first run"
NO_CHANGE = "no significant change"
IMPROVEMENT = "significant improvement"
REGRESSION = "significant regression"
NOT_COMPARABLE = "not comparable"
FAILED = "failed"
FIDELITY = "pipeline fidelity failure"
DEADLINE = "deadline exceeded"  # the set was stopped by --deadline, or not reached before it
RUNNING = "running"  # nightly.json of a night still at work
DID_NOT_FINISH = "did not finish"  # a night whose driver ended mid-run, as the next one records it
NO_METRICS = (FAILED, DEADLINE, DID_NOT_FINISH)  # history rows without predictions
# The overall verdict is the most severe outcome of the comparisons, over every set. A measured
# regression outranks a refused comparison and a set that failed: it is the alarm the nightly
# job exists to raise. A published accuracy outside the measured interval outranks everything:
# the pipeline itself is off, so no figure of the run can be trusted. A set the deadline stopped
# ranks above one that failed (the night ran out of time, the rest of its sets untried) and
# below a measured regression.
SEVERITY = [FIRST_RUN, NO_CHANGE, IMPROVEMENT, NOT_COMPARABLE, FAILED, DEADLINE, REGRESSION,
            FIDELITY]
EXIT_CODES = {FIRST_RUN: EXIT_OK, NO_CHANGE: EXIT_OK, IMPROVEMENT: EXIT_OK,
              NOT_COMPARABLE: EXIT_NOT_COMPARABLE, FAILED: EXIT_FAILED,
              DEADLINE: EXIT_DEADLINE, REGRESSION: EXIT_REGRESSION, FIDELITY: EXIT_FIDELITY}


@dataclass(frozen=True)
class RegressionRule:
    """When a change is an alarm: McNemar exact p below ``alpha`` AND |top-1 change| above
    ``min_effect`` percentage points; a published figure fails the run when it lies outside the
    measured 95% interval widened by ``fidelity_tolerance`` percentage points. The defaults are
    jobs.nightly_eval's. UsageError (exit 2) for values that cannot work."""
    alpha: float = 0.01
    min_effect: float = 0.5
    fidelity_tolerance: float = 0.05

    def __post_init__(self):
        from pipeline.errors import UsageError

        if not 0 < self.alpha <= 1 or self.min_effect < 0 or self.fidelity_tolerance < 0:
            raise UsageError(f"--alpha must be in (0, 1] (not {self.alpha:g}), --min-effect "
                             f"and --fidelity-tolerance >= 0 (not {self.min_effect:g}, "
                             f"{self.fidelity_tolerance:g})")

    def describe(self) -> str:
        """The rule as the terminal and the report state it."""
        return (f"McNemar exact p < alpha={self.alpha:g} AND |top-1 change| > min-effect="
                f"{self.min_effect:g} pp")


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


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b against b + c at p = 1/2."""
    if lost + gained == 0:
        return 1.0  # no discordant pair: no evidence of any change
    return float(binomtest(lost, lost + gained, 0.5, alternative="two-sided").pvalue)


def classify(p_value: float, delta_pp: float, rule: RegressionRule) -> str:
    """Significant only when p < rule.alpha AND |top-1 change| > rule.min_effect pp."""
    if p_value < rule.alpha and abs(delta_pp) > rule.min_effect:
        return REGRESSION if delta_pp < 0 else IMPROVEMENT
    return NO_CHANGE


def compare_correctness(reference: pd.Series, current: pd.Series, rule: RegressionRule,
                        role: str = "previous", reference_run_id: str = "") -> Comparison:
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
    return Comparison(role, reference_run_id, classify(p, delta, rule), n,
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


def comparison_dicts(comparisons: list[Comparison]) -> list[dict]:
    """The comparisons as plain dicts (``dataclasses.asdict``; NaN where a figure was not measured),
    for nightly.json and the report."""
    return [asdict(c) for c in comparisons]


def describe(c: Comparison, rule: RegressionRule) -> str:
    """One line per comparison for the terminal."""
    if c.outcome == NOT_COMPARABLE:
        return f"vs {c.role} run {c.reference_run_id}: NOT COMPARABLE: {c.reason}"
    return (f"vs {c.role} run {c.reference_run_id}: top-1 {c.reference_top1:.2f}% -> "
            f"{c.top1:.2f}% ({c.delta_pp:+.2f} pp over {c.paired} paired images; "
            f"lost {c.lost}, gained {c.gained}; McNemar exact p={c.p_value:.3g}): "
            f"{c.outcome} (rule: p < {rule.alpha:g} and |change| > {rule.min_effect:g} pp)")
