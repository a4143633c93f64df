"""Image presets, defined once for training, inference and the tests.

Eval is exactly torchvision's ``ResNet18_Weights.DEFAULT.transforms()``: shorter side to 256
(bilinear, antialiased), centre crop 224, then (on the device) /255 and ImageNet mean/std.
The Ray Data stage emits uint8 CHW; ``normalize`` runs inside the model step.

Train: the data stage draws torchvision's RandomResizedCrop (scale (min_scale, 1), ratio
(3/4, 4/3)) from the *whole* decoded image, resamples only that region, once, to the crop size
(bilinear, antialiased), and flips it horizontally with probability 1/2 (``train_image``). The
draw comes from (seed, epoch, key) (``sample_seed``), so every epoch gets fresh augmentation that
is reproducible; the worker receives finished crops.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from pipeline.errors import InputError

if TYPE_CHECKING:
    import torch

# No torch at import time: the decode workers need only PIL and numpy, and importing torch and
# torchvision costs each of them seconds and ~300 MB. normalize imports it.

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZE_SIZE, CROP_SIZE = 256, 224


def resize_for(crop_size: int) -> int:
    """The shorter-side size that goes with a crop, in torchvision's 256:224 proportion."""
    return round(crop_size * RESIZE_SIZE / CROP_SIZE)


@dataclass(frozen=True)
class Preset:
    """The eval preset of a model (contract 4 in docs/DESIGN.md): shorter side to
    ``resize_size`` pixels (``interpolation``, antialiased), centre crop ``crop_size`` pixels,
    then ``mean``/``std`` on the device. A torchvision model's weights give their own
    (``architectures.preset_of``: EfficientNet-B0 bicubic, ConvNeXt-T resize 236). The one shape a preset has, in model.pt (``to_dict``),
    in prediction metadata and in summary.json. Default: torchvision's
    ``ResNet18_Weights.DEFAULT.transforms()``."""
    resize_size: int = RESIZE_SIZE
    crop_size: int = CROP_SIZE
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple = MEAN
    std: tuple = STD

    @classmethod
    def for_crop(cls, crop_size: int) -> "Preset":
        """The default preset for a ``crop_size``-pixel training crop: shorter side to
        ``resize_for(crop_size)`` pixels (the 256:224 proportion), other fields torchvision's."""
        return cls(resize_for(crop_size), crop_size)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preset":
        """From a saved dict; keys it lacks take the defaults (older model.pt files)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in (d or {}).items() if k in known})

    def with_sizes(self, resize_size: int = 0, crop_size: int = 0) -> "Preset":
        """This preset with the sizes a user set (0 keeps the preset's own)."""
        return replace(self, resize_size=resize_size or self.resize_size,
                       crop_size=crop_size or self.crop_size)

    def to_dict(self) -> dict:
        """The preset as a JSON-ready dict (tuples as lists), the form ``from_dict`` reads back."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) for v in (getattr(self, f.name),)}


def reference_eval_transform(resize_size: int = RESIZE_SIZE, crop_size: int = CROP_SIZE):
    """torchvision's own preset object, for comparisons in tests and baselines."""
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(crop_size=crop_size, resize_size=resize_size)


# --model's presets resample with one of these (torchvision's InterpolationMode values)
PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                     "nearest": Image.NEAREST}


