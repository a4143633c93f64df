"""A linear probe and a kNN classifier on cached embeddings (jobs.embed): the standard, cheap
first try of a backbone's features on a new task, written as a model.pt the other jobs take."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import architectures, model as modellib, probe, storage
from pipeline.errors import InputError, UsageError


@dataclass(frozen=True)
class ProbeConfig:
    """Fit a linear probe (scikit-learn LogisticRegression, L-BFGS, C chosen on a held-out part
    of train, CLIP's protocol) and DINO's weighted kNN (cosine, k=20, T=0.07) on the embeddings
    of a train and a val folder from jobs.embed; print val top-1/top-5 with 95% intervals for
    both; write OUT (model.pt: the backbone of --weights with the probe as its fc, taken as is
    by jobs.predict, jobs.nightly_eval and jobs.classify) and OUT's probe.json (the sweep, the
    figures, the provenance). No Ray: it runs where it is started (memory: ~2 KB per image)."""
    train: str = _cli.option("", "train embeddings: a jobs.embed output folder", required=True)
    val: str = _cli.option("", "val embeddings: a jobs.embed output folder (same weights, "
                               "preset and class list as train)", required=True)
    weights: str = _cli.option("", "the weights the embeddings were made with (checked by "
                                   "sha256): DEFAULT, a member of the model's weights enum "
                                   "(IMAGENET1K_V1, ...) or a file", required=True)
    model: str = _cli.option("", "the torchvision model the embeddings were made with (empty: "
                                 "what their summary.json records)")
    out: str = _cli.option("", "the model.pt to write (probe.json beside it)", required=True)
    c: str = _cli.option(",".join(f"{c:g}" for c in probe.DEFAULT_C),
                         "inverse L2 regularisation strengths to sweep, comma-separated (one "
                         "value: no sweep)")
    holdout_fraction: float = _cli.option(0.2, "fraction of train held out (stratified) to "
                                               "choose C; the probe is then refitted on all")
    knn_k: int = _cli.option(20, "neighbours of the kNN vote")
    knn_temperature: float = _cli.option(0.07, "temperature of the kNN vote weights "
                                               "exp(similarity / T)")
    max_iter: int = _cli.option(1000, "L-BFGS iterations per fit")
    seed: int = _cli.option(0, "seed of the hold-out split")
    overwrite: bool = _cli.option(False, "replace an existing OUT")


def _c_values(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--c {text!r}: comma-separated numbers, e.g. 0.1,1,10") from None
    if not values or min(values) <= 0:
        raise UsageError(f"--c {text!r}: one or more positive numbers")
    return values


def _check_weights(spec: str, train: probe.Embeddings, arch: str) -> None:
    """InputError unless ``spec`` names the weights the embeddings were made with (by model
    ``arch``): by model id for torchvision's (before anything is downloaded), by the file's
    sha256 otherwise."""
    sha, model_id = train.provenance[0], train.provenance[1]
    made_with = f"sha256 {sha or 'none'}, {model_id}"
    if spec.lower() == "none":
        raise InputError("--weights none: the probe stores the backbone in model.pt and checks "
                         "it by sha256; embed with a weights file (a saved random init too)")
    named = architectures.torchvision_weights(arch, spec)
    if named is not None:
        if model_id != architectures.model_id(arch, named):
            raise InputError(f"--weights {spec} are not the weights the embeddings were made "
                             f"with ({made_with})")
        return
    modellib.check_weights_spec(spec, arch)
    if storage.sha256_file(spec) != sha:
        raise InputError(f"--weights {spec} (sha256 {storage.sha256_file(spec)}) are not the "
                         f"weights the embeddings were made with ({made_with})")


def _line(name: str, r: dict) -> str:
    return (f"{name:<14} top-1 {r['top1']:6.2f}% (95% CI {r['top1_ci95'][0]:.2f}-"
            f"{r['top1_ci95'][1]:.2f})   top-5 {r['top5']:6.2f}% (95% CI "
            f"{r['top5_ci95'][0]:.2f}-{r['top5_ci95'][1]:.2f})   n={r['samples']}")


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(ProbeConfig, argv, "probe")
    c_values = _c_values(cfg.c)
    if cfg.knn_k < 1 or cfg.knn_temperature <= 0:
        raise UsageError("--knn-k must be at least 1 and --knn-temperature above 0")
    if storage.exists(cfg.out) and not cfg.overwrite:
        raise UsageError(f"{cfg.out} exists: pass --overwrite to replace it, or another --out")
    train, val = probe.read_embeddings(cfg.train), probe.read_embeddings(cfg.val)
    warnings = probe.check_pair(train, val)
    # the model the embeddings were made with (summary.json's arch; before it: resnet18)
    arch = train.summary.get("arch") or architectures.DEFAULT_MODEL
    if cfg.model and cfg.model != arch:
        raise UsageError(f"--model {cfg.model}: the embeddings of {cfg.train} were made with "
                         f"{arch}; drop --model or give --model {arch}")
    _check_weights(cfg.weights, train, arch)

    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    head, result = probe.fit_probe(train, c_values, cfg.holdout_fraction, cfg.seed, cfg.max_iter)
    result.warnings = warnings
    result.val = probe.accuracy(probe.probe_scores(head, val.x), val.y)
    result.knn = probe.knn(train, val, cfg.knn_k, cfg.knn_temperature)
    net = probe.build_probe_model(cfg.weights, head, train.classes, arch)
    name = storage.basename(storage.dirname(cfg.out)) or "probe"
    config = {k: v for k, v in _cli.to_dict(cfg).items() if k != "overwrite"}
    sha = modellib.save_model(cfg.out, net, train.classes, train.summary["preset"], config,
                              f"{arch}-probe/{name}", arch=arch)
    report = storage.join(storage.dirname(cfg.out), "probe.json")
    probe.write_report(report, {**probe.result_dict(result), "model": cfg.out,
                                "model_sha256": sha, "weights_sha256": train.provenance[0],
                                "model_id": train.provenance[1],
                                "train_samples": len(train.y), "classes": len(train.classes),
                                "config": _cli.to_dict(cfg)})
    sweep = ", ".join(f"C={c:g}: {v:.1f}%" for c, v in result.sweep.items())
    print(f"C = {result.c:g} ({'held-out top-1 ' + sweep if sweep else result.sweep_note})")
    if sweep and result.sweep_note:
        print(f"warning: {result.sweep_note}", file=sys.stderr)
    print(_line("linear probe", result.val))
    print(_line(f"kNN (k={result.knn['k']})", result.knn))
    shown = [p if "://" in p else os.path.abspath(p) for p in (cfg.out, report)]  # alike
    print(f"model: {shown[0]} (sha256 {sha[:12]}), report: {shown[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
