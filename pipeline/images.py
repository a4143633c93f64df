"""Image formats and the one image opener: which files are images, and opening them safely.

One policy, used by the shard writer (``shards.inspect_image``), the decode stage
(``data.decode_image``) and ``jobs.classify``:

* formats are decided by content (PIL), never by the file name. Accepted: every format
  torchvision's ``ImageFolder`` accepts (``IMG_EXTENSIONS``: jpg, jpeg, png, ppm, bmp, pgm, tif,
  tiff, webp) plus GIF; a multi-picture JPEG from a phone or camera (PIL's ``MPO``) is a JPEG
  whose first frame is the picture, as torchvision and every JPEG decoder read it;
* the decompression-bomb guard: an image of more than ``max_pixels`` pixels is refused before
  its pixels are decoded, with a message naming ``--max-pixels``.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from pipeline.errors import InputError

# Real format (PIL's name) -> member extension in a shard. MPO (a JPEG followed by more JPEG
# frames) is stored as jpg: decoders read its first frame. PPM is PIL's name for every Netpbm
# file (.pbm, .pgm, .ppm).
IMAGE_EXTS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
              "BMP": "bmp", "DIB": "bmp", "TIFF": "tiff", "PPM": "ppm"}
MEMBER_IMAGE_EXTS = tuple(dict.fromkeys(IMAGE_EXTS.values()))
JPEG_FORMATS = ("JPEG", "MPO")
# PIL's own default limit: ~89.5 Mpixel (a 0.25 GB RGB bitmap); beyond that we refuse to decode.
DEFAULT_MAX_PIXELS = 89_478_485


# What counts as bad image data, not a bug, wherever images are opened (the shard job's checks,
# the decode stage, jobs.classify): PIL raises these for damaged, truncated or unknown files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)


class TooManyPixels(InputError):
    """An image over the pixel limit (a possible decompression bomb)."""


def too_many_pixels(width: int, height: int, max_pixels: int) -> TooManyPixels:
    """The ``TooManyPixels`` error (returned, not raised) for a ``width`` x ``height`` image over
    ``max_pixels`` pixels; its message names both counts and ``--max-pixels``."""
    return TooManyPixels(f"{width}x{height} = {width * height} pixels is over the limit of "
                         f"{max_pixels} pixels (a decompression-bomb guard; raise --max-pixels "
                         f"to accept it)")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``data`` lazily (header parsed, no pixels decoded) with the pixel limit applied.

    Raises ``TooManyPixels`` over ``max_pixels``, ``PIL.UnidentifiedImageError`` for a file
    that is no image, ``OSError``/``SyntaxError``/``ValueError`` for a damaged header. PIL's own
    guard is a process-wide setting (``Image.MAX_IMAGE_PIXELS``): it is set here, and only here,
    to at least our limit so that PIL's check never fires before ours (PIL would refuse at twice
    its limit even when --max-pixels allows more)."""
    Image.MAX_IMAGE_PIXELS = max(max_pixels, DEFAULT_MAX_PIXELS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check ourselves
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            with _unchecked(data) as im:
                raise too_many_pixels(*im.size, max_pixels) from None
    if img.width * img.height > max_pixels:
        raise too_many_pixels(img.width, img.height, max_pixels)
    return img


def _unchecked(data: bytes) -> Image.Image:
    """The header of an image PIL refused as a bomb, to name its size (no pixels decoded)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, as torchvision's ImageFolder loader makes it (``convert("RGB")``:
    CMYK, grayscale, palette and alpha all become RGB; an MPO gives its first frame). Errors as
    ``open_image``, plus whatever PIL raises for damaged pixel data."""
    return open_image(data, max_pixels).convert("RGB")
