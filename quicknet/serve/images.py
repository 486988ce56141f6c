"""Decode, validate and resize images into the model's uint8 NHWC 32x32x3 input.

Accepted: PNG, JPEG, WebP, BMP, GIF (first frame), in any mode — grayscale, palette, RGBA (alpha
composited on white), CMYK, 16-bit (scaled to 8 bits) — and any size: images that are not 32x32
are resized to exactly 32x32 with Pillow's bicubic filter (antialiased; aspect ratio not kept).
Raw tensors are accepted too: 3,072 bytes per image, uint8 in HWC order.

Limits are checked before the expensive step they guard: bytes before opening, the header's
pixel count before decoding (decompression bombs).

The image the service sees most, a plain 32x32 8-bit RGB PNG, skips Pillow (whose PNG chunk reader
is Python): our own checks of its chunks, CRCs and zlib stream, then libspng (`pyspng`), take ~38
us against Pillow's ~50 us, +6-10% requests/s at one image per request (benchmarks/README.md).
Its pixels equal Pillow's (PNG is lossless; tests/test_images.py compares them); anything else,
anything damaged or anything libspng refuses takes the Pillow path below, so every answer is Pillow's.
Every inflate is bounded: the fast path's to one byte past 32 rows, Pillow's text chunks to 4 MiB.
Errors are our own one line ("damaged or truncated"); the library's exception goes to the debug log.
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from quicknet.pixels import FORMATS, PIXELS_PER_IMAGE, SIZE, load_first_frame, model_input, to_rgb
from quicknet.serve.errors import InputError, clip

try:
    import pyspng
except ImportError:  # optional: without it every PNG takes the Pillow path
    pyspng = None

log = logging.getLogger("quicknet.images")

ImageFile.LOAD_TRUNCATED_IMAGES = False
# PNG text chunks (zTXt, iTXt) are inflated by Pillow into memory the image never needs: 60 of 1 KiB
# each inflating to 1 MiB made a 62 KiB upload hold 62 MiB (Pillow allows 64 MiB). 4 MiB in all,
# 1 MiB a chunk (Pillow's own, which also bounds an ICC profile): past that, the image is refused.
PngImagePlugin.MAX_TEXT_MEMORY = 4 << 20
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit is checked first


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int
    max_images: int


# PNG signature, then the first chunk: length 13, "IHDR", width 32, height 32, bit depth 8,
# colour type 2 (RGB). Bytes 26-28 (compression, filter and interlace methods) must be 0 as well.
_PNG_RGB8_32 = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00\x00\x20\x00\x00\x00\x20\x08\x02"


def _fast_png(data: bytes) -> np.ndarray | None:
    """A 32x32 8-bit RGB, non-interlaced, intact PNG through libspng; None for anything else."""
    if pyspng is None or len(data) < 45 or not data.startswith(_PNG_RGB8_32) or data[26:29] != b"\0\0\0":
        return None  # compression, filter and interlace methods 0: the only ones a decoder must know
    if not _intact(data):
        return None
    try:
        pixels = pyspng.load(data, format="RGB")
    except Exception:  # damaged or hostile: Pillow reads it again and says what is wrong
        return None
    return pixels if pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8 else None


_SCANLINES = SIZE * (1 + SIZE * 3)  # a filter byte, then 32 RGB pixels, per row
_PLAIN_CHUNKS = (b"IDAT", b"IEND")  # after IHDR: a plain image, nothing for the decoders to disagree on


def _intact(data: bytes) -> bool:
    """A plain PNG (IHDR, IDAT..., IEND: what Pillow, OpenCV and most encoders write), every chunk's
    CRC-32 matching, and the image data inflating to exactly the 32 rows with a matching Adler-32.
    pyspng has libspng skip both checks (it would decode a damaged upload into wrong pixels), and
    libspng accepts some malformed ancillary chunks (gAMA, tRNS, iCCP...) that Pillow refuses; any
    of those goes to Pillow, which gives the answer it always gave. Costs ~17 us of the ~38 us the
    fast path takes (benchmarks/README.md)."""
    view, at, end = memoryview(data), 33, len(data)  # the IHDR (bytes 8-32) is checked by the caller
    if zlib.crc32(view[12:29]) != int.from_bytes(view[29:33], "big"):
        return False
    inflate = zlib.decompressobj()
    inflated = 0
    while at + 12 <= end:
        length = int.from_bytes(view[at : at + 4], "big")
        stop = at + 8 + length
        kind = view[at + 4 : at + 8]
        if kind not in _PLAIN_CHUNKS or stop + 4 > end:
            return False
        if zlib.crc32(view[at + 4 : stop]) != int.from_bytes(view[stop : stop + 4], "big"):
            return False
        if kind == b"IEND":
            return inflate.eof and inflated == _SCANLINES and not inflate.unused_data
        try:  # at most one byte more than 32 rows: never 0, which zlib reads as "no limit"
            inflated += len(inflate.decompress(view[at + 8 : stop], _SCANLINES + 1 - inflated))
        except zlib.error:
            return False
        if inflated > _SCANLINES or inflate.unconsumed_tail:  # more image data than 32 rows hold
            return False
        at = stop + 4
    return False


def mib(n: int) -> str:
    """A byte count as a person reads a limit: `8 MiB`, `14.2 MiB`, `512 KiB`, `900 bytes`."""
    if n >= 1 << 20:
        value = n / (1 << 20)
        return f"{value:.0f} MiB" if value == int(value) or value >= 100 else f"{value:.1f} MiB"
    if n >= 1 << 10:
        return f"{n / 1024:.0f} KiB" if n % 1024 == 0 or n >= 100 << 10 else f"{n / 1024:.1f} KiB"
    return f"{n} bytes"


def image_label(index: int, name: str | None = None) -> str:
    """How an error names an image: its 1-based position in the request (`image 1`, as a person
    counts), and its file name when the request carried one (`image 2 (IMG_0042.jpg)`). A client's
    file name is cut to 60 characters, control characters replaced: it is echoed, never trusted.
    `blob` is no name: what a browser's FormData (and our client) send for bytes that had none."""
    where = f"image {index + 1}"
    if name and name != "blob":
        shown = clip(name.replace("\\", "/").rsplit("/", 1)[-1], 60)
        shown = "".join(c if c.isprintable() else "?" for c in shown)
        where += f" ({shown})"
    return where


