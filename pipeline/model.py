"""Building ResNet-18 from torchvision weights or a file, and the model.pt format (contract 4
in docs/DESIGN.md).

``weights`` is ``DEFAULT`` / ``IMAGENET1K_V1`` (torchvision's ImageNet weights, from the torch
hub cache or downloaded), ``none`` (random init) or a path: a plain state_dict or this project's
``model.pt``. Every file is loaded with ``torch.load(weights_only=True)``: a weights file can
never run code.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from pipeline import presets, sources, storage
from pipeline.errors import InputError, PipelineError

TORCHVISION_WEIGHTS = {"DEFAULT": ResNet18_Weights.DEFAULT,
                       "IMAGENET1K_V1": ResNet18_Weights.IMAGENET1K_V1}
MODEL_FORMAT = "resnet-pipeline-model"


def imagenet_classes() -> list[dict]:
    """The 1000 ImageNet-1k classes as [{"index", "id", "name"}]: sorted WordNet ids (torchvision's
    output order) with torchvision's short English names (``ResNet18_Weights.DEFAULT.meta``)."""
    return sources.make_classes(sources.imagenet_wnids())


@dataclass(frozen=True)
class LoadedWeights:
    """Weights resolved from a ``--weights`` spec (contract 4 in docs/DESIGN.md).

    ``state_dict`` is None for a random init; ``classes`` ([{"index", "id", "name"}]) is None
    when the weights do not say (a random init, or a bare state_dict whose head is not
    ImageNet's); ``preset`` is the one a model.pt was trained at (None: torchvision's);
    ``sha256`` of the file (None when there is none); ``source`` the spec as given;
    ``guessed_classes``: the classes are ImageNet's because a bare state_dict has a 1000-way head,
    not because the file says so."""
    state_dict: dict | None
    classes: list[dict] | None
    model_id: str
    sha256: str | None = None
    preset: dict | None = None
    config: dict | None = None
    source: str = ""
    guessed_classes: bool = False

    @property
    def eval_preset(self) -> presets.Preset:
        """The ``presets.Preset`` these weights were trained at; torchvision's (resize 256, crop 224
        pixels) where ``preset`` is None, and its defaults for any key ``preset`` lacks."""
        return presets.Preset.from_dict(self.preset)


def load_weights(spec: str) -> LoadedWeights:
    """Resolve ``spec``: DEFAULT/IMAGENET1K_V1 (torchvision's, from the hub cache or
    downloaded), ``none`` (random init) or a file (this project's model.pt or a bare
    state_dict), loaded with ``torch.load(weights_only=True)``. Raises FileNotFoundError for a
    spec that is none of these, InputError for a file that cannot be loaded safely or is neither
    format, PipelineError when torchvision's weights cannot be had (offline)."""
    if spec.lower() == "none":
        return LoadedWeights(None, None, "resnet18-random-init", source=spec)
    if spec.upper() in TORCHVISION_WEIGHTS:
        return _load_torchvision(spec.upper())
    check_weights_spec(spec)
    data = storage.read_bytes(spec)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: that is the point
        raise InputError(f"weights file {spec} cannot be loaded safely "
                         f"(torch.load weights_only=True): {str(e).splitlines()[0]}") from None
    sha = hashlib.sha256(data).hexdigest()
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return LoadedWeights(obj["state_dict"], obj["classes"],
                             obj.get("model_id", os.path.basename(spec)), sha,
                             obj.get("preset"), obj.get("config"), spec)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        fc = obj.get("fc.weight")
        classes = imagenet_classes() if fc is not None and fc.shape[0] == 1000 else None
        return LoadedWeights(obj, classes, os.path.basename(spec), sha, source=spec,
                             guessed_classes=classes is not None)
    raise InputError(f"weights file {spec} is neither a state_dict nor a {MODEL_FORMAT} file")


def check_weights_spec(spec: str) -> None:
    """Without loading anything: FileNotFoundError unless ``spec`` is DEFAULT, IMAGENET1K_V1,
    none or an existing file (what a job checks before Ray starts)."""
    if spec.lower() != "none" and spec.upper() not in TORCHVISION_WEIGHTS \
            and not storage.exists(spec):
        raise FileNotFoundError(f"weights {spec!r}: not DEFAULT, IMAGENET1K_V1, none, nor an "
                                f"existing file")


def _load_torchvision(spec: str) -> LoadedWeights:
    weights = TORCHVISION_WEIGHTS[spec]
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise PipelineError(f"could not get torchvision weights {spec} ({weights.url}): {e}. "
                           f"Offline, copy that file to {cache}, or pass --weights PATH: a "
                           f"state_dict or a model.pt, e.g. DIR/runs/demo/model.pt, which "
                           f"`python -m jobs.demo` trains and prints as \"model\" (every "
                           f"job takes one; jobs.predict, embed, finetune and nightly_eval "
                           f"also take --weights none, a random init)") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    sha = storage.sha256_file(path) if os.path.exists(path) else None
    return LoadedWeights(state_dict, imagenet_classes(), f"torchvision/resnet18/{weights.name}",
                         sha, source=spec)


