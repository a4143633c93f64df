"""The nightly evaluation report: report.md, and report.html with its plots embedded.

The report is a list of sections (a title, a sentence, a table, optionally a plot), rendered
twice: as Markdown (tables only, readable in a terminal or a code review) and as one
self-contained HTML file whose PNG plots are base64 data URIs, so it can be mailed, synced from
S3 or opened from any folder without its neighbours. Plots use matplotlib's Agg canvas directly
(no pyplot): no display is needed and no global backend state is touched.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import storage

HISTORY_RUNS_SHOWN = 60


@dataclass
class Section:
    """One report section: ``title``, ``text`` (one paragraph; ``**bold**`` is its only markup), a
    table (``headers`` and ``rows``; none when ``rows`` is empty) and an optional plot, ``png``
    (PNG bytes, shown in report.html only)."""
    title: str
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    png: bytes | None = None


# --- plots ---------------------------------------------------------------------------------------

def _figure(width: float = 7.0, height: float = 3.6):
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def png_bytes(fig: Figure) -> bytes:
    """``fig`` rendered as PNG bytes at its own dpi (100 for this module's figures), after
    ``tight_layout`` (which changes ``fig`` itself)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_history(history: pd.DataFrame) -> bytes:
    """Top-1 and top-5 per run with their 95% intervals as error bars, oldest first."""
    h = history.tail(HISTORY_RUNS_SHOWN).reset_index(drop=True)
    fig, ax = _figure(8.0, 3.8)
    x = list(range(len(h)))
    for name, colour in (("top1", "tab:blue"), ("top5", "tab:green")):
        err = [h[name] - h[f"{name}_ci95_lo"], h[f"{name}_ci95_hi"] - h[name]]
        ax.errorbar(x, h[name], yerr=err, fmt="o-", capsize=3, color=colour,
                    label=name.replace("top", "top-"))
    bad = h.index[h["verdict"] == "significant regression"]
    ax.scatter(bad, h.loc[bad, "top1"], s=120, facecolors="none", edgecolors="red",
               label="significant regression", zorder=3)
    # nights without metrics (failed, deadline exceeded, did not finish): a mark at the bottom
    gap = h.index[h["top1"].isna()]
    if len(gap):
        ax.scatter(gap, [0.0] * len(gap), marker="x", s=80, color="black", zorder=3,
                   label="no metrics (" + ", ".join(sorted(set(h.loc[gap, "verdict"]))) + ")")
    ax.set_xticks(x, [str(r)[:15] for r in h["run_id"]], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("accuracy %")
    ax.set_title("top-1 / top-5 per run (95% Wilson intervals)")
    # beside the plot, not on it: inside, it covered the newest run's error bar
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return png_bytes(fig)


def plot_bars(labels: list[str], values: list[float], title: str, xlabel: str,
              signed: bool = False, xlim: tuple[float, float] | None = None) -> bytes:
    """Horizontal bars, first label on top; ``signed`` colours gains green and losses red."""
    fig, ax = _figure(7.0, max(2.0, 0.35 * len(labels) + 1.0))
    colours = [("tab:green" if v >= 0 else "tab:red") if signed else "tab:blue" for v in values]
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    if signed:
        ax.axvline(0, color="black", linewidth=0.8)
    if xlim:
        ax.set_xlim(*xlim)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return png_bytes(fig)


def plot_reliability(bins: list[dict]) -> bytes:
    """Accuracy against mean confidence per confidence bin; the diagonal is perfect calibration."""
    fig, ax = _figure(4.8, 4.2)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins],
           width=[b["hi"] - b["lo"] for b in bins], edgecolor="black", alpha=0.7,
           label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:red",
            label="(mean confidence, accuracy)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(fontsize=7, loc="upper left")
    return png_bytes(fig)


# --- content -------------------------------------------------------------------------------------

def class_changes(current: dict, reference: dict, n: int = 10) -> list[dict]:
    """Per-class top-1 deltas (percentage points) by class id, largest change first."""
    before = {c["id"]: c for c in reference.get("per_class", [])}
    rows = [{"id": c["id"], "name": c["name"], "before": before[c["id"]]["top1"],
             "after": c["top1"], "delta": c["top1"] - before[c["id"]]["top1"]}
            for c in current["per_class"] if c["id"] in before]
    return sorted(rows, key=lambda r: -abs(r["delta"]))[:n]


def _pct(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _ci(lo, hi) -> str:
    return f"{lo:.2f}-{hi:.2f}"


def overview_section(run_id: str, summary: dict, verdict: str, comparisons: list[dict],
                     rule) -> Section:
    """The "Run" section: the verdict, the significance rule (McNemar's exact p and min-effect in
    percentage points) and a table of the run's metadata and metrics (top-1/top-5 % with 95%
    Wilson intervals, ECE, seconds, images/s). KeyError when ``summary`` lacks a field."""
    compared = ", ".join(f"{c['role']} run {c['reference_run_id']}" for c in comparisons)
    text = (f"Verdict: **{verdict}**. Compared with: {compared or 'nothing (first run)'}. "
            f"A change is significant only if McNemar's exact p < alpha = {rule.alpha:g} AND the "
            f"top-1 change exceeds min-effect = {rule.min_effect:g} percentage points.")
    rows = [["run id", run_id], ["started", summary["started_at"]],
            ["model", summary["model_id"]], ["weights sha256", summary["weights_sha256"]],
            ["data manifest", summary["data_manifest"]],
            ["data manifest sha256", summary["data_manifest_sha256"]],
            ["code version", summary["code_version"]], ["precision", summary["precision"]],
            ["samples (decode failures)", f"{summary['samples']} ({summary['failures']})"],
            ["top-1 % (95% CI)", f"{summary['top1']:.2f} ({_ci(*summary['top1_ci95'])})"],
            ["top-5 % (95% CI)", f"{summary['top5']:.2f} ({_ci(*summary['top5_ci95'])})"],
            ["ECE", f"{summary['ece']:.4f}"],
            *([["ReaL top-1 / top-5 % (images)", f"{_pct(summary['real_top1'])} / "
                f"{_pct(summary['real_top5'])} ({summary['real_samples']})"]]
              if "real_samples" in summary else []),
            ["wall time s / images/s", f"{summary['wall_seconds']:.1f} / "
                                       f"{summary['images_per_s']:.1f}"]]
    return Section("Run", text, ["field", "value"], rows)


def comparison_section(comparisons: list[dict]) -> Section:
    """The "Comparisons" table, one row per comparison (``nightly.comparison_dicts`` form): paired
    images, top-1 % then and now, change in percentage points, lost, gained, McNemar's exact p."""
    rows = [[c["role"], c["reference_run_id"], c["paired"], _pct(c["reference_top1"]),
             _pct(c["top1"]), _pct(c["delta_pp"]), c["lost"], c["gained"],
             "" if c["outcome"] == "not comparable" else f"{c['p_value']:.3g}",
             c["outcome"] + (f": {c['reason']}" if c["reason"] else "")]
            for c in comparisons]
    return Section("Comparisons",
                   "Paired per-image top-1 correctness joined on key. lost = right before, "
                   "wrong now; gained = the reverse." if rows else "No earlier run to compare.",
                   ["compared with", "run", "paired images", "top-1 % then", "top-1 % now",
                    "change pp", "lost", "gained", "p (McNemar exact)", "outcome"], rows)


def history_section(history: pd.DataFrame, prefix: str = "") -> Section:
    """The last HISTORY_RUNS_SHOWN (60) runs of the history table: date, top-1/top-5 % with 95%
    Wilson intervals, samples and verdict per run, plus ``plot_history``'s plot. A night
    without metrics (failed, deadline exceeded, did not finish) is a row with its verdict and
    why, and a mark on the plot."""
    h = history.tail(HISTORY_RUNS_SHOWN)

    def row(r) -> list:
        if r.top1 != r.top1 or r.top1 is None:  # no metrics: say why instead
            why = getattr(r, "error", None) or ""
            return [str(r.date)[:19], r.run_id, "", "", "", "", "",
                    f"{r.verdict}: {why}" if why else r.verdict]
        samples = "" if r.samples != r.samples else int(r.samples)
        return [str(r.date)[:19], r.run_id, f"{r.top1:.2f}", _ci(r.top1_ci95_lo, r.top1_ci95_hi),
                f"{r.top5:.2f}", _ci(r.top5_ci95_lo, r.top5_ci95_hi), samples, r.verdict]
    return Section(prefix + "Top-1 / top-5 over time",
                   f"The last {len(h)} runs of the history table.",
                   ["date (UTC)", "run", "top-1 %", "95% CI", "top-5 %", "95% CI", "samples",
                    "verdict"], [row(r) for r in h.itertuples()], plot_history(h))


def changes_section(summary: dict, reference: dict | None, reference_run_id: str,
                    n: int) -> Section:
    """The ``n`` classes whose top-1 changed most (percentage points) against ``reference`` (the
    previous run's summary.json; None: no comparable run, text only), with a signed bar plot when
    any changed."""
    title = "Classes that changed most since the last run"
    if reference is None:
        return Section(title, "No previous run, or it used different data (see Comparisons).")
    changes = [c for c in class_changes(summary, reference, n) if c["delta"]]
    rows = [[c["name"], c["id"], f"{c['before']:.1f}", f"{c['after']:.1f}", f"{c['delta']:+.1f}"]
            for c in changes]
    png = None
    if any(c["delta"] for c in changes):
        png = plot_bars([c["name"] for c in changes], [c["delta"] for c in changes],
                        f"per-class top-1 change since {reference_run_id}", "pp", signed=True)
    text = f"Per-class top-1 against run {reference_run_id}." + (
        "" if png else " No class changed.")
    return Section(title, text, ["class", "id", "top-1 % then", "top-1 % now", "change pp"],
                   rows, png)


def worst_section(summary: dict, n: int) -> Section:
    """The ``n`` classes with the lowest top-1 % (ties by name), their image counts, and a bar plot
    on a 0-100 % axis."""
    worst = sorted(summary["per_class"], key=lambda c: (c["top1"], c["name"]))[:n]
    rows = [[c["name"], c["id"], c["samples"], f"{c['top1']:.1f}"] for c in worst]
    png = plot_bars([c["name"] for c in worst], [c["top1"] for c in worst],
                    "worst classes", "top-1 %", xlim=(0, 100))  # 0% bars on a 0-100 axis
    return Section("Worst classes", "", ["class", "id", "images", "top-1 %"], rows, png)


def confused_section(summary: dict, n: int) -> Section:
    """The first ``n`` of ``summary["confused_pairs"]`` (true -> predicted class, image count; most
    frequent first, at most 10 from ``metrics.evaluate``) with a bar plot; text only when there
    are none."""
    pairs = summary["confused_pairs"][:n]
    if not pairs:
        return Section("Most confused pairs", "No misclassified image.")
    rows = [[p["label_name"], p["pred_name"], p["count"]] for p in pairs]
    png = plot_bars([f"{p['label_name']} -> {p['pred_name']}" for p in pairs],
                    [p["count"] for p in pairs], "most confused pairs", "images")
    return Section("Most confused pairs", "True class -> predicted class.",
                   ["true class", "predicted", "images"], rows, png)


def reliability_section(summary: dict) -> Section:
    """The reliability table and diagram of ``summary["reliability"]`` (the non-empty ones of 15
    equal-width confidence bins) and the expected calibration error (ECE, Naeini et al. 2015;
    reliability diagrams as in Guo et al. 2017, "On Calibration of Modern Neural Networks")."""
    bins = summary["reliability"]
    rows = [[f"{b['lo']:.2f}-{b['hi']:.2f}", b["count"], f"{b['confidence']:.3f}",
             f"{b['accuracy']:.3f}"] for b in bins]
    return Section("Reliability", f"Expected calibration error {summary['ece']:.4f}.",
                   ["confidence bin", "images", "mean confidence", "accuracy"], rows,
                   plot_reliability(bins) if bins else None)


def fidelity_section(fidelity: list, not_applicable: list = ()) -> Section:
    """The published-accuracy check (``published.Fidelity`` records): published vs measured with
    the measured 95% interval, the tolerance, the outcome and the figure's source; then why any
    published figure did not apply (``published.NotApplicable``: the reason, both counts)."""
    title = "Published accuracy (pipeline fidelity)"
    why = " ".join(n.describe() + "." for n in not_applicable)
    if not fidelity:
        return Section(title, why or "No published figure applies to this model on this set.")
    rows = [[f.dataset, f.metric, f"{f.published:.3f}", f"{f.measured:.3f}",
             f"{f.lo:.3f}-{f.hi:.3f}", f"{f.tolerance:g}",
             "inside" if f.ok else "OUTSIDE: pipeline fidelity failure", f.source]
            for f in fidelity]
    return Section(title, "A published figure outside the measured 95% interval (widened by the "
                          "tolerance) means the pipeline, not the model, has drifted."
                   + (" " + why if why else ""),
                   ["dataset", "metric", "published %", "measured %", "95% CI",
                    "tolerance pp", "outcome", "source"], rows)


def suite_section(run_id: str, results: list, verdict: str, rule, night_notes=(),
                  models: bool = False) -> Section:
    """All sets side by side (``nightly.SetResult`` records): samples, top-1/top-5 % with 95%
    intervals, ReaL top-1, the change against the set's previous run and its McNemar p, the
    published figure and the set's verdict; with ``models`` (a night of several), a column
    naming each row's model. The overall verdict is the worst set's."""
    rows = []
    for r in results:
        s = r.summary
        model = [r.model] if models else []
        if s is None:
            rows.append([r.name, *model, r.kind or "own data", "", "", "", "", "", "", "", "",
                         f"{r.verdict}: {r.error}" if r.error else r.verdict])
            continue
        prev = next((c for c in r.comparisons if c.role == "previous"), None)
        delta = "" if prev is None or prev.outcome == "not comparable" else \
            f"{prev.delta_pp:+.2f}"
        p = "" if prev is None or prev.outcome == "not comparable" else f"{prev.p_value:.3g}"
        if prev is None:
            delta = p = "first run"
        pub = "; ".join(f"{f.metric} {f.published:.2f} ({'ok' if f.ok else 'OUTSIDE'})"
                        for f in r.fidelity) or ("not applicable" if r.not_applicable else
                                                 "none known")
        rows.append([r.name, *model, r.kind or "own data", s["samples"],
                     f"{s['top1']:.2f} ({_ci(*s['top1_ci95'])})",
                     f"{s['top5']:.2f} ({_ci(*s['top5_ci95'])})",
                     _pct(s.get("real_top1")) or "no ReaL labels", s.get("scored_over", ""),
                     delta, p, pub, r.verdict])
    notes = " ".join(n.rstrip(".") + "." for n in [*night_notes, *(
        n for r in results for n in getattr(r, "notes", []))])
    each = "each set and model" if models else "each set"
    text = (f"Run {run_id}. Verdict: **{verdict}** (the worst of its sets). A change is "
            f"significant only if McNemar's exact p < alpha = {rule.alpha:g} AND the top-1 "
            f"change exceeds min-effect = {rule.min_effect:g} percentage points, {each} "
            f"against its own previous run over the same data." + (" " + notes if notes else ""))
    return Section("All sets", text,
                   ["set", *(["model"] if models else []), "kind", "images",
                    "top-1 % (95% CI)", "top-5 % (95% CI)", "ReaL top-1 %", "scored over",
                    "change vs previous pp", "p", "published %", "verdict"], rows)


def models_section(set_name: str, results: list, first: str, rule) -> Section:
    """The models of a night side by side on one set (``nightly.SetResult`` records, the first
    model first): parameters (millions), top-1/top-5 % with 95% intervals, ECE, images/s, and
    each model against the first on the same images: the top-1 change in percentage points,
    images lost and gained, McNemar's exact p and what it means. Informative: a model worse
    than the first is no regression (each model's own history judges that)."""
    from pipeline.regression import IMPROVEMENT, NOT_COMPARABLE, REGRESSION

    rows = []
    for r in results:
        s = r.summary
        if s is None:
            rows.append([r.model, "", "", "", "", "", "", "", "", "", "",
                         f"{r.verdict}: {r.error}" if r.error else r.verdict])
            continue
        params = f"{s['params'] / 1e6:.1f}" if s.get("params") else ""
        c = r.versus_first
        if r.model == first:
            versus = ["first model", "", "", "", ""]
        elif c is None:
            versus = ["", "", "", "", "not compared"]
        elif c.outcome == NOT_COMPARABLE:
            versus = ["", "", "", "", f"not compared: {c.reason}"]
        else:
            word = {REGRESSION: f"worse than {first}", IMPROVEMENT: f"better than {first}"}
            versus = [f"{c.delta_pp:+.2f}", c.lost, c.gained, f"{c.p_value:.3g}",
                      word.get(c.outcome, "no significant difference")]
        rows.append([r.model, s.get("arch") or "", params,
                     f"{s['top1']:.2f} ({_ci(*s['top1_ci95'])})",
                     f"{s['top5']:.2f} ({_ci(*s['top5_ci95'])})",
                     f"{s['ece']:.4f}", f"{s['images_per_s']:.1f}", *versus])
    text = (f"Each model against the first, {first}, on the same images of {set_name}: McNemar's "
            f"exact test on the images one gets right and the other wrong (lost = right with "
            f"{first}, wrong with this model; gained = the reverse), significant only if p < "
            f"alpha = {rule.alpha:g} AND the top-1 change exceeds {rule.min_effect:g} "
            f"percentage points. Which model is better is news, not an alarm: each model's "
            f"verdict comes from its own previous run.")
    return Section(f"{set_name}: models side by side", text,
                   ["model", "architecture", "params (M)", "top-1 % (95% CI)",
                    "top-5 % (95% CI)", "ECE", "images/s", f"change vs {first} pp", "lost",
                    "gained", "p (McNemar exact)", "outcome"], rows)


def build_sections(run_id: str, result, history: pd.DataFrame, rule,
                   reference: tuple[dict | None, str] = (None, ""), top_n: int = 10,
                   prefix: str = "") -> list[Section]:
    """All sections of one set's report, in reading order, titles prefixed with ``prefix`` (the
    set's name in a run over several sets). ``result``: the set's ``nightly.SetResult`` (its
    summary, comparisons, fidelity checks and verdict); ``history``: the set's history rows;
    ``rule``: the ``regression.RegressionRule`` the run applied; ``reference``: (the summary
    of the run per-class changes are shown against, its run id), or (None, "")."""
    from pipeline.regression import comparison_dicts

    summary, comparisons = result.summary, comparison_dicts(result.comparisons)
    reference_summary, reference_run_id = reference
    sections = [overview_section(run_id, summary, result.verdict, comparisons, rule),
                comparison_section(comparisons),
                fidelity_section(result.fidelity or [], result.not_applicable),
                history_section(history),
                changes_section(summary, reference_summary, reference_run_id, top_n),
                worst_section(summary, top_n), confused_section(summary, top_n),
                reliability_section(summary)]
    for s in sections:
        s.title = prefix + s.title
    return sections


# --- rendering -----------------------------------------------------------------------------------

def render_markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown text: ``# title``, then per section a ``##`` heading, its text and its
    table ('|' in cells escaped); the plots are left to report.html."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.text:
            out += [s.text, ""]
        if s.rows:
            cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
            out += ["| " + " | ".join(map(cell, s.headers)) + " |",
                    "|" + "---|" * len(s.headers)]
            out += ["| " + " | ".join(map(cell, r)) + " |" for r in s.rows]
            out.append("")
    out.append("Plots: report.html (same folder).")
    return "\n".join(out) + "\n"


CSS = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
       "padding:2px 8px;font-size:13px;text-align:left}img{max-width:100%}")


def render_html(title: str, sections: list[Section]) -> str:
    """The report as one self-contained HTML page (a string): text HTML-escaped with ``**bold**`` as
    <strong>, plots inlined as base64 PNG data URIs, tables as <table>."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<h1>{esc(title)}</h1>"]
    for s in sections:
        out.append(f"<h2>{esc(s.title)}</h2>")
        if s.text:  # the only markup in section texts is **bold**
            parts = esc(s.text).split("**")
            out.append("<p>" + "".join(f"<strong>{p}</strong>" if i % 2 else p
                                       for i, p in enumerate(parts)) + "</p>")
        if s.png:
            data = base64.b64encode(s.png).decode("ascii")
            out.append(f'<p><img src="data:image/png;base64,{data}" alt="{esc(s.title)}"></p>')
        if s.rows:
            out.append("<table><thead><tr>" + "".join(f"<th>{esc(str(h))}</th>"
                                                      for h in s.headers) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in r) + "</tr>"
                    for r in s.rows]
            out.append("</tbody></table>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def write_report(run_dir: str, title: str, sections: list[Section],
                 latest: str | None = None) -> tuple[str, str]:
    """Write RUN_DIR/report.md and RUN_DIR/report.html (and a copy at ``latest``)."""
    md_path, html_path = storage.join(run_dir, "report.md"), storage.join(run_dir, "report.html")
    page = render_html(title, sections)
    storage.write_text_atomic(md_path, render_markdown(title, sections))
    storage.write_text_atomic(html_path, page)
    if latest:
        storage.write_text_atomic(latest, page)
    return md_path, html_path
