from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from quicknet.serve.errors import InputError
from quicknet.serve.images import Limits, decode_image, decode_images, decode_pixels

LIMITS = Limits(max_image_bytes=1 << 20, max_image_pixels=4_000_000, max_images=4)
RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_round_trip_exactly(fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(PIXELS), fmt, **kw), LIMITS)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.array_equal(out, PIXELS)


def test_jpeg_decodes_close():
    out = decode_image(encode(Image.fromarray(PIXELS), "JPEG", quality=95), LIMITS)
    assert out.shape == (32, 32, 3)


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), LIMITS)
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_grayscale_rgba_palette_and_16_bit_become_rgb():
    gray = decode_image(encode(Image.fromarray(PIXELS[:, :, 0]), "PNG"), LIMITS)
    assert np.array_equal(gray[:, :, 0], PIXELS[:, :, 0]) and np.array_equal(gray[:, :, 0], gray[:, :, 2])
    rgba = np.dstack([PIXELS, np.zeros((32, 32), np.uint8)])
    assert (decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMITS) == 255).all()  # transparent → white
    pal = decode_image(encode(Image.fromarray(PIXELS).convert("P"), "PNG"), LIMITS)
    assert pal.shape == (32, 32, 3)
    sixteen = PIXELS[:, :, 0].astype(np.uint16) * 257
    out = decode_image(encode(Image.fromarray(sixteen), "PNG"), LIMITS)
    assert np.array_equal(out[:, :, 0], PIXELS[:, :, 0])


def test_resize_is_pillows_bicubic_to_exactly_32x32_without_keeping_the_aspect():
    source = RNG.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    reference = np.asarray(Image.fromarray(source).resize((32, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(decode_image(encode(Image.fromarray(source), "PNG"), LIMITS), reference)
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (64, 1, 3))  # 64x96 horizontal ramp
    out = decode_image(encode(Image.fromarray(ramp), "PNG"), LIMITS)
    expected = (np.arange(32) * 3 + 1) * 255 / 95  # each output pixel: mean of its 3 source columns
    assert np.abs(out[16, 4:28, 0] - expected[4:28]).max() <= 1.0, "bicubic reproduces a linear ramp"


def test_cmyk_jpeg_converts_like_the_reference_formula():
    cmyk = np.zeros((32, 32, 4), np.uint8)
    cmyk[..., 0], cmyk[..., 3] = 64, 32  # C=64, K=32 everywhere
    out = decode_image(encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100), LIMITS)
    # Pillow's CMYK -> RGB: channel = (255 - ink) * (255 - K) / 255
    expected = np.array([(255 - 64) * (255 - 32) / 255, (255 - 0) * (255 - 32) / 255, (255 - 0) * (255 - 32) / 255])
    assert np.abs(out.reshape(-1, 3).mean(0) - expected).max() <= 3.0


def test_any_size_is_resized_to_32():
    big = Image.fromarray(RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    assert decode_image(encode(big, "PNG"), LIMITS).shape == (32, 32, 3)
    tiny = Image.fromarray(PIXELS[:5, :7])
    assert decode_image(encode(tiny, "PNG"), LIMITS).shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (b"", 400, "empty"),
        (b"hello world", 415, "not a recognised image"),
        (b"\x00" * (2 << 20), 413, r"is 2 MiB; the limit for one image is 1 MiB"),
    ],
)
def test_bad_inputs(data, status, fragment):
    with pytest.raises(InputError, match=fragment) as err:
        decode_image(data, LIMITS)
    assert err.value.status == status


@pytest.mark.parametrize("fmt", ["TIFF", "EPS", "PPM", "ICO"])
def test_other_formats_are_415_and_never_reach_their_readers(fmt, monkeypatch):
    """Only the five accepted formats' plugins see a client's bytes (EPS would start Ghostscript)."""
    data = encode(Image.fromarray(PIXELS), fmt)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        Image, "open", lambda fp, mode="r", formats=None: opened.append(formats) or real_open(fp, mode, formats)
    )
    with pytest.raises(InputError, match="not a recognised image") as err:
        decode_image(data, LIMITS)
    assert err.value.status == 415
    assert opened == [("PNG", "JPEG", "WEBP", "BMP", "GIF")]


def test_decompression_bomb_stops_at_the_header():
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(InputError, match="pixels") as err:
        decode_image(bomb, LIMITS)
    assert err.value.status == 413


