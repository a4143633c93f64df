"""Nightly evaluation: the paired significance test, the history table, exit codes, the report.

The end-to-end runs share one history folder (module fixture ``nightly_runs``), in order:
  1. good weights            -> exit 0, first run
  2. the same good weights   -> exit 0, no significant change (identical predictions)
  3. damaged weights, --baseline <run 1> --alpha 1.0 --min-effect 0 -> exit 3
  4. good weights over a resharded manifest (different sha256)      -> exit 4, refused
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from jobs import nightly_eval
from pipeline import history as historylib, metrics, model as modellib, regression, shards
from pipeline import sources

PRESET = {"resize_size": 73, "crop_size": 64}  # small crops: the test is about the plumbing


def _save(path, net, classes, model_id) -> str:
    return modellib.save_model(str(path), net, classes, PRESET, {}, model_id)


@pytest.fixture(scope="module")
def weights(shard_set, tmp_path_factory):
    """Two model.pt files whose top-1 on the val split is known by construction.

    good: a random-init backbone whose head bias makes it answer class 0 for every image, so
    exactly the 4 class-0 images of 16 are right (25%), whatever the random features are.
    damaged: the same backbone with an extra output class that the head always answers, so
    every image is wrong (0%). A damaged copy that answered another data class would also get
    25% and show no drop, which is why the extra class.
    """
    classes = shards.load_manifest(str(shard_set / "val.json")).classes
    folder = tmp_path_factory.mktemp("nightly-weights")
    torch.manual_seed(0)
    good, _, _ = modellib.build_model(modellib.load_weights("none"), classes)
    with torch.no_grad():
        good.fc.bias[0] += 20.0
    extra = classes + [{"index": len(classes), "id": "zz-extra", "name": "extra"}]
    damaged, _, _ = modellib.build_model(modellib.load_weights("none"), extra)
    state = {k: v for k, v in good.state_dict().items() if not k.startswith("fc.")}
    damaged.load_state_dict(state, strict=False)
    with torch.no_grad():
        damaged.fc.weight.zero_()
        damaged.fc.bias.zero_()
        damaged.fc.bias[len(classes)] = 20.0
    return {"good": str(folder / "good.pt"), "damaged": str(folder / "damaged.pt"),
            "good_sha": _save(folder / "good.pt", good, classes, "nightly-good"),
            "damaged_sha": _save(folder / "damaged.pt", damaged, extra, "nightly-damaged")}


@pytest.fixture(scope="module")
def other_manifest(image_tree, shard_set, tmp_path_factory):
    """The same val images sharded 5 per shard: same images, a different manifest sha256."""
    out = tmp_path_factory.mktemp("val-resharded")
    train = shards.load_manifest(str(shard_set / "train.json"))
    src = sources.with_classes(sources.scan_source(str(image_tree / "val"), "val"),
                               train.classes)
    shards.write_shards(src, str(out), samples_per_shard=5, progress=False)
    return str(out / "val.json")


def _nightly(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = nightly_eval.main(argv + ["--precision", "fp32", "--batch-size", "8"])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def nightly_runs(shard_set, weights, other_manifest, tmp_path_factory):
    history = str(tmp_path_factory.mktemp("nightly") / "history")
    val = str(shard_set / "val.json")
    base = ["--history", history]
    steps = [_nightly(base + ["--data", val, "--weights", weights["good"]]),
             _nightly(base + ["--data", val, "--weights", weights["good"]])]
    first = historylib.read_history(history)["run_id"].iloc[0]
    # With 16 images the damaged run loses 4 of them (b=4, c=0): McNemar's exact p = 0.125,
    # which no sane alpha calls significant. --alpha 1.0 --min-effect 0 exercises the exit-3
    # path end to end; test_a_large_paired_drop_is_significant checks the statistics at scale.
    steps.append(_nightly(base + ["--data", val, "--weights", weights["damaged"],
                                  "--baseline", first, "--alpha", "1.0", "--min-effect", "0"]))
    steps.append(_nightly(base + ["--data", other_manifest, "--weights", weights["good"]]))
    return {"history": history, "steps": steps, "table": historylib.read_history(history),
            "val": val, "other": other_manifest}


# --- the statistics, on synthetic paired vectors -------------------------------------------------

def _series(correct) -> pd.Series:
    return pd.Series(np.asarray(correct, dtype=bool), index=[f"k{i:04d}" for i in
                                                             range(len(correct))])


RULE = regression.RegressionRule()  # jobs.nightly_eval's defaults: alpha 0.01, min-effect 0.5


def test_a_large_paired_drop_is_significant():
    base = _series(np.ones(200))
    new = _series(np.r_[np.zeros(40), np.ones(160)])
    c = regression.compare_correctness(base, new, RULE)
    assert (c.paired, c.lost, c.gained) == (200, 40, 0)
    assert c.p_value == pytest.approx(2 * 0.5 ** 40) and c.delta_pp == pytest.approx(-20.0)
    assert c.outcome == regression.REGRESSION
    assert regression.exit_code(regression.overall_verdict([c])) == 3
    # significant p but an effect below --min-effect: no alarm
    assert regression.compare_correctness(base, new, regression.RegressionRule(0.01, 25.0)).outcome == regression.NO_CHANGE
    # the same drop the other way round is an improvement, exit 0
    up = regression.compare_correctness(new, base, RULE)
    assert up.outcome == regression.IMPROVEMENT and regression.exit_code(up.outcome) == 0


def test_mcnemar_matches_the_binomial_formula_and_pairs_by_key():
    for b, c in [(7, 2), (4, 0), (10, 10), (0, 3)]:
        n, k = b + c, min(b, c)
        exact = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
        assert regression.mcnemar_exact(b, c) == pytest.approx(exact)
    assert regression.mcnemar_exact(0, 0) == 1.0
    # 16 images, 4 lost: p = 0.125, not significant at the default alpha
    small = regression.compare_correctness(_series(np.r_[np.ones(4), np.zeros(12)]),
                                        _series(np.zeros(16)), RULE)
    assert small.p_value == pytest.approx(0.125) and small.outcome == regression.NO_CHANGE
    # pairing is by key, not by position
    ref = pd.Series([True, False], index=["a", "b"])
    cur = pd.Series([False, True, True], index=["b", "a", "z"])
    c = regression.compare_correctness(ref, cur, regression.RegressionRule(0.05, 0.0))
    assert (c.paired, c.lost, c.gained) == (2, 0, 0)


def test_verdict_severity_and_exit_codes():
    def comp(outcome):
        return regression.Comparison("previous", "r", outcome)
    assert regression.overall_verdict([]) == regression.FIRST_RUN
    assert regression.overall_verdict([comp(regression.NO_CHANGE),
                                    comp(regression.NOT_COMPARABLE)]) == regression.NOT_COMPARABLE
    assert regression.overall_verdict([comp(regression.NOT_COMPARABLE),
                                    comp(regression.REGRESSION)]) == regression.REGRESSION
    assert [regression.exit_code(v) for v in (regression.FIRST_RUN, regression.NO_CHANGE,
                                           regression.IMPROVEMENT, regression.REGRESSION,
                                           regression.NOT_COMPARABLE)] == [0, 0, 0, 3, 4]


# --- the job, end to end -------------------------------------------------------------------------

def test_same_weights_twice_is_no_significant_change(nightly_runs):
    (code1, out1, _), (code2, out2, _) = nightly_runs["steps"][:2]
    assert code1 == 0 and "first run" in out1
    assert code2 == 0 and "verdict: no significant change" in out2
    assert "alpha=0.01" in out2 and "min-effect=0.5" in out2


def test_damaged_weights_are_a_significant_regression(nightly_runs):
    code, out, _ = nightly_runs["steps"][2]
    run1, run2 = nightly_runs["table"]["run_id"].iloc[:2]
    assert code == 3, out
    assert f"vs previous run {run2}" in out and f"vs baseline run {run1}" in out
    assert "lost 4, gained 0" in out and "verdict: significant regression (exit 3)" in out
    assert "alpha=1" in out and "min-effect=0" in out


def test_history_table_has_one_row_per_run(nightly_runs, weights):
    t = nightly_runs["table"]
    assert list(t.columns) == historylib.HISTORY_SCHEMA.names and len(t) == 4
    assert list(t["verdict"]) == [regression.FIRST_RUN, regression.NO_CHANGE, regression.REGRESSION,
                                  regression.NOT_COMPARABLE]
    assert list(t["weights_sha256"]) == [weights["good_sha"]] * 2 + [weights["damaged_sha"],
                                                                      weights["good_sha"]]
    sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert list(t["data_manifest_sha256"]) == [sha(nightly_runs["val"])] * 3 + [
        sha(nightly_runs["other"])]
    assert list(t["model_id"]) == ["nightly-good"] * 2 + ["nightly-damaged", "nightly-good"]
    assert list(t["top1"]) == [25.0, 25.0, 0.0, 25.0] and (t["samples"] == 16).all()
    assert (t["top1_ci95_lo"] <= t["top1"]).all() and (t["top1"] <= t["top1_ci95_hi"]).all()
    assert (t["failures"] == 0).all() and (t["precision"] == "fp32").all()
    assert t["run_id"].is_unique and t["date"].dt.tz is not None
    damaged = t.iloc[2]
    assert damaged["previous_run_id"] == t["run_id"].iloc[1]
    assert damaged["baseline_run_id"] == t["run_id"].iloc[0]
    assert damaged["top1_delta_vs_previous"] == -25.0
    assert damaged["p_vs_previous"] == pytest.approx(0.125) and damaged["alpha"] == 1.0
    assert pd.isna(t["previous_run_id"].iloc[0]) and pd.isna(t["p_vs_previous"].iloc[3])
    for row in t.itertuples():  # each run is a normal prediction folder
        assert row.predictions_dir.endswith(os.path.join("runs", row.run_id, "val"))
        assert row.dataset == "val" and row.dataset_kind == ""
        assert len(metrics.read_predictions(row.predictions_dir)) == 16


def test_different_manifests_are_refused(nightly_runs):
    code, out, err = nightly_runs["steps"][3]
    t = nightly_runs["table"]
    assert code == 4
    assert "refusing to compare" in err and "different data manifests" in err
    for manifest, sha in zip(t["data_manifest"].iloc[2:], t["data_manifest_sha256"].iloc[2:]):
        assert manifest in err and sha in err
    assert "verdict: not comparable (exit 4)" in out
    run_dir = os.path.dirname(t["predictions_dir"].iloc[3])

    def refuse(name):
        raise ValueError(f"{name} in nightly.json")

    record = json.loads(open(os.path.join(run_dir, "nightly.json")).read(), parse_constant=refuse)
    assert record["sets"][0]["comparisons"][0]["p_value"] is None  # strict JSON: no NaN


def test_unknown_baseline_fails_before_predicting(nightly_runs, weights):
    code, _, err = _nightly(["--history", nightly_runs["history"], "--data", nightly_runs["val"],
                             "--weights", weights["good"], "--baseline", "no-such-run"])
    assert code == 2 and "no-such-run" in err
    assert len(historylib.read_history(nightly_runs["history"])) == 4


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        nightly_eval.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in nightly_eval.NightlyConfig.__dataclass_fields__:
        assert "--" + flag.replace("_", "-") in text
    assert "Exit codes" in text and "4 not comparable" in text


# --- the report ----------------------------------------------------------------------------------

class _Page(HTMLParser):
    """Collects <img> sources and checks that every element is closed in order."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_report_html_is_self_contained_with_valid_plots(nightly_runs):
    t = nightly_runs["table"]
    run_dir = os.path.dirname(t["predictions_dir"].iloc[2])  # runs/<run_id>/, above the set
    page = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack
    # history, class changes, worst classes, confused pairs, reliability
    assert len(parser.images) == 5
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        img.verify()
        assert img.format == "PNG"
    assert "significant regression" in page
    assert t["run_id"].iloc[1] in page and t["run_id"].iloc[0] in page  # previous, baseline
    assert "src=\"http" not in page and "<script" not in page  # nothing fetched from outside
    # issue 38: the Run table has a header row, the all-sets table no empty kind or ReaL cell
    assert "<th>field</th><th>value</th>" in page and "<th></th>" not in page
    assert "own data" in page and "no ReaL labels" in page
    md = open(os.path.join(run_dir, "report.md"), encoding="utf-8").read()
    assert "significant regression" in md and t["run_id"].iloc[1] in md
    latest = open(os.path.join(nightly_runs["history"], "latest.html"), encoding="utf-8").read()
    assert t["run_id"].iloc[3] in latest and "not comparable" in latest


