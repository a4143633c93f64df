"""Building a torchvision classifier (ResNet-18 by default; ``--model NAME``:
``pipeline.architectures``) from torchvision weights or a file, and the model.pt format
(contract 4 in docs/DESIGN.md).

``weights`` is ``DEFAULT`` or a member of the model's weights enum (``IMAGENET1K_V1``,
``IMAGENET1K_V2``: torchvision's ImageNet weights, from the torch hub cache or downloaded),
``none`` (random init) or a path: a plain state_dict or this project's ``model.pt``, which
records its architecture. Every file is loaded with ``torch.load(weights_only=True)``: a weights
file can never run code.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import architectures as archlib, presets, sources, storage
from pipeline.errors import InputError, PipelineError

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
    not because the file says so; ``arch``: the torchvision model name (``--model``)."""
    state_dict: dict | None
    classes: list[dict] | None
    model_id: str
    sha256: str | None = None
    preset: dict | None = None
    config: dict | None = None
    source: str = ""
    guessed_classes: bool = False
    arch: str = archlib.DEFAULT_MODEL

    @property
    def eval_preset(self) -> presets.Preset:
        """The ``presets.Preset`` these weights were trained at: a model.pt's own, torchvision
        weights' ``transforms()``, else the model's DEFAULT weights' (ResNet-18: resize 256,
        crop 224, bilinear); presets' defaults for any key the preset lacks."""
        return presets.Preset.from_dict(self.preset or archlib.default_preset(self.arch))


def load_weights(spec: str, model: str = "") -> LoadedWeights:
    """Resolve ``spec`` for torchvision model ``model`` ('': a model.pt's own, else
    ``architectures.DEFAULT_MODEL``, resnet18): DEFAULT or a member of the model's weights enum
    (torchvision's, from the hub cache or downloaded), ``none`` (random init) or a file (this
    project's model.pt or a bare state_dict), loaded with ``torch.load(weights_only=True)``.
    Raises UsageError for an unknown ``model`` and for a model.pt of another architecture than
    ``model``, FileNotFoundError for a spec that is none of these, InputError for a file that
    cannot be loaded safely or is neither format, PipelineError when torchvision's weights
    cannot be had (offline)."""
    arch = archlib.check_name(model) if model else archlib.DEFAULT_MODEL
    if spec.lower() == "none":
        return LoadedWeights(None, None, f"{arch}-random-init", source=spec, arch=arch)
    named = archlib.torchvision_weights(arch, spec)
    if named is not None:
        return _load_torchvision(arch, named, spec)
    check_weights_spec(spec, arch)
    data = storage.read_bytes(spec)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: that is the point
        raise InputError(f"weights file {spec} cannot be loaded safely "
                         f"(torch.load weights_only=True): {str(e).splitlines()[0]}") from None
    sha = hashlib.sha256(data).hexdigest()
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        saved = obj.get("arch", archlib.DEFAULT_MODEL)  # files from before --model: ResNet-18
        if model and saved != arch:
            from pipeline.errors import UsageError

            raise UsageError(f"--model {model}: {spec} is a {saved} model.pt; drop --model (a "
                             f"model.pt names its own) or give --model {saved}")
        return LoadedWeights(obj["state_dict"], obj["classes"],
                             obj.get("model_id", os.path.basename(spec)), sha,
                             obj.get("preset"), obj.get("config"), spec, arch=saved)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        head = obj.get(f"{archlib.head_key(arch)}.weight")
        classes = imagenet_classes() if head is not None and head.shape[0] == 1000 else None
        return LoadedWeights(obj, classes, os.path.basename(spec), sha, source=spec,
                             guessed_classes=classes is not None, arch=arch)
    raise InputError(f"weights file {spec} is neither a state_dict nor a {MODEL_FORMAT} file")


def check_weights_spec(spec: str, model: str = "") -> None:
    """Without loading anything: FileNotFoundError unless ``spec`` is DEFAULT, a member of
    ``model``'s weights enum (default resnet18: IMAGENET1K_V1), none or an existing file (what a
    job checks before Ray starts); UsageError for an unknown ``model``."""
    arch = archlib.check_name(model) if model else archlib.DEFAULT_MODEL
    if spec.lower() != "none" and archlib.torchvision_weights(arch, spec) is None \
            and not storage.exists(spec):
        raise FileNotFoundError(f"weights {spec!r}: not {', '.join(archlib.weight_names(arch))}, "
                                f"none, nor an existing file")


def _load_torchvision(arch: str, weights, spec: str) -> LoadedWeights:
    import torchvision.models as tvm

    try:
        # through the model's own builder, which adapts its files (googlenet and inception_v3
        # drop their aux heads and set transform_input; densenet renames old keys)
        state_dict = tvm.get_model(arch, weights=weights, progress=False).state_dict()
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
    return LoadedWeights(state_dict, imagenet_classes(), archlib.model_id(arch, weights),
                         sha, preset=archlib.preset_of(weights), source=spec, arch=arch)


