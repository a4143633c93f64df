"""Classify image files with ResNet-18: each image's top-k class names and probabilities.

The seed's first step, without Ray: the same weights loading (``model.load_weights``), decoding
(``images.decode_rgb``) and eval preset (``presets.eval_image``) as the pipeline's jobs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from jobs import _cli
from pipeline import architectures


@dataclass(frozen=True)
class ClassifyConfig:
    """Print the top-k classes of each image (name, wnid or class id, probability), through the
    pipeline's own preset and model loading. DEFAULT/IMAGENET1K_V1 name the 1000 ImageNet classes;
    a model.pt from jobs.finetune names its own. A file that cannot be read or decoded gets one
    line on stderr; the others are still classified, and the exit status is then 1."""
    images: tuple = _cli.positional("image files (any format PIL reads)", "IMAGE")
    weights: str = _cli.option("DEFAULT", "DEFAULT, a member of the model's weights enum "
                                          "(IMAGENET1K_V1, ...), or a file (model.pt from "
                                          "jobs.finetune, or a state_dict: an ImageNet one, or "
                                          "any other with --classes-from)")
    model: str = _cli.option("", architectures.MODEL_HELP)
    topk: int = _cli.option(5, "classes printed per image")
    json: bool = _cli.option(False, "one JSON object per image (JSON Lines) instead of text")
    precision: str = _cli.option("fp32", "fp32, or bf16 where the CPU/GPU runs it",
                                 choices=["fp32", "bf16"])
    classes_from: str = _cli.option("", "class names for weights that carry none (a state_dict "
                                        "trained elsewhere): a jobs.shard manifest, or a text "
                                        "file with one name per line in the head's order")
    device: str = _cli.option("auto", "auto (the GPU when there is one), cpu or cuda",
                              choices=["auto", "cpu", "cuda"])


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = _cli.parse(ClassifyConfig, argv, "classify")
    if cfg.topk < 1:
        _cli.fail("--topk must be at least 1")
    from pipeline import classify

    # bad weights or class list: one line, exit 1
    model = classify.load(cfg.weights, cfg.precision, cfg.classes_from, cfg.device, cfg.model)
    failed = 0
    for path, result in classify.classify_files(model, cfg.images, cfg.topk):
        if isinstance(result, Exception):
            failed += 1
            print(f"error: {path}: {result}", file=sys.stderr)
        elif cfg.json:
            print(json.dumps({"image": path, "top": result}))
        else:
            print(path)
            for r in result:
                print(f"  {r['probability'] * 100:6.2f}%  {r['name']} ({r['id']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
