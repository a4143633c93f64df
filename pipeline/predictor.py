"""What runs inside the predictor actors of a prediction run (``pipeline.predict`` lays the run
out; ``pipeline.predictions`` writes what they return): the spec each actor is built from, the
``Predictor`` that maps a decoded batch to per-image rows, and the class-space rules that say
which of the model's outputs are scored. Imports no lease, publish or Parquet module: Ray
pickles this module's objects to every actor."""

from __future__ import annotations

import dataclasses
import enum
import os
import socket
import time

import numpy as np
import torch

from pipeline import data, faults, model as modellib, presets
from pipeline.errors import InputError

NON_FINITE = "non-finite embedding"  # how the error of an image whose vector is NaN or inf starts
# the timing columns of every returned batch (``Predictor.__call__``): no Parquet column
TIMING_COLUMNS = ("_busy_s", "_decode_s", "_actor", "_call_start", "_call_end")


class Rows(enum.Enum):
    """Which rows a prediction run writes: ``PREDICTIONS`` (jobs.predict, the nightly: the head's
    top-k over the scored classes, correctness, optionally the embedding) or ``EMBEDDINGS``
    (jobs.embed: key, the data's label, class id and embedding; no head runs, so the model's
    classes need not cover the data's)."""
    PREDICTIONS = "predictions"
    EMBEDDINGS = "embeddings"

    @property
    def head(self) -> bool:
        """Whether the model's head runs (and its classes must cover the data's)."""
        return self is Rows.PREDICTIONS

    @property
    def job(self) -> str:
        """The verb of the run's progress lines: predict or embed."""
        return "predict" if self.head else "embed"


@dataclasses.dataclass(frozen=True)
class PredictorSpec:
    """What each predictor actor is built from (Ray pickles it to every actor): the weights
    (``model.load_weights``'s spec) and the data's classes; ``precision`` and ``use_gpu`` (None:
    a GPU whenever there is one) as ``PredictOptions`` has them; ``topk`` kept per image;
    ``num_threads`` for torch on a CPU (None: torch's own; 0: the node's cores shared among
    its ``actors_per_node`` predictor actors); ``restrict``: score over the data's classes
    (``scored_classes``); ``warmup`` (batch size, crop size): one forward pass on zeros of that
    shape in the constructor, so the kernel selection of the first call happens while the
    actor starts (None: none); ``embedding_dtype`` (float16, float32) returns each image's
    pooled feature as ``embedding`` [N, D] (D: the head's input width) in that type ('': not returned); ``rows``: which
    rows the actors return (``Rows``); ``model``: the torchvision model name ('': the
    weights' own, else resnet18; ``model.load_weights``); ``preset``: the eval preset whose
    mean/std normalise the batches (None: ImageNet's); ``decode`` (an ``ActorDecode``): the batches are raw
    WebDataset rows, decoded in the actor (None: decoded batches, contract 2)."""
    weights: str
    data_classes: list
    precision: str = "auto"
    use_gpu: bool | None = None
    topk: int = 5
    num_threads: int | None = None
    actors_per_node: int = 1
    restrict: bool = False
    warmup: tuple[int, int] | None = None
    embedding_dtype: str = ""  # float16 or float32: return each image's embedding; '': none
    rows: Rows = Rows.PREDICTIONS
    model: str = ""
    preset: presets.Preset | None = None
    decode: "ActorDecode | None" = None  # raw rows in: the actor decodes them (--decode-in actor)


@dataclasses.dataclass(frozen=True)
class ActorDecode:
    """How a predictor actor decodes the raw WebDataset rows it is given (``--decode-in
    actor``): ``data.decode_batch`` with the eval ``transform``, the data's ``num_classes``
    and ``max_pixels``, on ``device`` ("cuda": nvJPEG on the actor's GPU, the images staying
    there; "cpu": PIL, the reference path)."""
    transform: presets.EvalTransform
    num_classes: int
    max_pixels: int
    device: str = "cpu"


