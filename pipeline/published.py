"""Published accuracies, and the pipeline-fidelity check the nightly evaluation runs against them.

A model whose accuracy on a whole evaluation set is published is a check on the pipeline, not
on the model: measured with the right resize, crop, interpolation, label order and scoring, the
published figure lies inside the measured 95% interval. When it does not, something between the
files and the metric has drifted (a wrong resize, a swapped label order, a 1000-way argmax on a
200-class set), and the nightly run says "pipeline fidelity" and exits 5.

Sources of the built-in figures (top-1 / top-5, percent; 224 px crop after resize 256,
bilinear): ImageNet val from torchvision's ``ResNet18_Weights.IMAGENET1K_V1.meta`` (DEFAULT is
that same file); the other sets from timm's ``results/results-*.csv`` (model
``resnet18.tv_in1k``, the same torchvision weights). Two careful pipelines differ by a few images
on val (torchvision 69.758, timm 69.752: 3 images of 50,000), hence the small tolerance.

Every other torchvision classification weights (ResNet-50, EfficientNet, ConvNeXt, ViT, ...)
brings its own ImageNet val figures, from its own meta (``weights.meta["_metrics"]
["ImageNet-1K"]``, ``architectures.imagenet_figures``), measured with its own preset, which
``--model`` uses too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline import storage
from pipeline.errors import InputError

TORCHVISION_RESNET18 = "torchvision/resnet18/IMAGENET1K_V1"  # model_id of DEFAULT and IMAGENET1K_V1
TIMM = "timm results/results-*.csv, resnet18.tv_in1k"

# Dataset kinds: what a set is, from its manifest (``dataset_kind``). ImageNet-V2's three
# releases sample their images differently and score differently (Recht et al. 2019, sec. 3), so
# each variant is a kind of its own; a V2 set whose variant is not known is plain "imagenet-v2".
IMAGENET_VAL, IMAGENET_REAL, IMAGENET_V2 = "imagenet-val", "imagenet-real", "imagenet-v2"


@dataclass(frozen=True)
class Published:
    """One published figure: ``model`` (a model_id such as TORCHVISION_RESNET18, or a weights
    sha256), ``dataset`` (a dataset kind, e.g. ``imagenet-v2``, or a set NAME of
    ``jobs.nightly_eval --data NAME=...``), ``top1``/``top5`` in percent, ``samples`` the scored
    images it was measured on (None: any count), ``source`` where the figure comes from.
    ``dataset == "imagenet-real"`` figures are checked against ``real_top1``."""
    model: str
    dataset: str
    top1: float
    top5: float | None
    samples: int | None
    source: str


RESNET18_SUITE = [
    Published(TORCHVISION_RESNET18, IMAGENET_VAL, 69.758, 89.078, 50_000,
              "torchvision ResNet18_Weights.IMAGENET1K_V1.meta"),
    Published(TORCHVISION_RESNET18, IMAGENET_REAL, 77.291, 92.760, 46_837, TIMM),
    Published(TORCHVISION_RESNET18, "imagenet-v2-matched-frequency", 57.350, 80.080, 10_000, TIMM),
    Published(TORCHVISION_RESNET18, "imagenet-r", 33.023, 51.143, 30_000, TIMM),
    Published(TORCHVISION_RESNET18, "imagenet-a", 1.120, 16.200, 7_500, TIMM),
    Published(TORCHVISION_RESNET18, "imagenet-sketch", 20.238, 37.258, 50_889, TIMM),
]


def torchvision_val() -> list[Published]:
    """The ImageNet val (50,000 images) figures of every torchvision classification weights,
    from their own meta, but ResNet-18's (``RESNET18_SUITE`` holds it, hand-checked)."""
    from pipeline import architectures

    return [Published(model, IMAGENET_VAL, top1, top5, 50_000, source)
            for model, top1, top5, source in architectures.imagenet_figures()
            if model != TORCHVISION_RESNET18]


# what the nightly checks by default: ResNet-18's suite and every torchvision weights' val
BUILTIN = RESNET18_SUITE + torchvision_val()


def load_table(path: str) -> list[Published]:
    """Extra published figures from a JSON file: a list of objects with the fields of
    ``Published`` (``top5``, ``samples`` optional). InputError naming the file and entry when
    one is malformed."""
    try:
        rows = json.loads(storage.read_text(path))
        return [Published(str(r["model"]), str(r["dataset"]), float(r["top1"]),
                          None if r.get("top5") is None else float(r["top5"]),
                          None if r.get("samples") is None else int(r["samples"]),
                          str(r.get("source", path))) for r in rows]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"--published {path}: expected a JSON list of objects with model, "
                         f"dataset, top1 (top5, samples, source optional): {e!r}") from None


def dataset_kind(manifest) -> str:
    """What a shard manifest holds, for matching published figures: its layout for the
    robustness sets (``imagenet-r``, ``-a``, ``-sketch``); for ImageNet-V2
    ``imagenet-v2-<variant>`` (matched-frequency, threshold0.7, top-images) when the manifest
    names the variant, else ``imagenet-v2``; ``imagenet-val`` for a val split over the 1000
    ImageNet classes in any other layout; else ''."""
    from pipeline import sources

    layout = manifest.layout
    if layout == IMAGENET_V2:
        return f"{IMAGENET_V2}-{manifest.variant}" if manifest.variant else IMAGENET_V2
    if layout in ("imagenet-r", "imagenet-a", "imagenet-sketch"):
        return layout
    if manifest.split == "val" and [c["id"] for c in manifest.classes] == sources.imagenet_wnids():
        return IMAGENET_VAL
    return ""