# The render check below: a copy of the report gets this script, which records JavaScript errors
# and failed resource loads (window "error" in the capture phase sees <img> failures, which do
# not bubble) and console.error calls, and on window load writes one verdict line into the page:
# "IMAGES-OK <n> <w>x<h>,..." when every <img> decoded and nothing went wrong, else
# "IMAGES-BROKEN <n> broken=[i,...]"; then " page=<height px>" and " errors=<JSON list>".
_RENDER_PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t !== window && t.tagName ? "failed to load <" + t.tagName.toLowerCase() + ">"
                                               : "uncaught: " + e.message);
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    errors.push("unhandled rejection: " + e.reason);
  });
  var consoleError = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images), broken = [], sizes = [];
    imgs.forEach(function (img, i) {
      if (img.complete && img.naturalWidth > 0) sizes.push(img.naturalWidth + "x" + img.naturalHeight);
      else broken.push(i);
    });
    var ok = !broken.length && !errors.length && imgs.length > 0;
    var el = document.createElement("pre");
    el.id = "render-verdict";
    el.textContent = (ok ? "IMAGES-OK " + imgs.length + " " + sizes.join(",")
                         : "IMAGES-BROKEN " + imgs.length + " broken=[" + broken.join(",") + "]")
                     + " page=" + document.documentElement.scrollHeight
                     + " errors=" + JSON.stringify(errors);
    document.body.appendChild(el);
  });
})();
</script>"""

_VERDICT = re.compile(r'<pre id="render-verdict">(.*?)</pre>', re.S)


def _browser() -> str:
    """The headless browser; a skip on a machine without one, a failure in CI (CI=true)."""
    found = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome",
                                            "google-chrome-stable") if shutil.which(b)), None)
    if found is None:
        why = "no headless Chromium on PATH (`make browser` installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why + "; CI must run the render check, not skip it")
        pytest.skip(why + "; the HTML parse test still runs")
    return found


def _chromium(browser, tmp_path, url, *flags) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}", *flags, url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _render_verdict(browser, tmp_path, page: str, name: str) -> str:
    """Load ``page`` with the probe injected; the verdict line the probe wrote."""
    assert "<head>" in page
    probed = tmp_path / name
    probed.write_text(page.replace("<head>", "<head>" + _RENDER_PROBE, 1), encoding="utf-8")
    dom = _chromium(browser, tmp_path, probed.as_uri(), "--virtual-time-budget=5000",
                    "--window-size=1100,3000", "--dump-dom")
    found = _VERDICT.search(dom)
    assert found, "the probe wrote no verdict; page tail:\n" + dom[-2000:]
    return html.unescape(found.group(1))


def _screenshot(browser, tmp_path, page_path, height: int):
    """A 1100 px wide screenshot of the page, tall enough for all of it: (path, colours, inked
    share, coloured share). Text and tables are grey on white; only the plots bring colour."""
    shot = tmp_path / (os.path.splitext(os.path.basename(page_path))[0] + ".png")
    _chromium(browser, tmp_path, "file://" + os.path.abspath(page_path),
              f"--screenshot={shot}", f"--window-size=1100,{max(height, 3000)}")
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1100, max(height, 3000))
        rgb = np.asarray(img.convert("RGB")).astype(int)
    colours = len(np.unique(rgb.reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1])))
    inked = (rgb.min(axis=2) < 200).mean()  # clearly darker than the white background
    coloured = (rgb.max(axis=2) - rgb.min(axis=2) > 80).mean()  # far from any grey
    return shot, colours, inked, coloured


def test_report_renders_in_headless_chromium(nightly_runs, tmp_path):
    """The report loads in headless Chromium with every plot decoded and no JavaScript error.

    The screenshot is kept at $REPORT_SCREENSHOT when that is set, for a person to look at.
    """
    browser = _browser()
    html_path = os.path.join(os.path.dirname(nightly_runs["table"]["predictions_dir"].iloc[2]),
                             "report.html")
    page = open(html_path, encoding="utf-8").read()
    plots = page.count("<img")
    assert plots >= 5  # history, class changes, worst classes, confused pairs, reliability

    verdict = _render_verdict(browser, tmp_path, page, "report-probed.html")
    print("render verdict:", verdict)
    assert verdict.startswith("IMAGES-OK ") and verdict.endswith(" errors=[]"), verdict
    sizes = verdict.split()[2].split(",")
    assert int(verdict.split()[1]) == len(sizes) >= plots
    assert all(int(w) >= 100 and int(h) >= 100 for w, h in (s.split("x") for s in sizes))

    # The check can fail: one plot swapped for a PNG cut short, and a page script that throws.
    start = page.index('src="data:image/png;base64,') + len('src="')
    end = page.index('"', start)
    corrupt = page[:start] + "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA" + page[end:]
    bad = _render_verdict(browser, tmp_path, corrupt, "report-corrupt-plot.html")
    assert bad.startswith(f"IMAGES-BROKEN {plots} broken=[0]") and "<img>" in bad, bad
    throws = page.replace("</body>", "<script>throw new Error('probe-check')</script></body>", 1)
    bad = _render_verdict(browser, tmp_path, throws, "report-throws.html")
    assert bad.startswith(f"IMAGES-BROKEN {plots} broken=[]") and "probe-check" in bad, bad

    # The original page (no probe) as a person sees it: not blank, and the plots' colours on it
    # (a copy without its <img> tags, text and tables only, has none of those).
    height = int(re.search(r" page=(\d+) ", verdict).group(1))
    shot, colours, inked, coloured = _screenshot(browser, tmp_path, html_path, height)
    print(f"screenshot: 1100x{max(height, 3000)}, {colours} distinct colours, "
          f"{inked:.1%} inked, {coloured:.2%} coloured pixels")
    assert colours >= 200 and inked >= 0.02 and coloured >= 0.005, (colours, inked, coloured)
    bare = tmp_path / "report-no-plots.html"
    bare.write_text(re.sub(r"<img\b[^>]*>", "", page), encoding="utf-8")
    assert _screenshot(browser, tmp_path, bare, height)[3] < 0.001
    if os.environ.get("REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["REPORT_SCREENSHOT"])
        print("screenshot saved to", os.environ["REPORT_SCREENSHOT"])
