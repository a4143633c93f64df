"""Transfer learning at the cost of one pass: a linear probe and a kNN classifier on cached
embeddings (``jobs.embed``), and the probe written as a model.pt the other jobs take.

* Linear probe: scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial, L2) on the
  standardised D-d features (512 for ResNet-18, the backbone's width for any --model), its inverse regularisation C chosen on a stratified held-out
  part of train and refitted on all of train: CLIP's protocol (Radford et al. 2021, "Learning
  Transferable Visual Models From Natural Language Supervision", appendix A.3), over a grid
  instead of its binary search. The standardisation is folded into the new ``fc``
  (W' = W / sigma, b' = b - W' mu), so ``fc(backbone(x))`` is the probe exactly.
* kNN: DINO's weighted k-nearest neighbours (Caron et al. 2021, "Emerging Properties in
  Self-Supervised Vision Transformers", sec. 4.1 and its eval_knn.py): cosine similarity of
  L2-normalised features, the k = 20 nearest train images vote for their class with weight
  exp(similarity / T), T = 0.07.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline import metrics, model as modellib, storage
from pipeline.errors import InputError

DEFAULT_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass(frozen=True)
class Embeddings:
    """One ``jobs.embed`` output folder, read: ``keys`` [N], ``x`` [N, D] float32, ``y`` [N]
    class indices into ``classes``, and its summary.json (``summary``)."""
    path: str
    keys: np.ndarray
    x: np.ndarray
    y: np.ndarray
    classes: list[dict]
    summary: dict

    @property
    def provenance(self) -> tuple[str, str, str]:
        """(weights sha256, model_id, preset as JSON): what made the vectors."""
        s = self.summary
        return (s.get("weights_sha256") or "", s.get("model_id", ""),
                json.dumps(s.get("preset"), sort_keys=True))


def read_embeddings(path: str) -> Embeddings:
    """A published ``jobs.embed`` folder; InputError naming it when it is not one (a
    ``jobs.predict`` folder, with or without --embeddings, included: its labels are in the
    model's class space) or a vector is not finite."""
    if not storage.is_dir(path):
        raise FileNotFoundError(f"{path} does not exist or is not a folder: pass a jobs.embed "
                                f"output folder")
    summary_path = storage.join(path, "summary.json")
    summary = storage.read_json(summary_path) if storage.exists(summary_path) else None
    if summary is not None and summary.get("rows") != "embeddings" and "top1" in summary:
        raise InputError(f"{path} is a jobs.predict output: its labels are in the model's class "
                         f"space and it may hold no embeddings. Embed the data into a new "
                         f"folder: python -m jobs.embed --data MANIFEST --weights W --out NEW")
    if summary is None or summary.get("rows") != "embeddings":
        raise InputError(f"{path} is no jobs.embed output (no summary.json with \"rows\": "
                         f"\"embeddings\"): make one with python -m jobs.embed --data MANIFEST "
                         f"--weights W --out NEW")
    df = metrics.read_predictions(path, ["key", "label", "embedding"]).sort_values("key")
    if not len(df):
        raise InputError(f"{path} holds no embeddings ({summary.get('failures', 0)} images "
                         f"failed)")
    x = np.stack(df["embedding"].to_numpy()).astype(np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise InputError(f"{path}: {int(bad.sum())} embeddings are not finite (e.g. "
                         f"{df['key'].to_numpy()[bad][0]})")
    return Embeddings(path, df["key"].to_numpy(), x, df["label"].to_numpy(np.int64),
                      summary["classes"], summary)


def check_pair(train: Embeddings, val: Embeddings) -> list[str]:
    """Refuse (InputError) train and val embeddings from different weights or presets, or over
    different class lists; return warnings for what is allowed but limits the figures (classes
    with val images and no train image: the probe can never predict them)."""
    (ts, tm, tp), (vs, vm, vp) = train.provenance, val.provenance
    if (ts, tm) != (vs, vm):
        raise InputError(f"train and val embeddings come from different weights: {train.path} "
                         f"from {tm} (sha256 {ts or 'none'}), {val.path} from {vm} (sha256 "
                         f"{vs or 'none'}): embed both with the same --weights")
    if tp != vp:
        raise InputError(f"train and val embeddings were made at different presets: {tp} "
                         f"({train.path}) vs {vp} ({val.path})")
    if [c["id"] for c in train.classes] != [c["id"] for c in val.classes]:
        raise InputError(f"train and val have different class lists ({len(train.classes)} vs "
                         f"{len(val.classes)} classes): shard val with --classes-from "
                         f"<train manifest>")
    unseen = sorted(set(val.y.tolist()) - set(train.y.tolist()))
    if not unseen:
        return []
    ids = [train.classes[i]["id"] for i in unseen]
    n = int(np.isin(val.y, unseen).sum())
    return [f"{len(unseen)} classes have val images but no train image ({', '.join(ids[:5])}"
            f"{', ...' if len(ids) > 5 else ''}): the probe and kNN can never predict them; "
            f"their {n} val images count as wrong"]


@dataclass
class ProbeResult:
    """What ``fit_probe`` and ``knn`` give: the chosen C, the sweep ({C: held-out top-1 %}),
    why the sweep was skipped (''), val top-1/top-5 % with 95% intervals for the probe and for
    kNN, and warnings."""
    c: float
    sweep: dict = field(default_factory=dict)
    sweep_note: str = ""
    val: dict = field(default_factory=dict)
    knn: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    sigma = x.std(axis=0)
    return mu, np.where(sigma > 1e-12, sigma, 1.0)


def _fit(x, y, c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def fit_probe(train: Embeddings, c_values=DEFAULT_C, holdout_fraction: float = 0.2,
              seed: int = 0, max_iter: int = 1000) -> tuple[torch.nn.Linear, ProbeResult]:
    """The probe as a new head (Linear(D, C_classes), float32) over ``train.classes``, and
    the sweep. C is chosen by top-1 on a stratified ``holdout_fraction`` of train (ties: the
    smaller C, the stronger regularisation), then refitted on all of train. With a single C, or
    a class of fewer than 2 train images (no stratified hold-out), the sweep is skipped and
    says why. Classes with no train image get weight 0 and bias -1e4 (never predicted)."""
    from sklearn.model_selection import train_test_split

    mu, sigma = _standardise(train.x)
    z = (train.x - mu) / sigma
    counts = np.bincount(train.y, minlength=len(train.classes))
    present = counts[counts > 0]
    result = ProbeResult(c=float(c_values[0]))
    if len(c_values) == 1:
        result.sweep_note = "one C given: no sweep"
    elif present.min() < 2:
        result.c = 1.0 if 1.0 in c_values else float(c_values[len(c_values) // 2])
        result.sweep_note = (f"no sweep: a class has {int(present.min())} train image, too "
                             f"few for a stratified hold-out; C = {result.c:g}")
    else:
        n_hold = max(len(present), int(round(holdout_fraction * len(z))))
        a, b, ya, yb = train_test_split(z, train.y, test_size=n_hold, stratify=train.y,
                                        random_state=seed)
        for c in c_values:
            clf = _fit(a, ya, c, max_iter)
            result.sweep[float(c)] = 100.0 * float((clf.predict(b) == yb).mean())
        best = max(result.sweep.values())
        result.c = min(c for c, v in result.sweep.items() if v == best)
        if len(set(result.sweep.values())) == 1:
            result.sweep_note = (f"the sweep could not tell the C values apart (all {best:.1f}% "
                                 f"on a hold-out of {len(yb)} images): C = {result.c:g}, the "
                                 f"strongest regularisation")
    if len(present) == 1:
        raise InputError("train holds images of one class only: nothing to separate")
    clf = _fit(z, train.y, result.c, max_iter)
    head = torch.nn.Linear(train.x.shape[1], len(train.classes))
    w = np.zeros((len(train.classes), train.x.shape[1]), dtype=np.float64)
    b = np.full(len(train.classes), -1e4, dtype=np.float64)
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # sklearn's binary case: one row for class 1 against class 0
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    w[clf.classes_] = coef / sigma  # the standardisation folded into fc
    b[clf.classes_] = intercept - (coef / sigma) @ mu
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    return head, result


def accuracy(scores: torch.Tensor, y: np.ndarray) -> dict:
    """top-1/top-5 % with 95% Wilson intervals from scores [N, C] and labels [N]."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices.numpy()
    n, t1, t5 = len(y), int((top[:, 0] == y).sum()), int((top == y[:, None]).any(axis=1).sum())
    return {"samples": n, "top1": 100.0 * t1 / n, "top1_ci95": metrics.percent_interval(t1, n),
            "top5": 100.0 * t5 / n, "top5_ci95": metrics.percent_interval(t5, n)}


def probe_scores(head: torch.nn.Linear, x: np.ndarray) -> torch.Tensor:
    """The probe's logits [N, C] in float32, as fc computes them in jobs.predict (fp32)."""
    with torch.inference_mode():
        return head(torch.from_numpy(x))


def knn(train: Embeddings, val: Embeddings, k: int = 20, temperature: float = 0.07,
        chunk: int = 1024) -> dict:
    """DINO's weighted kNN: val top-1/top-5 % with 95% intervals and the k used (at most the
    train size). Similarities are computed ``chunk`` val images at a time (memory: chunk x
    N_train floats)."""
    k = min(k, len(train.x))
    tr = torch.nn.functional.normalize(torch.from_numpy(train.x), dim=1)
    ty = torch.tensor(train.y)
    votes = []
    for i in range(0, len(val.x), chunk):
        q = torch.nn.functional.normalize(torch.from_numpy(val.x[i:i + chunk]), dim=1)
        sim, idx = (q @ tr.T).topk(k, dim=1)
        v = torch.zeros(len(q), len(train.classes))
        v.scatter_add_(1, ty[idx], (sim / temperature).exp())
        votes.append(v)
    return {**accuracy(torch.cat(votes), val.y), "k": k, "temperature": temperature}


def build_probe_model(weights: str, head: torch.nn.Linear, classes: list[dict],
                      arch: str = ""):
    """Torchvision model ``arch`` ('': the weights' own, else resnet18) with the backbone of
    ``weights`` and ``head`` as its head (``architectures.head_path``: ResNet's ``fc``)."""
    from pipeline import architectures

    net, _, _ = modellib.build_model(modellib.load_weights(weights, arch), classes)
    architectures.set_head(net, architectures.head_path(net, arch), head)
    return net


def write_report(path: str, record: dict) -> None:
    storage.write_text_atomic(path, json.dumps(record, indent=1, default=float))


def result_dict(result: ProbeResult) -> dict:
    return {**asdict(result), "sweep": {f"{c:g}": v for c, v in result.sweep.items()}}
