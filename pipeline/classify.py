"""Classifying single image files, without Ray: the library behind ``jobs.classify``.

The same weights loading (``model.load_weights``, ``model.build_model``), decoding
(``images.decode_rgb``), eval preset (``presets.eval_image``, then ``presets.normalize``) and
model (``model.for_inference``: BatchNorm folded) as the batch jobs, so a file classified here
gets the probabilities ``jobs.predict`` would give it (a test holds them to 1e-5 in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline import architectures, images, model as modellib, presets, storage
from pipeline.errors import InputError


@dataclass
class Classifier:
    """A loaded model with its class list and preset."""
    net: torch.nn.Module
    classes: list[dict]
    preset: presets.Preset
    dtype: torch.dtype


def load(weights: str, precision: str = "fp32", classes_from: str = "",
         device: str = "auto", model: str = "") -> Classifier:
    """Load ``weights`` (DEFAULT, a member of torchvision model ``model``'s weights enum ('': a
    model.pt's own, else resnet18), a model.pt, or a state_dict) on ``device``
    ("auto": the GPU when there is one, "cpu", "cuda"). ``classes_from`` (a jobs.shard manifest
    or a text file, ``read_class_list``) names the classes of weights that name none (a
    state_dict trained elsewhere). InputError for weights that name no classes and no
    ``classes_from``, a class list whose length is not the head's, a list that contradicts the
    classes a model.pt or torchvision's weights name, and ``device="cuda"`` without a GPU."""
    loaded = modellib.load_weights(weights, model)
    if loaded.state_dict is None:
        raise InputError(f"weights {weights!r} are a random init: nothing to classify with")
    head = f"{architectures.head_key(loaded.arch)}.weight"
    if head not in loaded.state_dict:
        raise InputError(f"weights {weights!r} hold no {head}: not a {loaded.arch} state_dict")
    if classes_from:
        loaded = _with_classes(loaded, read_class_list(classes_from), weights, classes_from)
    if loaded.classes is None:
        raise InputError(f"weights {weights!r} name no classes: pass --classes-from (a jobs.shard "
                         f"manifest or a text file of class names, one per line, in the head's "
                         f"order), or give DEFAULT, IMAGENET1K_V1 or a model.pt from jobs.finetune")
    net, classes, _ = modellib.build_model(loaded, None)
    preset = loaded.eval_preset
    dev = _device(device)
    dtype = modellib.resolve_precision(precision, dev)
    net = modellib.for_inference(net, dev, dtype)  # as the Predictor runs it: BatchNorm folded
    return Classifier(net, classes, preset, dtype)


def read_class_list(path: str) -> list[dict]:
    """Classes [{"index", "id", "name"}] from a jobs.shard manifest (its class list) or a text
    file of class names, one per line in the head's output order (blank lines ignored; the name
    is also the id). FileNotFoundError when missing; InputError naming the file for a JSON file
    that is no manifest, an empty list or a repeated name."""
    import json

    from pipeline import shards

    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--classes-from {path}: no such file") from None
    try:
        json.loads(text)
    except ValueError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise InputError(f"--classes-from {path}: no class names in it") from None
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(f"--classes-from {path}: class names repeated: "
                             f"{', '.join(repeated[:5])}") from None
        return [{"index": i, "id": n, "name": n} for i, n in enumerate(names)]
    return shards.load_manifest(path).classes


def _with_classes(loaded, classes: list[dict], weights: str, path: str):
    """``loaded`` naming ``classes``: the head must have one output per class, and weights that
    name their own classes (a model.pt, torchvision's) must name these."""
    import dataclasses

    head = loaded.state_dict.get(f"{architectures.head_key(loaded.arch)}.weight")
    n = 0 if head is None else head.shape[0]
    if n != len(classes):
        raise InputError(f"--classes-from {path} lists {len(classes)} classes; the head of "
                         f"weights {weights!r} has {n} outputs")
    if loaded.classes is not None and not loaded.guessed_classes and \
            [c["id"] for c in loaded.classes] != [c["id"] for c in classes]:
        raise InputError(f"weights {weights!r} name their own {len(loaded.classes)} classes, "
                         f"and --classes-from {path} names others; drop --classes-from")
    return dataclasses.replace(loaded, classes=classes, guessed_classes=False)


def _device(name: str) -> torch.device:
    """``torch.device`` for --device auto/cpu/cuda; InputError for cuda without a GPU."""
    if name == "auto":
        return modellib.pick_device(None)
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: one of auto, cpu, cuda")
    return torch.device(name)


@torch.inference_mode()
def classify(model: Classifier, data: bytes, topk: int = 5) -> list[dict]:
    """Top-``topk`` of one encoded image: [{"index", "id", "name", "probability" (0..1)}],
    most probable first. Raises what ``images.decode_rgb`` raises for a bad file."""
    p = model.preset
    pixels = presets.eval_image(images.decode_rgb(data), p.resize_size, p.crop_size,
                                p.interpolation)
    device = next(model.net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(pixels))[None].to(device)
    probs = model.net(presets.normalize(x, model.dtype, p.mean, p.std)).float().softmax(dim=1)[0]
    p, i = probs.topk(min(topk, len(model.classes)))
    return [{"index": int(k), "id": model.classes[int(k)]["id"],
             "name": model.classes[int(k)]["name"], "probability": float(v)}
            for v, k in zip(p.cpu(), i.cpu())]


def classify_files(model: Classifier, paths, topk: int = 5
                   ) -> Iterator[tuple[str, list[dict] | Exception]]:
    """(path, top-k list) per file, or (path, the exception) for a file that cannot be read or
    decoded: one bad file never stops the others. Programming errors still raise."""
    from PIL import UnidentifiedImageError

    from pipeline.data import DATA_ERRORS

    for path in paths:
        try:
            yield path, classify(model, storage.read_bytes(path), topk)
        except FileNotFoundError:
            yield path, FileNotFoundError("no such file")
        except UnidentifiedImageError:
            yield path, ValueError("not an image (PIL cannot identify it)")
        except DATA_ERRORS as e:  # OSError also covers a folder or an unreadable file
            yield path, ValueError(f"cannot read or decode ({type(e).__name__}: {e})")