def test_truncated_png():
    data = encode(Image.fromarray(PIXELS), "PNG")
    with pytest.raises(InputError, match="damaged or truncated"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_counts_and_raw_pixels():
    ok = encode(Image.fromarray(PIXELS), "PNG")
    assert decode_images([ok, ok], LIMITS).shape == (2, 32, 32, 3)
    with pytest.raises(InputError, match="limit is 4"):
        decode_images([ok] * 5, LIMITS)
    with pytest.raises(InputError, match="no images"):
        decode_images([], LIMITS)
    assert np.array_equal(decode_pixels(PIXELS.tobytes() * 2, LIMITS)[1], PIXELS)
    with pytest.raises(InputError, match="multiple of 3072"):
        decode_pixels(b"\x00" * 3073, LIMITS)


# --- the libspng fast path for 32x32 8-bit RGB PNGs -------------------------------------------------


def _plain_pngs() -> dict[str, bytes]:
    """32x32 RGB PNGs as encoders write them (IHDR, IDAT, IEND): every zlib level, Pillow's optimizer
    (all five row filters), one IDAT split in many chunks, flat and noisy pixels."""
    im = Image.fromarray(PIXELS)
    out = {f"level {lvl}": encode(im, "PNG", compress_level=lvl) for lvl in range(10)}
    out["optimize"] = encode(im, "PNG", optimize=True)
    out["flat"] = encode(Image.fromarray(np.zeros((32, 32, 3), np.uint8)), "PNG")
    ramp = np.tile(np.arange(32, dtype=np.uint8)[:, None, None] * 8, (1, 32, 3))  # rows Up/Sub filter well
    out["ramp"] = encode(Image.fromarray(ramp), "PNG")
    out["many IDATs"] = _split_idat(out["level 6"], 100)
    return out


def _chunk(kind: bytes, payload: bytes) -> bytes:
    import zlib

    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def _split_idat(png: bytes, size: int) -> bytes:
    at = png.index(b"IDAT") - 4
    length = int.from_bytes(png[at : at + 4], "big")
    payload = png[at + 8 : at + 8 + length]
    parts = b"".join(_chunk(b"IDAT", payload[i : i + size]) for i in range(0, length, size))
    return png[:at] + parts + png[at + 12 + length :]


def _with_idat(png: bytes, rows: bytes) -> bytes:
    """`png` with its image data replaced by `rows` (filtered scanlines), CRCs right."""
    import zlib

    at = png.index(b"IDAT") - 4
    length = int.from_bytes(png[at : at + 4], "big")
    return png[:at] + _chunk(b"IDAT", zlib.compress(rows)) + png[at + 12 + length :]


def _ancillary_pngs() -> dict[str, bytes]:
    """32x32 RGB PNGs with chunks a fast decoder could read differently from Pillow, well-formed or
    not (libspng accepts a short gAMA or a bad iCCP that Pillow refuses)."""
    from PIL import ImageCms, PngImagePlugin

    im = Image.fromarray(PIXELS)
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", (45455).to_bytes(4, "big"))
    info.add(b"sRGB", b"\x00")
    info.add_text("comment", "x" * 200)
    plain = encode(im, "PNG")
    out = {
        "tRNS colour": encode(im, "PNG", transparency=tuple(int(v) for v in PIXELS[0, 0])),
        "gAMA sRGB tEXt": encode(im, "PNG", pnginfo=info),
        "iCCP": encode(im, "PNG", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()),
        "pHYs": encode(im, "PNG", dpi=(72, 72)),
    }
    for name, chunk in {
        "short gAMA": _chunk(b"gAMA", b"\x00\x01"),
        "short tRNS": _chunk(b"tRNS", b"\x00"),
        "iCCP method 1": _chunk(b"iCCP", b"name\x00\x01" + b"x" * 20),
        "unknown critical chunk": _chunk(b"ABCD", b"1234"),
    }.items():
        out[name] = plain[:33] + chunk + plain[33:]
    return out


def _pillow_only(monkeypatch, data: bytes, limits: Limits = LIMITS):
    import quicknet.serve.images as images

    with monkeypatch.context() as m:
        m.setattr(images, "pyspng", None)
        return decode_image(data, limits)


def _answer(decode, data: bytes):
    """What a client would get: the pixels, or the error's status and message."""
    try:
        return decode(data)
    except InputError as e:
        return (e.status, str(e))


def _same_with_and_without_libspng(monkeypatch, data: bytes) -> bool:
    a = _answer(lambda d: decode_image(d, LIMITS), data)
    b = _answer(lambda d: _pillow_only(monkeypatch, d), data)
    return np.array_equal(a, b) if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else a == b


def test_the_fast_png_path_takes_plain_32x32_rgb_and_gives_pillows_pixels(monkeypatch):
    import quicknet.serve.images as images

    returned = []
    real = images.pyspng.load
    monkeypatch.setattr(images.pyspng, "load", lambda data, **kw: returned.append(real(data, **kw)) or returned[-1])
    for name, data in _plain_pngs().items():
        out = decode_image(data, LIMITS)
        assert returned and out is returned[-1], f"{name}: not decoded by libspng"
        returned.clear()
        assert out.dtype == np.uint8 and out.shape == (32, 32, 3) and out.flags.c_contiguous
        assert np.array_equal(out, _pillow_only(monkeypatch, data)), name
    assert np.array_equal(decode_image(_plain_pngs()["level 6"], LIMITS), PIXELS)


def test_other_pngs_take_pillow_with_pillows_answer(monkeypatch):
    import quicknet.serve.images as images

    monkeypatch.setattr(images.pyspng, "load", lambda *a, **k: pytest.fail("libspng saw a PNG it must not"))
    others = {
        **_ancillary_pngs(),
        "33x32": encode(Image.fromarray(RNG.integers(0, 256, (33, 32, 3), dtype=np.uint8)), "PNG"),
        "grayscale": encode(Image.fromarray(PIXELS[:, :, 0]), "PNG"),
        "RGBA": encode(Image.fromarray(np.dstack([PIXELS, PIXELS[:, :, :1]]), "RGBA"), "PNG"),
        "palette": encode(Image.fromarray(PIXELS).convert("P"), "PNG"),
        "16-bit RGB": _png_16_bit_rgb(),
    }
    for name, data in others.items():
        assert _same_with_and_without_libspng(monkeypatch, data), name
    png = _plain_pngs()["level 6"]
    small = [
        Limits(max_image_bytes=1 << 20, max_image_pixels=1023, max_images=4),  # below 32x32
        Limits(max_image_bytes=len(png) - 1, max_image_pixels=4_000_000, max_images=4),
    ]
    for limits in small:
        with pytest.raises(InputError) as e:
            decode_image(png, limits)
        assert e.value.status == 413


def _png_16_bit_rgb() -> bytes:
    import zlib

    rows = b"".join(b"\x00" + PIXELS[r].astype(">u2").tobytes() for r in range(32))
    ihdr = (32).to_bytes(4, "big") * 2 + bytes([16, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def test_a_damaged_32x32_png_gets_the_same_answer_with_and_without_libspng(monkeypatch):
    """Every cut, every flipped byte (the IHDR's CRC on), flipped image data under recomputed CRCs
    (libspng, as pyspng sets it up, checks neither CRCs nor Adler-32 and would return wrong pixels),
    and scanlines libspng itself refuses: the same pixels or the same InputError as Pillow alone."""
    import zlib

    data = _plain_pngs()["level 6"]
    cases = [data[:n] for n in range(20, len(data), 7)]
    for i in range(29, len(data), 5):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        cases.append(bytes(flipped))
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    for i in range(idat + 4, idat + 4 + length, 11):
        flipped = bytearray(data)
        flipped[i] ^= 0x55
        crc = zlib.crc32(bytes(flipped[idat : idat + 4 + length]))
        flipped[idat + 4 + length : idat + 8 + length] = crc.to_bytes(4, "big")
        cases.append(bytes(flipped))
    rows = [b"\x00" + PIXELS[r].tobytes() for r in range(32)]
    cases.append(_with_idat(data, b"".join(rows[:5]) + b"\x05" + rows[5][1:] + b"".join(rows[6:])))  # filter 5
    cases.append(_with_idat(data, b"".join(rows) + b"\x00"))  # a byte more than 32 rows
    cases.append(_with_idat(data, b"".join(rows[:31])))  # a row short
    cases.append(data + b"trailing bytes")
    for case in cases:
        assert _same_with_and_without_libspng(monkeypatch, case)
