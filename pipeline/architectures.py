"""Which torchvision classifier a job runs (``--model NAME``): how it is built, where its head
is, how wide its embedding is, and its weights' own eval preset and published figures.

NAME is any name of ``torchvision.models.list_models(module=torchvision.models)``: ResNets,
EfficientNets, ConvNeXts, ViTs, MobileNets, RegNets, Swin and the rest. The head is the model's
last ``nn.Linear`` (``fc`` for ResNet and RegNet, ``classifier[-1]`` for EfficientNet,
MobileNet and ConvNeXt, ``heads.head`` for ViT, ``head`` for Swin); the embedding is that
layer's input: the pooled feature a linear probe or kNN reads (512 for ResNet-18, 2048 for
ResNet-50, 768 for ConvNeXt-T and ViT-B/16, 1280 for EfficientNet-B0 and MobileNetV3-L). A
model without a linear head (SqueezeNet's is a convolution) is refused.

The preset and the ImageNet-1K figures come from the weights enum torchvision ships with each
model (``weights.transforms()``, ``weights.meta["_metrics"]["ImageNet-1K"]``); a random init
takes the preset of the model's DEFAULT weights. Nothing here downloads anything.
"""

from __future__ import annotations

import difflib
import functools

from pipeline.errors import InputError, UsageError

DEFAULT_MODEL = "resnet18"
MODEL_HELP = ("torchvision classification model: any name of torchvision.models.list_models() "
              "(resnet50, efficientnet_b0, convnext_tiny, vit_b_16, mobilenet_v3_large, ...); "
              "empty: a model.pt's own, else resnet18")
# built as torchvision's builders leave them with their pretrained weights: without the
# auxiliary classifiers (training-time only; the builder drops them) and with transform_input
# (the weights expect it: a fixed re-normalisation of the input)
_NO_AUX = ("googlenet", "inception_v3")


@functools.lru_cache(maxsize=None)
def names() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted."""
    import torchvision.models as tvm

    return tuple(sorted(tvm.list_models(module=tvm)))


def check_name(name: str) -> str:
    """``name`` if it is a torchvision classification model; else UsageError naming the closest
    names (``--model resnet` -> resnet18, resnet34, resnet50``)."""
    if name in names():
        return name
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.5) or [
        n for n in names() if n.startswith(name[:4])][:3]
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UsageError(f"--model {name}: not a torchvision classification model{hint} "
                     f"(all {len(names())}: torchvision.models.list_models())")


def weights_enum(name: str):
    """The torchvision weights enum of model ``name`` (``ResNet50_Weights``)."""
    import torchvision.models as tvm

    return tvm.get_model_weights(check_name(name))


def torchvision_weights(name: str, spec: str):
    """The weights enum member ``spec`` names for model ``name`` (DEFAULT, or a member name such
    as IMAGENET1K_V2, any case), or None when ``spec`` names none (a file, or ``none``)."""
    enum = weights_enum(name)
    key = spec.upper()
    if key == "DEFAULT":
        return enum.DEFAULT
    return enum[key] if key in enum.__members__ else None


def weight_names(name: str) -> list[str]:
    """DEFAULT and the member names of model ``name``'s weights enum."""
    return ["DEFAULT", *(w.name for w in weights_enum(name))]  # iteration skips aliases


def build(name: str, num_classes: int):
    """Model ``name`` with random init and a ``num_classes``-way head (torch's default init)."""
    import torchvision.models as tvm

    extra = ({"aux_logits": False, "init_weights": False, "transform_input": True}
             if name in _NO_AUX else {})
    return tvm.get_model(check_name(name), weights=None, num_classes=num_classes, **extra)


def head_path(model, name: str = "") -> str:
    """The dotted module name of ``model``'s head: its last ``nn.Linear`` (``fc``,
    ``classifier.3``, ``heads.head``). InputError when it has none (``name`` for the message)."""
    from torch import nn

    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise InputError(f"--model {name or type(model).__name__}: no linear head (its classifier "
                         f"is not an nn.Linear): not supported")
    return linear[-1]


@functools.lru_cache(maxsize=None)
def head_key(name: str) -> str:
    """``head_path`` of model ``name``, found on a model built on the meta device (no memory,
    no init cost): the state_dict prefix of its head."""
    import torch

    try:
        with torch.device("meta"):
            return head_path(build(name, 2), name)
    except NotImplementedError:  # a builder that reads tensor values (RegNet): on the CPU
        return head_path(build(name, 2), name)


def get_head(model, path: str):
    """The module at dotted ``path`` (``classifier.3``)."""
    return model.get_submodule(path)


def set_head(model, path: str, module) -> None:
    """Put ``module`` at dotted ``path`` of ``model`` (an ``nn.Sequential`` index included)."""
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if leaf.isdigit():
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


def embedding_dim(model) -> int:
    """The width of ``model``'s embedding: its head's input features."""
    return get_head(model, head_path(model)).in_features


def preset_of(weights) -> dict:
    """The eval preset (``presets.Preset`` fields) of a torchvision weights enum member, from its
    own ``transforms()``: resize, crop, interpolation, antialias, mean and std."""
    t = weights.transforms()
    return {"resize_size": int(t.resize_size[0]), "crop_size": int(t.crop_size[0]),
            "interpolation": t.interpolation.value, "antialias": bool(t.antialias),
            "mean": list(t.mean), "std": list(t.std)}


def default_preset(name: str) -> dict:
    """The preset of model ``name``'s DEFAULT weights (what a random init is evaluated at)."""
    return preset_of(weights_enum(name).DEFAULT)


def model_id(name: str, weights) -> str:
    """The model id of torchvision weights, ``torchvision/<name>/<member>`` (the fidelity
    guard's key: ``published.torchvision_figures``)."""
    return f"torchvision/{name}/{weights.name}"


def imagenet_figures() -> list[tuple[str, float, float | None, str]]:
    """(model id, top-1 %, top-5 %, source) of every torchvision classification weights with an
    ImageNet-1K figure in its meta (``weights.meta["_metrics"]["ImageNet-1K"]``)."""
    out = []
    for name in names():
        enum = weights_enum(name)
        for w in enum:
            figures = w.meta.get("_metrics", {}).get("ImageNet-1K", {})
            if "acc@1" in figures:
                out.append((model_id(name, w), float(figures["acc@1"]),
                            None if figures.get("acc@5") is None else float(figures["acc@5"]),
                            f"torchvision {type(w).__name__}.{w.name}.meta"))
    return out