# What a body without a usable Content-Type is sniffed for: each format's leading bytes.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


def sniff(data: bytes) -> str | None:
    """The image format `data` starts like (PNG, JPEG, GIF, WebP, BMP), or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 26 and int.from_bytes(data[2:6], "little") in (0, len(data)):
        return "BMP"  # the size field is the file's (or 0): two letters alone are too weak
    return None


def decode_image(data: bytes, limits: Limits, index: int = 0, name: str | None = None) -> np.ndarray:
    """One encoded image as uint8 32x32x3. `index` (0-based) and `name` (a multipart part's file
    name) only say which image an error is about: `image 1`, `image 2 (cat.png)`."""
    within = len(data) <= limits.max_image_bytes and limits.max_image_pixels >= SIZE * SIZE
    if within and (fast := _fast_png(data)) is not None:
        return fast
    where = image_label(index, name)
    if not data:
        raise InputError(f"{where} is empty")
    if len(data) > limits.max_image_bytes:
        raise InputError(
            f"{where} is {mib(len(data))}; the limit for one image is {mib(limits.max_image_bytes)}: "
            "resize it first (the model reads 32x32 pixels)",
            status=413,
            reason="too_large",
        )
    try:
        # only the five accepted formats' plugins ever see a client's bytes: no TIFF, PSD, EPS
        # (Ghostscript) or any other of Pillow's ~40 readers, a smaller surface for hostile input
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InputError(
            f"{where} is not a recognised image (send PNG, JPEG, WebP, BMP or GIF)", 415, "bad_format"
        ) from None
    except Image.DecompressionBombError:  # Pillow's own ceiling, met in the header of any format it tried
        raise InputError(
            f"{where} declares more pixels than the limit of {limits.max_image_pixels:,}", 413, "too_many_pixels"
        ) from None
    except Exception as e:  # a header that trips a format plugin: the client's bytes, never a 500
        log.debug("%s: %s: %s", where, type(e).__name__, e)  # the library's words stay in the log
        raise InputError(f"{where} could not be read: its header or metadata is damaged") from None
    with im:
        if im.format not in FORMATS:
            raise InputError(f"{where} is {im.format}; send PNG, JPEG, WebP, BMP or GIF", 415, "bad_format")
        w, h = im.size
        if w * h > limits.max_image_pixels:
            raise InputError(
                f"{where} is {w}x{h} = {w * h:,} pixels; the limit is {limits.max_image_pixels:,}",
                status=413,
                reason="too_many_pixels",
            )
        try:
            load_first_frame(im)
            rgb = to_rgb(im)
        except Image.DecompressionBombError:
            raise InputError(
                f"{where} declares more pixels than the limit of {limits.max_image_pixels:,}", 413, "too_many_pixels"
            ) from None
        except Exception as e:  # damaged, truncated or hostile data inside a valid header
            log.debug("%s: %s: %s", where, type(e).__name__, e)
            raise InputError(f"{where} is damaged or truncated") from None
    return model_input(rgb)


INLINE_DECODE_BYTES = 16 << 10


async def off_loop(fn, *args, nbytes: int):
    """Run a decoder on the event loop when its input is small (a 32x32 PNG decodes in tens of
    microseconds, less than a thread hand-off costs), else in a worker thread (Pillow releases the
    GIL): a large image never stalls the loop, a small one never pays for a thread."""
    if nbytes <= INLINE_DECODE_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def decode_images(blobs: list[bytes], limits: Limits, names: list[str | None] | None = None) -> np.ndarray:
    check_count(len(blobs), limits)
    names = names or [None] * len(blobs)
    return np.stack([decode_image(b, limits, i, n) for i, (b, n) in enumerate(zip(blobs, names, strict=True))])


def decode_pixels(data: bytes, limits: Limits) -> np.ndarray:
    """Raw uint8 tensors: N x 32 x 32 x 3 bytes, HWC order."""
    if not data or len(data) % PIXELS_PER_IMAGE:
        raise InputError(
            f"raw pixel body is {len(data)} bytes; "
            f"expected a positive multiple of {PIXELS_PER_IMAGE} (N x 32 x 32 x 3 uint8)"
        )
    n = len(data) // PIXELS_PER_IMAGE
    check_count(n, limits)
    return np.frombuffer(data, dtype=np.uint8).reshape(n, SIZE, SIZE, 3)


def check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise InputError("no images in the request")
    if n > limits.max_images:
        raise InputError(
            f"{n} images in one request; the limit is {limits.max_images}", status=413, reason="too_many_images"
        )
