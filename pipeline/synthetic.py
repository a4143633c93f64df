"""Generated labelled images: learnable, not trivial, shaped like real photos.

Ten shape classes drawn at random size, position, rotation and colour on a random background
with gradient and noise, saved as JPEG files of varied size and aspect ratio in class folders
(``ROOT/<split>/<class>/<name>.jpg``). Used by the demo, the tests and the benchmark.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import InputError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "stripes",
          "checker", "crescent")


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = (inner if inner and k % 2 else r)
        a = rot + math.pi * 2 * k / (n * (2 if inner else 1))
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rot, fg, bg):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=fg)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=fg)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=r * 0.45), fill=fg)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fg)
    elif shape == "cross":
        w = r * 0.35
        for a in (rot, rot + math.pi / 2):
            dx, dy, px, py = math.cos(a) * r, math.sin(a) * r, -math.sin(a) * w, math.cos(a) * w
            draw.polygon([(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py),
                          (cx + dx + px, cy + dy + py), (cx - dx + px, cy - dy + py)], fill=fg)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ox, oy = math.cos(rot) * r * 0.5, math.sin(rot) * r * 0.5
        draw.ellipse([cx + ox - r * 0.85, cy + oy - r * 0.85, cx + ox + r * 0.85,
                      cy + oy + r * 0.85], fill=bg)
    elif shape in ("stripes", "checker"):
        cell = max(2.0, r / 3)
        for i in range(-4, 4):
            for j in range(-4, 4):
                if shape == "stripes" and i % 2 == 0 or shape == "checker" and (i + j) % 2 == 0:
                    x0, y0 = cx + i * cell, cy + j * cell
                    draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=fg)
    else:
        raise InputError(f"unknown shape {shape}")


def draw_image(shape: str, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One RGB image of ``shape`` on a noisy gradient background."""
    bg = rng.integers(0, 256, 3)
    fg = (255 - bg + rng.integers(-50, 51, 3)).clip(0, 255)  # keep a visible contrast
    grad = np.linspace(0, 1, width)[None, :, None] * rng.integers(-60, 60, 3)[None, None, :]
    base = np.clip(bg[None, None, :] + grad, 0, 255).repeat(height, 0).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.42) * min(width, height)
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), tuple(int(v) for v in fg),
                tuple(int(v) for v in base[int(cy), int(cx)]))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, rng.uniform(3, 12), (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def photo_like(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> Image.Image:
    """Gradients plus noise: the pixel statistics (and JPEG sizes) of a photo, not a test card."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * rng.uniform(0.2, 1.5) + y * rng.uniform(0.2, 1.5) + c * 40) % 256
                     for c in range(3)], axis=-1)
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    out = Image.fromarray(img)
    return out.convert(mode) if mode != "RGB" else out


def generate_photo_folder(root: str, n: int, num_classes: int = 10, seed: int = 0,
                          quality: int = 90) -> list[str]:
    """ImageNet-like JPEGs (~500x375, varied sizes) in ROOT/<class>/; returns the paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        d = os.path.join(root, f"class{i % num_classes:02d}")
        os.makedirs(d, exist_ok=True)
        w, h = int(rng.integers(400, 560)), int(rng.integers(300, 420))
        if rng.random() < 0.25:
            w, h = h, w  # some portraits
        path = os.path.join(d, f"img{i:06d}.jpg")
        photo_like(rng, w, h).save(path, quality=quality)
        paths.append(path)
    return paths


def generate_image_folder(root: str, per_class: dict[str, int], num_classes: int = 10,
                          seed: int = 0, size_range=(160, 320),
                          shapes: tuple[str, ...] = ()) -> dict[str, int]:
    """Write ``ROOT/<split>/<shape>/<shape>_<n>.jpg`` for the first ``num_classes`` SHAPES (or
    the ``shapes`` given: two tasks of different classes); return the count written per split."""
    if not 1 <= num_classes <= len(SHAPES):
        raise InputError(f"num_classes must be 1..{len(SHAPES)}")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise InputError(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    chosen = tuple(shapes) or SHAPES[:num_classes]
    counts = {}
    for split_no, (split, n) in enumerate(sorted(per_class.items())):
        rng = np.random.default_rng([seed, split_no])
        for shape in chosen:
            os.makedirs(os.path.join(root, split, shape), exist_ok=True)
            for k in range(n):
                short = int(rng.integers(*size_range))
                aspect = rng.uniform(0.65, 1.6)
                w, h = (int(short * aspect), short) if aspect > 1 else (short, int(short / aspect))
                img = draw_image(shape, rng, w, h)
                img.save(os.path.join(root, split, shape, f"{shape}_{split}_{k:05d}.jpg"),
                         quality=int(rng.integers(75, 96)))
        counts[split] = n * len(chosen)
    return counts
