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

from pipeline import images, model as modellib, presets, storage
from pipeline.errors import InputError


@dataclass
class Classifier:
    """A loaded model with its class list and preset."""
    net: torch.nn.Module
    classes: list[dict]
    resize_size: int
    crop_size: int
    dtype: torch.dtype


def load(weights: str, precision: str = "fp32") -> Classifier:
    """Load ``weights`` (DEFAULT, IMAGENET1K_V1 or a file naming its classes); raise InputError
    for weights that name no classes (``none``, or a state_dict whose head is not ImageNet's)."""
    loaded = modellib.load_weights(weights)
    if loaded.classes is None:
        raise InputError(f"weights {weights!r} name no classes: give DEFAULT, IMAGENET1K_V1, a "
                         f"model.pt from jobs.finetune, or an ImageNet (1000-class) state_dict")
    net, classes, _ = modellib.build_model(loaded, None)
    preset = loaded.eval_preset
    device = modellib.pick_device(None)
    dtype = modellib.resolve_precision(precision, device)
    net = modellib.for_inference(net, device, dtype)  # as the Predictor runs it: BatchNorm folded
    return Classifier(net, classes, preset.resize_size, preset.crop_size, dtype)


@torch.inference_mode()
def classify(model: Classifier, data: bytes, topk: int = 5) -> list[dict]:
    """Top-``topk`` of one encoded image: [{"index", "id", "name", "probability" (0..1)}],
    most probable first. Raises what ``images.decode_rgb`` raises for a bad file."""
    pixels = presets.eval_image(images.decode_rgb(data), model.resize_size, model.crop_size)
    device = next(model.net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(pixels))[None].to(device)
    probs = model.net(presets.normalize(x, model.dtype)).float().softmax(dim=1)[0]
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