@dataclass(frozen=True)
class Fidelity:
    """The published figure against the measured one: ``metric`` ("top1", "top5", "real_top1"
    or "real_top5"), ``published`` and ``measured`` percent, the measured 95% interval
    ``lo``-``hi``, the ``tolerance`` (percentage points) it was widened by, ``ok``, and the
    figure's ``source``."""
    dataset: str
    metric: str
    published: float
    measured: float
    lo: float
    hi: float
    tolerance: float
    ok: bool
    source: str

    def describe(self) -> str:
        """One line: published vs measured with the interval, and the outcome."""
        return (f"published {self.metric} {self.published:.3f}% ({self.dataset}; {self.source}) "
                f"vs measured {self.measured:.3f}% (95% CI {self.lo:.3f}-{self.hi:.3f}, widened "
                f"by {self.tolerance:g} pp): "
                + ("inside" if self.ok else "OUTSIDE: pipeline fidelity failure"))


@dataclass(frozen=True)
class NotApplicable:
    """Why the published-accuracy check did not apply to a set: ``what`` it concerns (a dataset
    kind, ``imagenet-real``, or the set's name), the ``reason``, the images ``scored`` and the
    images the figure was ``published_for`` (None when no figure names a count)."""
    what: str
    reason: str
    scored: int
    published_for: int | None = None

    def describe(self) -> str:
        """One line for the terminal, nightly.json and the report."""
        return f"fidelity: not applicable ({self.what}): {self.reason}"


@dataclass(frozen=True)
class Checked:
    """What ``check`` found for one set: the ``applied`` checks (``Fidelity``; any not ok is a
    pipeline-fidelity failure) and, for every published figure that did not apply, or when none
    exists for the set, why (``NotApplicable``). Never both empty."""
    applied: list[Fidelity]
    not_applicable: list[NotApplicable]


# a top-1 metric and its top-5 twin, as summary.json names them
_METRICS = {"top1": "top5", "real_top1": "real_top5"}


def check(summary: dict, kind: str, name: str, table: list[Published],
          tolerance: float) -> Checked:
    """The fidelity checks for one evaluated set, and why any did not apply.

    An entry of ``table`` applies when its model is the summary's model_id or weights sha256,
    its dataset is ``kind`` or the set ``name``, and its sample count (when given) is the number
    of images scored; ReaL entries (``imagenet-real``) apply to an ``imagenet-val`` set scored
    with ReaL labels (against ``real_top1``, ``real_samples``). Top-1 is checked, and top-5 where
    the entry has it. Each figure that matches model and dataset but not the count, and a set
    with no figure at all, gets a ``NotApplicable`` naming why and both counts."""
    models = {summary.get("model_id"), summary.get("weights_sha256")}
    applied, skipped = [], []
    for p in table:
        if p.model not in models:
            continue
        if p.dataset == IMAGENET_REAL and kind == IMAGENET_VAL:
            if "real_samples" not in summary:
                skipped.append(NotApplicable(
                    IMAGENET_REAL, f"a ReaL figure is published ({p.top1:.3f}%) but this run "
                    f"had no ReaL labels (--real-labels)", summary["samples"], p.samples))
                continue
            metric, n = "real_top1", summary["real_samples"]
        elif p.dataset in (kind, name) and p.dataset != IMAGENET_REAL:
            metric, n = "top1", summary["samples"]
        else:
            continue
        if p.samples is not None and p.samples != n:
            skipped.append(NotApplicable(
                p.dataset, f"{n:,} scored, published for {p.samples:,} ({p.source}): a figure "
                f"for the whole set says nothing of a part of it or of a copy with images "
                f"missing", n, p.samples))
            continue
        for m, figure in ((metric, p.top1), (_METRICS[metric], p.top5)):
            if figure is None or summary.get(m) is None or f"{m}_ci95" not in summary:
                continue
            lo, hi = summary[f"{m}_ci95"]
            applied.append(Fidelity(p.dataset, m, figure, summary[m], lo, hi, tolerance,
                                    lo - tolerance <= figure <= hi + tolerance, p.source))
    if not applied and not any(s.what != IMAGENET_REAL for s in skipped):
        skipped.insert(0, NotApplicable(kind or name, _why_none(summary, kind, name, table),
                                        summary["samples"]))
    return Checked(applied, skipped)


def _why_none(summary: dict, kind: str, name: str, table: list[Published]) -> str:
    """Why no figure of ``table`` names this set for this model."""
    n = summary["samples"]
    if kind == IMAGENET_V2:
        return (f"{n:,} scored; the ImageNet-V2 variant of this set is not known (neither its "
                f"folder name nor jobs.shard --v2-variant said it), and the figures are "
                f"published per variant: reshard with --v2-variant")
    model = summary.get("model_id") or f"weights sha256 {str(summary.get('weights_sha256'))[:12]}"
    if not kind:
        return (f"{n:,} scored by {model}; set {name!r} is no released evaluation set (ImageNet "
                f"val over the 1000 classes, V2, R, A, Sketch) and no --published entry names it")
    others = sorted({p.model for p in table if p.dataset in (kind, name)})
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (f"{n:,} scored; no figure is published for this model ({model}) on {kind}; "
                f"there are for: {shown}")
    return (f"{n:,} scored by {model}; no figure is published for {kind} (add one with "
            f"--published)")
