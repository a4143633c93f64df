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
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline import storage
from pipeline.errors import InputError

TORCHVISION_RESNET18 = "torchvision/resnet18/IMAGENET1K_V1"  # model_id of DEFAULT and IMAGENET1K_V1
TIMM = "timm results/results-*.csv, resnet18.tv_in1k"

# Dataset kinds: what a set is, from its manifest (``dataset_kind``); a published figure applies
# to the whole released set only, hence the sample counts (scored images).
IMAGENET_VAL, IMAGENET_REAL = "imagenet-val", "imagenet-real"
WHOLE_SET_SAMPLES = {IMAGENET_VAL: 50_000, IMAGENET_REAL: 46_837, "imagenet-v2": 10_000,
                     "imagenet-r": 30_000, "imagenet-a": 7_500, "imagenet-sketch": 50_889}


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


BUILTIN = [
    Published(TORCHVISION_RESNET18, IMAGENET_VAL, 69.758, 89.078, 50_000,
              "torchvision ResNet18_Weights.IMAGENET1K_V1.meta"),
    Published(TORCHVISION_RESNET18, IMAGENET_REAL, 77.291, 92.760, 46_837, TIMM),
    Published(TORCHVISION_RESNET18, "imagenet-v2", 57.350, 80.080, 10_000, TIMM),
    Published(TORCHVISION_RESNET18, "imagenet-r", 33.023, 51.143, 30_000, TIMM),
    Published(TORCHVISION_RESNET18, "imagenet-a", 1.120, 16.200, 7_500, TIMM),
    Published(TORCHVISION_RESNET18, "imagenet-sketch", 20.238, 37.258, 50_889, TIMM),
]


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
    robustness sets (imagenet-v2, -r, -a, -sketch), ``imagenet-val`` for a val split over the
    1000 ImageNet classes in any other layout, else ''."""
    from pipeline import sources

    layout = manifest.layout
    if layout in ("imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch"):
        return layout
    if manifest.split == "val" and [c["id"] for c in manifest.classes] == sources.imagenet_wnids():
        return IMAGENET_VAL
    return ""


@dataclass(frozen=True)
class Fidelity:
    """The published figure against the measured one: ``metric`` ("top1" or "real_top1"),
    ``published`` and ``measured`` percent, the measured 95% interval ``lo``-``hi``, the
    ``tolerance`` (percentage points) it was widened by, ``ok``, and the figure's ``source``."""
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


def check(summary: dict, kind: str, name: str, table: list[Published],
          tolerance: float) -> list[Fidelity]:
    """The fidelity checks that apply to one evaluated set: entries of ``table`` whose model is
    the summary's model_id or weights sha256, whose dataset is ``kind`` or the set ``name``, and
    whose sample count (when given) is the number of images scored. ReaL entries
    (``imagenet-real``) apply to an ``imagenet-val`` set scored with ReaL labels."""
    models = {summary.get("model_id"), summary.get("weights_sha256")}
    out = []
    for p in table:
        if p.model not in models:
            continue
        if p.dataset == IMAGENET_REAL and kind == IMAGENET_VAL and "real_samples" in summary:
            metric, n = "real_top1", summary["real_samples"]
        elif p.dataset in (kind, name) and p.dataset != IMAGENET_REAL:
            metric, n = "top1", summary["samples"]
        else:
            continue
        if (p.samples is not None and p.samples != n) or summary.get(metric) is None:
            continue  # a part of the set (or nothing scored): the published figure does not apply
        lo, hi = summary[f"{metric}_ci95"]
        out.append(Fidelity(p.dataset, metric, p.top1, summary[metric], lo, hi, tolerance,
                            lo - tolerance <= p.top1 <= hi + tolerance, p.source))
    return out
