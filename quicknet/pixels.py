"""How an image becomes the model's input, one rule for the server (`quicknet/serve/images.py`) and
the client's `resize=True` (`quicknet/client/inputs.py`), so the pixels a client sends are the ones
the server would compute from the same file: the formats read, JPEG's reduced-scale decode, 16-bit
scaled to 8, alpha composited on white, a bicubic (antialiased) resize to 32x32, aspect ratio not
kept. Pillow is imported inside the functions: the client installs without it (its `resize` extra).
"""

from __future__ import annotations

import numpy as np

SIZE = 32
PIXELS_PER_IMAGE = SIZE * SIZE * 3
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # Pillow's names; every other reader stays unused

# JPEGs are decoded at a reduced scale (1/2, 1/4 or 1/8, in libjpeg's DCT) that still leaves at
# least this many pixels a side, then resized to 32x32 with the same antialiasing filter: a
# 4000x3000 photo decodes at 500x375 (~9 ms against ~150 ms in full; benchmarks/README.md), and the
# final bicubic resize still averages many pixels into each of the 32x32 (accuracy: the same).
DRAFT_MIN_SIDE = 4 * SIZE


def load_first_frame(im) -> None:
    """Decode a PIL image's first frame, a JPEG at the reduced scale above (a no-op below twice that
    a side). Pillow raises on damaged, truncated or hostile data: the caller says so in its words."""
    im.seek(0)
    if im.format == "JPEG":
        im.draft(None, (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
    im.load()


def to_rgb(im):
    """A decoded PIL image as 8-bit RGB: 16-bit scaled to 8, alpha composited on white."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.uint32)
        peak = 65535 if im.mode != "I" or arr.max() > 255 else 255
        return Image.fromarray((arr * 255 // peak).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def model_input(rgb) -> np.ndarray:
    """An RGB PIL image as the model's uint8 32x32x3 input (bicubic resize when it is another size)."""
    from PIL import Image

    if rgb.size != (SIZE, SIZE):
        rgb = rgb.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)