def build_model(weights: LoadedWeights, classes: list[dict] | None
                ) -> tuple[nn.Module, list[dict], bool]:
    """Model ``weights.arch`` with ``weights`` loaded; its head (``architectures.head_path``) is
    replaced by a new ``nn.Linear(D, C)`` when the data's classes differ from the weights'.
    Returns (model, classes, head_replaced). InputError naming the first tensor that does not
    fit when the state_dict is not of this architecture."""
    arch = weights.arch
    w_classes = weights.classes
    state = weights.state_dict
    if state is not None and w_classes is None:
        key = f"{archlib.head_key(arch)}.weight"
        # no head of this model in the file: built at any size, the misfit check names why
        n = state[key].shape[0] if key in state else max(1, len(classes or ()))
        # A bare state_dict names no classes: a head of the data's size is taken to be in the
        # data's (sorted-id) order, which is how this project numbers classes.
        w_classes = classes if classes and len(classes) == n else \
            [{"index": i, "id": str(i), "name": str(i)} for i in range(n)]
    target = classes or w_classes
    if target is None:
        raise InputError("random-init weights need the data's class list")
    model = archlib.build(arch, len(w_classes) if state is not None else len(target))
    path = archlib.head_path(model, arch)  # InputError for a model without a linear head
    if state is not None:
        try:
            model.load_state_dict(state)  # tolerates what torch does (no num_batches_tracked)
        except RuntimeError as e:
            misfit = _first_misfit(model.state_dict(), state) or str(e).splitlines()[-1].strip()
            raise InputError(f"weights {weights.source or weights.model_id} do not fit "
                             f"{arch} with {len(w_classes)} classes: {misfit}") from None
    replaced = state is not None and [c["id"] for c in target] != [c["id"] for c in w_classes]
    if replaced:
        archlib.set_head(model, path, nn.Linear(archlib.get_head(model, path).in_features,
                                                len(target)))
    return model, target, replaced


def _first_misfit(expected: dict, given: dict) -> str:
    """'' when ``given`` (a state_dict) fits ``expected`` key for key and shape for shape; else
    the first tensor that does not, in the model's order (a missing BatchNorm
    ``num_batches_tracked`` counts for nothing, as in ``load_state_dict``)."""
    for key, tensor in expected.items():
        if key.endswith("num_batches_tracked") and key not in given:
            continue
        if key not in given:
            return f"tensor {key} {tuple(tensor.shape)} is missing"
        if tuple(given[key].shape) != tuple(tensor.shape):
            return (f"tensor {key} is {tuple(given[key].shape)} in the file, "
                    f"{tuple(tensor.shape)} in the model")
    extra = [k for k in given if k not in expected]
    return f"tensor {extra[0]} is not in the model" if extra else ""


def for_inference(model: nn.Module, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """``model`` ready for prediction: eval mode, every BatchNorm folded into the convolution
    before it, on ``device`` in ``dtype`` and channels_last. Returns a new module (a
    ``torch.fx.GraphModule`` where BatchNorm was folded, else a copy); ``model`` is left as it
    was.

    Folding uses ``torch.fx.experimental.optimization.fuse`` (conv weight scaled by
    gamma / sqrt(var + eps), the BatchNorm's shift moved into the conv bias), done in fp32 before
    the cast: the same function in exact arithmetic, one rounding fewer per layer in bf16.
    Measured on 2 CPU cores (2026-11-29, ResNet-18, batch 32, bf16, channels_last): 142 -> 181
    images/s, the 20 BatchNorm passes over each activation gone. A model without BatchNorm
    (ConvNeXt, ViT, Swin) has nothing to fold; one that fx cannot trace is used unfolded, with
    a warning."""
    import copy
    import logging

    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval().float()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model.to(device, dtype, memory_format=torch.channels_last)
    try:
        model = fuse(model)
    except Exception as e:  # tracing limits of torch.fx: keep the model as it is, say so
        logging.getLogger(__name__).warning("BatchNorm not folded (%s: %s); predicting with "
                                            "the model unfolded", type(e).__name__, e)
    return model.to(device, dtype, memory_format=torch.channels_last)


EMBEDDING_DIM = 512  # ResNet-18's pooled feature: fc.in_features (others: embedding_dim)


def split_for_inference(model: nn.Module, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """``model`` as (backbone, head), both ready for prediction (``for_inference``): the
    backbone maps a normalised batch [N, 3, H, W] to the embedding [N, D], the input of the
    model's last linear layer (``architectures.head_path``: ResNet-18's pooled feature before
    ``fc``, D = 512), the head maps that to logits [N, C]. ``head(backbone(x))`` is
    ``model(x)``: the same operations."""
    import copy

    path = archlib.head_path(model)
    trunk = copy.deepcopy(model)
    archlib.set_head(trunk, path, nn.Identity())
    head = copy.deepcopy(archlib.get_head(model, path)).eval().float().to(device, dtype)
    return for_inference(trunk, device, dtype), head


def save_model(path: str, model: nn.Module, classes: list[dict], preset: dict, config: dict,
               model_id: str, arch: str = archlib.DEFAULT_MODEL) -> str:
    """Write model.pt (state_dict, classes, preset, config, the architecture ``arch``: a later
    job needs no --model); return its sha256."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": MODEL_FORMAT, "state_dict": state, "classes": classes,
                "preset": preset, "config": config, "model_id": model_id, "arch": arch}, buf)
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
