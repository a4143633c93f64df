"""Image formats and the one image opener: which files are images, and opening them safely.

One policy, used by the shard writer (``inspect_image``: how hard each source file is checked), the decode stage
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

from PIL import Image, UnidentifiedImageError

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


# How hard the shard writer looks at each source file (inspect_image): "header" parses the header
# and checks the file is whole (JPEG EOI, PNG IEND); "decode" decodes every image.
CHECKS = ("header", "decode")
DEFAULT_CHECK = "header"
JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole chunk: length 0, type, fixed CRC


class BadImage(Exception):
    """A source file that is not a usable image; the message is the reason recorded."""


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                  check: str = DEFAULT_CHECK) -> dict:
    """Check ``data`` as ``check`` says (see CHECKS); return its real format, size and mode.

    Both levels parse the header with PIL (format, size, mode, the decompression-bomb limit).
    "header" then checks that the file is whole: a JPEG must hold its end-of-image marker
    (FF D9) after the start of its image data, a PNG its IEND chunk; other formats get the
    header check only. Bytes after the end marker (padding, camera trailers, an appended video)
    are allowed. "decode" decodes every image instead (DCT-scaled for JPEGs): ~20x slower, and
    it also catches damage inside the image data that a header check cannot see (PIL still
    decodes most such JPEGs, with grey blocks, so both levels store them).
    """
    if check not in CHECKS:
        raise InputError(f"check must be one of {CHECKS}, not {check!r}")
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with open_image(data, max_pixels) as im:
            fmt, (w, h), mode = im.format, im.size, im.mode
            if fmt not in IMAGE_EXTS:
                raise BadImage(f"unsupported image format {fmt}")
            if check == "header":
                _check_end(fmt, data)
            else:
                if fmt in JPEG_FORMATS:  # DCT-domain downscale: reads every byte, 10x faster
                    im.draft(mode, (max(1, w // 8), max(1, h // 8)))
                im.load()
    except BadImage:
        raise
    except TooManyPixels as e:
        raise BadImage(str(e)) from None
    except UnidentifiedImageError:
        raise BadImage("not an image (PIL cannot identify it)") from None
    except DECODE_ERRORS as e:
        raise BadImage(f"cannot decode: {e}") from None
    return {"ext": IMAGE_EXTS[fmt], "width": w, "height": h, "mode": mode}


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset just past the first start-of-scan (SOS) segment, walking the marker segments
    (an EXIF thumbnail, with its own SOS and EOI, lies inside APP1 and is skipped whole);
    None when the file ends first."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:  # junk between segments: skipped, as PIL does
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            return end if end <= n else None
        pos = end
    return None


def _check_end(fmt: str, data: bytes) -> None:
    """Raise BadImage when a JPEG or PNG lacks its end marker: the file was cut short."""
    if fmt in JPEG_FORMATS:  # an MPO's first frame ends with an EOI like any JPEG
        scan = _jpeg_scan_start(data)
        if scan is None:
            raise BadImage("truncated: the JPEG ends before its image data (no start of scan)")
        # Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an
        # FF D9 after the scan start is the EOI. rfind: trailing bytes are usually few.
        if data.rfind(JPEG_EOI, scan) < 0:
            raise BadImage("truncated: no JPEG end-of-image marker (FF D9) after the image data")
    elif fmt == "PNG":
        if data.rfind(PNG_IEND, 8) < 0:
            raise BadImage("truncated: no PNG IEND chunk")