class Predictor:
    """Loads the model once per actor (``PredictorSpec``); maps a decoded batch to per-image
    predictions."""

    def __init__(self, spec: PredictorSpec):
        self.calls = 0
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        if spec.num_threads is not None:  # 0: the node's cores, shared among its actors
            torch.set_num_threads(spec.num_threads or cpu_threads(spec.actors_per_node))
        torch.manual_seed(0)  # "none" weights: the same random model in every actor
        data_classes = spec.data_classes
        loaded = modellib.load_weights(spec.weights, spec.model)
        net, model_classes, _ = modellib.build_model(loaded,
                                                     None if loaded.classes else data_classes)
        self.device = modellib.pick_device(spec.use_gpu)
        self.dtype = modellib.resolve_precision(spec.precision, self.device)
        # BatchNorm folded; the head apart, so the pooled feature is at hand
        self.backbone, self.head = modellib.split_for_inference(net, self.device, self.dtype)
        self.dim = self.head.in_features  # the embedding's width
        self.preset = spec.preset or presets.Preset()
        self.embedding_dtype = spec.embedding_dtype
        self.rows = spec.rows
        self.decode = spec.decode
        if self.rows.head:
            self.classes, index = scored_classes(data_classes, model_classes, spec.restrict)
            self.output_index = None if index is None else torch.from_numpy(index).to(
                self.device)
            self.names = np.array([c["name"] for c in self.classes], dtype=object)
            self.label_map = label_map(data_classes, self.classes)
            self.topk = min(spec.topk, len(self.classes))
        if spec.warmup:  # oneDNN/cuDNN pick their kernels per shape on the first call
            b, c = spec.warmup
            with torch.inference_mode():
                self.head(self.backbone(self._normalize(torch.zeros(
                    (b, 3, c, c), dtype=torch.uint8, device=self.device))))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of ``_predict`` or ``_embed``, plus this call's timing on every row (the
        driver's ``BusyShare`` takes it; no Parquet column): ``TIMING_COLUMNS``, the call's
        seconds and those of its decoding (``--decode-in actor``; else 0) shared out over its
        rows, this actor, and the call's start and end (this actor's wall clock, seconds since
        the epoch)."""
        self.calls += 1
        faults.kill_once("predictor_batch", batch=self.calls)
        faults.hold(f"predictor_batch_{self.calls}")  # (tests) an actor held at its Nth batch
        start = decoded = time.time()
        with torch.inference_mode():
            if self.decode is not None:  # raw rows: decoded here, on this actor's device
                d = self.decode
                batch = data.decode_batch(batch, d.transform, num_classes=d.num_classes,
                                          max_pixels=d.max_pixels, device=d.device, epoch=0,
                                          on_device=True)
                decoded = time.time()
            out = self._predict(batch) if self.rows.head else self._embed(batch)
        end = time.time()
        n = len(out["key"])
        out.update({"_busy_s": np.full(n, (end - start) / max(n, 1)),
                    "_decode_s": np.full(n, (decoded - start) / max(n, 1)),
                    "_actor": np.full(n, self.actor, dtype=object),
                    "_call_start": np.full(n, start), "_call_end": np.full(n, end)})
        return out

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Top-5 correctness is always top-5, whatever --topk keeps in the output lists.
        n, k, k5 = len(batch["key"]), self.topk, min(5, len(self.classes))
        ok = batch["error"] == ""
        error = batch["error"]
        topi = np.full((n, max(k, k5)), -1, dtype=np.int64)
        topp = np.zeros((n, max(k, k5)), dtype=np.float32)
        emb = (np.zeros((n, self.dim), dtype=self.embedding_dtype)
               if self.embedding_dtype else None)
        if ok.any():
            features = self.backbone(self._normalize(self._images(batch, ok)))
            logits = self.head(features)
            if emb is not None:
                error = self._store(emb, ok, features, error)
            if self.output_index is not None:  # a subset set: its classes' logits only
                logits = logits.index_select(1, self.output_index)
            probs = logits.float().softmax(dim=1)
            p, i = probs.topk(max(k, k5), dim=1)
            topi[ok], topp[ok] = i.cpu().numpy(), p.cpu().numpy()
        labels = np.where(batch["label"] >= 0, self.label_map[np.maximum(batch["label"], 0)], -1)
        pred = topi[:, 0]
        extra = {} if emb is None else {"embedding": emb}
        return {"key": batch["key"], "label": labels, "pred": pred, **extra,
                "pred_name": np.where(pred >= 0, self.names[np.maximum(pred, 0)], ""),
                "topk_index": topi[:, :k], "topk_prob": topp[:, :k],
                "top1_correct": (pred == labels) & (labels >= 0),
                "top5_correct": (topi[:, :k5] == labels[:, None]).any(axis=1) & (labels >= 0),
                "error": error, "shard": batch["shard"],
                # what this actor ran, which the driver cannot know (a CPU-only head can drive
                # GPUs that lack bf16)
                "precision": np.full(n, modellib.precision_name(self.dtype), dtype=object)}

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> the model's input: /255, the preset's mean/std, in the run's dtype."""
        return presets.normalize(images, self.dtype, self.preset.mean, self.preset.std)

    def _images(self, batch: dict, ok: np.ndarray) -> torch.Tensor:
        """The decoded rows' uint8 images on the model's device: copied from the host, or, when
        this actor decoded them on its GPU, selected where they are."""
        images = batch["image"]
        if torch.is_tensor(images):
            return images[torch.from_numpy(ok).to(images.device)].to(self.device)
        return torch.from_numpy(images[ok]).to(self.device, non_blocking=True)

    def _store(self, emb: np.ndarray, ok: np.ndarray, features: torch.Tensor,
               error: np.ndarray) -> np.ndarray:
        """Put the decoded rows' ``features`` into ``emb`` (the stored dtype); return the
        errors with each vector that is not finite there (NaN, inf, beyond float16's range)
        marked: a failed image, never a silent row."""
        with np.errstate(over="ignore"):  # beyond float16's range: inf, caught next
            emb[ok] = features.float().cpu().numpy().astype(self.embedding_dtype)
        bad = ok & ~np.isfinite(emb).all(axis=1)
        return np.where(bad, f"{NON_FINITE} (NaN or inf in the pooled feature as "
                             f"{self.embedding_dtype})", error) if bad.any() else error

    def _embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ``Rows.EMBEDDINGS`` rows: key, the data's label, embedding (a non-finite one, or a
        decode failure, as an error)."""
        n = len(batch["key"])
        error = batch["error"]
        ok = error == ""
        emb = np.zeros((n, self.dim), dtype=self.embedding_dtype)
        if ok.any():
            error = self._store(emb, ok, self.backbone(self._normalize(
                self._images(batch, ok))), error)
        return {"key": batch["key"], "label": batch["label"], "embedding": emb, "error": error,
                "shard": batch["shard"],
                "precision": np.full(n, modellib.precision_name(self.dtype), dtype=object)}


def cpu_threads(actors_per_node: int) -> int:
    """Torch threads for a CPU predictor actor: every core this process may run on, shared
    with the other predictor actors of its node. Decode tasks time-share those cores: at CPU
    inference rates they need a fraction of one (a core decodes ~300 images/s, ResNet-18 in
    bf16 runs ~50 images/s per core), and a core set aside for them would mostly idle."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, actors_per_node))