def build_model(weights: LoadedWeights, classes: list[dict] | None
                ) -> tuple[nn.Module, list[dict], bool]:
    """ResNet-18 with ``weights`` loaded; the head is replaced by ``nn.Linear(512, C)`` when the
    data's classes differ from the weights' classes. Returns (model, classes, head_replaced)."""
    w_classes = weights.classes
    state = weights.state_dict
    if state is not None and w_classes is None:
        n = state["fc.weight"].shape[0] if "fc.weight" in state else 0
        # A bare state_dict names no classes: a head of the data's size is taken to be in the
        # data's (sorted-id) order, which is how this project numbers classes.
        w_classes = classes if classes and len(classes) == n else \
            [{"index": i, "id": str(i), "name": str(i)} for i in range(n)]
    target = classes or w_classes
    if target is None:
        raise InputError("random-init weights need the data's class list")
    model = resnet18(num_classes=len(w_classes) if state is not None else len(target))
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"weights {weights.source or weights.model_id} do not fit "
                             f"ResNet-18 with "
                             f"{len(w_classes)} classes: {str(e).splitlines()[-1].strip()}") from None
    replaced = state is not None and [c["id"] for c in target] != [c["id"] for c in w_classes]
    if replaced:
        model.fc = nn.Linear(model.fc.in_features, len(target))
    return model, target, replaced


def for_inference(model: nn.Module, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """``model`` ready for prediction: eval mode, every BatchNorm folded into the convolution
    before it, on ``device`` in ``dtype`` and channels_last. Returns a new module (a
    ``torch.fx.GraphModule``); ``model`` is left as it was.

    Folding uses ``torch.fx.experimental.optimization.fuse`` (conv weight scaled by
    gamma / sqrt(var + eps), the BatchNorm's shift moved into the conv bias), done in fp32 before
    the cast: the same function in exact arithmetic, one rounding fewer per layer in bf16.
    Measured on 2 CPU cores (2026-11-29, ResNet-18, batch 32, bf16, channels_last): 142 -> 181
    images/s, the 20 BatchNorm passes over each activation gone. A model that fx cannot trace
    (not ResNet-18's case) is used unfolded."""
    import copy
    import logging

    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval().float()
    try:
        model = fuse(model)
    except Exception as e:  # tracing limits of torch.fx: keep the model as it is, say so
        logging.getLogger(__name__).warning("BatchNorm not folded (%s: %s); predicting with "
                                            "the model unfolded", type(e).__name__, e)
    return model.to(device, dtype, memory_format=torch.channels_last)


EMBEDDING_DIM = 512  # ResNet-18's pooled feature: fc.in_features


def split_for_inference(model: nn.Module, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """``model`` as (backbone, head), both ready for prediction (``for_inference``): the
    backbone maps a normalised batch [N, 3, H, W] to the pooled, flattened feature [N, 512]
    (the output of ``avgpool`` before ``fc``: the image's embedding), the head (``fc``) maps
    that to logits [N, C]. ``head(backbone(x))`` is ``model(x)``: the same operations."""
    import copy

    trunk = copy.deepcopy(model)
    trunk.fc = nn.Identity()
    head = copy.deepcopy(model.fc).eval().float().to(device, dtype)
    return for_inference(trunk, device, dtype), head


def save_model(path: str, model: nn.Module, classes: list[dict], preset: dict, config: dict,
               model_id: str) -> str:
    """Write model.pt (state_dict, classes, preset, config); return its sha256."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": MODEL_FORMAT, "state_dict": state, "classes": classes,
                "preset": preset, "config": config, "model_id": model_id}, buf)
    storage.write_bytes_atomic(path, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def pick_device(use_gpu: bool | None = None) -> torch.device:
    """``cuda`` (the current GPU) when ``use_gpu`` (None: whenever CUDA is available) and CUDA is
    available, else ``cpu``: asking for a GPU where there is none falls back to the CPU silently."""
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` ("auto", "fp32", "bf16", "fp16") on ``device``.
    auto: bf16 where the hardware runs it natively (CUDA with bf16, oneDNN CPUs with bf16:
    AVX-512 bf16 or AMX; ``machine.native_cpu_bf16``, which RESNET_PIPELINE_CPU_BF16=0 turns
    off), fp16 on CUDA GPUs without bf16, fp32 otherwise. Raises KeyError for another name."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        from pipeline import machine

        return torch.bfloat16 if machine.native_cpu_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype) -> str:
    """The short name of a dtype as ``--precision`` spells it and outputs record it (float32 ->
    ``fp32``, bfloat16 -> ``bf16``, float16 -> ``fp16``); KeyError for any other dtype."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