def eval_image(img: Image.Image, resize_size: int = RESIZE_SIZE,
               crop_size: int = CROP_SIZE, interpolation: str = "bilinear") -> np.ndarray:
    """RGB PIL image -> uint8 3xHxW, pixel-identical to torchvision's eval preset.

    The PIL path of torchvision's ``resize(img, [size], interpolation, antialias=True)`` and
    ``center_crop(img, [crop])``, written out with PIL alone (the tests compare the two);
    ``interpolation``: bilinear (ResNet-18's), bicubic (EfficientNet's) or nearest."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != resize_size:
        new_short, new_long = resize_size, int(resize_size * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if interpolation not in PIL_INTERPOLATION:
            raise InputError(f"interpolation {interpolation!r}: not one of "
                             f"{', '.join(PIL_INTERPOLATION)}")
        img = img.resize(size, PIL_INTERPOLATION[interpolation])
    w, h = img.size
    if w < crop_size or h < crop_size:
        raise InputError(f"{w}x{h} is smaller than the {crop_size} crop: resize_size must be at "
                         f"least crop_size")
    top, left = int(round((h - crop_size) / 2.0)), int(round((w - crop_size) / 2.0))
    img = img.crop((left, top, left + crop_size, top + crop_size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def normalize(images: torch.Tensor, dtype: torch.dtype | None = None, mean: tuple = MEAN,
              std: tuple = STD) -> torch.Tensor:
    """uint8 NCHW (any device) -> normalized float NCHW in channels_last, as torchvision does
    (``mean``/``std``: the preset's, ImageNet's by default)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    x = images.float().div(255)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 64-bit seed (an int in [0, 2**64)) for one sample's augmentation in one epoch: the 8-byte
    BLAKE2b digest of ``"seed|epoch|key"``, read little-endian; unlike ``hash``, the same in
    every process."""
    digest = hashlib.blake2b(f"{seed}|{epoch}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng`` instead of torch's RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: centre crop at the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_crop_params(key: str, seed: int, epoch: int, height: int, width: int,
                      min_scale: float = 0.08) -> tuple[int, int, int, int, bool]:
    """The augmentation of one sample in one epoch, drawn from the whole ``height`` x ``width``
    image: (top, left, h, w) of torchvision's RandomResizedCrop (scale (``min_scale``, 1), ratio
    (3/4, 4/3)) and whether to flip horizontally, from ``sample_seed(seed, epoch, key)``: the
    same in every process."""
    rng = np.random.default_rng(sample_seed(seed, epoch, str(key)))
    top, left, h, w = random_resized_crop_params(height, width, rng, (min_scale, 1.0))
    return top, left, h, w, bool(rng.random() < 0.5)


def train_image(img: Image.Image, crop_size: int, *, key: str, seed: int, epoch: int,
                min_scale: float = 0.08) -> np.ndarray:
    """RGB PIL image (any size) -> uint8 3 x crop_size x crop_size: RandomResizedCrop drawn from
    the whole image (``train_crop_params``), only that region resampled to the crop (bilinear,
    antialiased, as torchvision's ``resized_crop`` on a PIL image), then the horizontal flip.
    Pixel-identical to torchvision's ``F.resized_crop`` + ``F.hflip`` with the same parameters
    (the tests compare the two)."""
    top, left, h, w, flip = train_crop_params(key, seed, epoch, img.height, img.width, min_scale)
    img = img.crop((left, top, left + w, top + h)).resize((crop_size, crop_size), Image.BILINEAR)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


# The transforms the decode stage applies, as objects (torchvision's references/classification
# presets.py does the same): built once in the job, pickled into Ray Data's decode tasks, and
# called there per decoded image. Each maps an RGB PIL image (``__call__``) or a uint8 3xHxW
# tensor on a GPU (``on_tensor``, after nvJPEG) to uint8 3 x crop_size x crop_size, given the
# sample's key and the epoch (``epoch``: what an execution count of the dataset makes of it).

@dataclass(frozen=True)
class EvalTransform:
    """The eval preset (``preset``: shorter side to resize_size, centre crop): deterministic,
    so ``key`` and ``epoch`` are ignored. Default: torchvision's ``ResNet18_Weights.DEFAULT``."""
    preset: Preset = Preset()

    @property
    def crop_size(self) -> int:
        return self.preset.crop_size

    def epoch(self, executions: Callable[[], int]) -> int:
        """Eval draws nothing: 0, without asking for the execution count."""
        return 0

    def __call__(self, img: Image.Image, key: str = "", epoch: int = 0) -> np.ndarray:
        """``eval_image`` at the preset's sizes and interpolation: pixel-identical to
        torchvision's preset."""
        return eval_image(img, self.preset.resize_size, self.preset.crop_size,
                          self.preset.interpolation)

    def on_tensor(self, img: "torch.Tensor", key: str = "", epoch: int = 0) -> "torch.Tensor":
        """The same preset on a uint8 3xHxW tensor (a GPU's, after nvJPEG) with torchvision's
        tensor resize (antialiased bilinear) and centre crop: near-identical to the PIL path,
        not bit-identical."""
        from torchvision.transforms.v2 import functional as TF

        from torchvision.transforms import InterpolationMode

        img = TF.resize(img, [self.preset.resize_size],
                        InterpolationMode(self.preset.interpolation), antialias=True)
        return TF.center_crop(img, [self.preset.crop_size])


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop (scale (``min_scale``, 1), ratio (3/4, 4/3)) over the whole image to
    ``crop_size`` pixels, then a horizontal flip with probability 1/2, drawn from (``seed``,
    epoch, key) (``train_crop_params``). The epoch of a pass is ``epoch_offset`` (a resumed
    run's first epoch) plus the number of times Ray Data has executed the dataset before."""
    crop_size: int = CROP_SIZE
    seed: int = 0
    epoch_offset: int = 0
    min_scale: float = 0.08

    def epoch(self, executions: Callable[[], int]) -> int:
        """The epoch a pass draws: ``epoch_offset`` plus ``executions()``, how many times the
        dataset was executed before (``ray_compat.execution_count``)."""
        return self.epoch_offset + executions()

    def __call__(self, img: Image.Image, key: str, epoch: int) -> np.ndarray:
        """``train_image``: pixel-identical to torchvision's ``resized_crop`` + ``hflip``."""
        return train_image(img, self.crop_size, key=key, seed=self.seed, epoch=epoch,
                           min_scale=self.min_scale)

    def on_tensor(self, img: "torch.Tensor", key: str, epoch: int) -> "torch.Tensor":
        """The same draw on a uint8 3xHxW tensor (a GPU's, after nvJPEG), with torchvision's
        tensor ``resized_crop`` (antialiased bilinear) and ``hflip``."""
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w, flip = train_crop_params(key, self.seed, epoch, img.shape[-2],
                                                  img.shape[-1], self.min_scale)
        img = TF.resized_crop(img, top, left, h, w, [self.crop_size, self.crop_size],
                              antialias=True)
        return TF.hflip(img) if flip else img