SUBSET_LAYOUTS = ("imagenet-r", "imagenet-a")  # sets published as scored over their classes


def scored_classes(data_classes: list[dict], model_classes: list[dict], restrict: bool
                   ) -> tuple[list[dict], np.ndarray | None]:
    """The classes a prediction is made over, and which model outputs they are.

    With ``restrict`` (``--class-subset``: by default for the ImageNet-R and ImageNet-A layouts)
    and the data's class ids a strict subset of the model's (their 200 classes under a
    1000-class ImageNet model), the model is scored over the data's classes only: its logits
    restricted to them (matched by id, in the data's order), the softmax taken over those,
    ``pred``/``topk_*`` in the data's class space. This is how those sets' own evaluation code
    and timm's ``--valid-labels`` score them (Hendrycks et al. 2021, "The Many Faces of
    Robustness"; "Natural Adversarial Examples"). Returns (data_classes, model indices of shape
    [C_data]); otherwise (model_classes, None): the model's own output space. InputError
    (``label_map``) when the model lacks some of the data's classes."""
    label_map(data_classes, model_classes)
    if restrict and len(data_classes) < len(model_classes):
        index = {c["id"]: c["index"] for c in model_classes}
        return data_classes, np.array([index[c["id"]] for c in data_classes], dtype=np.int64)
    return model_classes, None


def restricts(class_subset: str, layout: str) -> bool:
    """Whether ``--class-subset`` (auto, on, off) restricts scoring to the data's classes for a
    manifest of ``layout``: auto does for SUBSET_LAYOUTS (ImageNet-R, -A)."""
    return class_subset == "on" or (class_subset == "auto" and layout in SUBSET_LAYOUTS)


def label_map(data_classes: list[dict], model_classes: list[dict]) -> np.ndarray:
    """Data label -> model output index, matched by class id; error if the model lacks one."""
    index = {c["id"]: c["index"] for c in model_classes}
    missing = [c["id"] for c in data_classes if c["id"] not in index]
    if missing:
        raise InputError(f"the model's {len(model_classes)} classes lack {len(missing)} of the "
                         f"data's classes (e.g. {missing[:3]}): wrong weights for this data?")
    return np.array([index[c["id"]] for c in data_classes], dtype=np.int64)
