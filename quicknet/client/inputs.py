"""Turn what a caller has (file paths, encoded bytes, numpy arrays, PIL images) into what the wire
carries: encoded image bytes, or raw uint8 32x32x3 HWC pixels where the server takes them as they
are (REST `application/octet-stream`, gRPC `Image.pixels`), which skips encoding and decoding.

Nothing is read or encoded until its request is built, so a batch of a million paths costs memory
only for the requests in flight; `size` is an estimate made without reading, for chunking."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from quicknet.client.results import QuickNetClientError

SIZE = 32
PIXELS_PER_IMAGE = SIZE * SIZE * 3
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


@dataclass(frozen=True)
class Payload:
    kind: Literal["encoded", "pixels"]
    data: bytes


class Item:
    """One image, not yet loaded."""

    __slots__ = ("_source", "size")

    def __init__(self, source: Any, size: int):
        self._source = source
        self.size = size

    def load(self) -> Payload:
        source = self._source
        if isinstance(source, Path):
            try:
                return Payload("encoded", source.read_bytes())
            except OSError as e:
                raise QuickNetClientError(None, f"cannot read {source}: {e.strerror or e}") from None
        if isinstance(source, bytes):
            return Payload("encoded", source)
        if isinstance(source, np.ndarray):
            if source.shape == (SIZE, SIZE, 3):
                return Payload("pixels", source.tobytes())
            return Payload("encoded", _png(_pil().fromarray(source)))
        return Payload("encoded", _png(source))  # a PIL image


def _pil():
    from PIL import Image

    return Image


def _png(image) -> bytes:
    """Lossless, fast: the server decodes exactly these pixels. Modes PNG cannot hold become RGB."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def pixels_to_png(data: bytes) -> bytes:
    """Raw 32x32x3 pixels for a request that must carry encoded images (REST multipart)."""
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(SIZE, SIZE, 3)
    return _png(_pil().fromarray(pixels))


def _is_pil(obj: object) -> bool:
    module = sys.modules.get("PIL.Image")  # never import Pillow just to ask
    return module is not None and isinstance(obj, module.Image)


def _check_array(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 (0..255), got {a.dtype}")
    if a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        raise ValueError(f"a numpy image is H x W x 3 (RGB, HWC), got shape {a.shape}")
    return np.ascontiguousarray(a)


def to_item(image: object) -> Item:
    """One image: a path (str or os.PathLike), encoded bytes, an H x W x 3 uint8 array, a PIL image."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # reported when it is loaded, as this image's own error
        return Item(path, size)
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        return Item(data, len(data))
    if isinstance(image, np.ndarray):
        a = _check_array(image)
        return Item(a, a.nbytes)
    if _is_pil(image):
        w, h = image.size  # type: ignore[attr-defined]
        return Item(image, w * h * 3)
    raise TypeError(
        f"cannot classify a {type(image).__name__}: give a path, encoded bytes, "
        "a uint8 H x W x 3 numpy array or a PIL image"
    )


def to_items(images: Iterable[object] | np.ndarray) -> list[Item]:
    """Many images: an iterable of single images, or one uint8 N x H x W x 3 array."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"a numpy batch is N x H x W x 3, got shape {images.shape}")
        return [to_item(a) for a in images]
    if isinstance(images, str | bytes | os.PathLike) or _is_pil(images):
        raise TypeError("classify_batch takes a list of images; use classify() for one")
    return [to_item(image) for image in images]
