from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.images import InputError, Limits, decode_image, decode_images, decode_pixels

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
        (b"\x00" * (2 << 20), 413, "bytes; the limit"),
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


def _png_variants() -> dict[str, bytes]:
    """32x32 RGB PNGs as encoders write them: every zlib level, Pillow's optimizer, and the ancillary
    chunks a fast decoder could read differently (a transparent colour, gamma, sRGB, an ICC profile)."""
    from PIL import ImageCms, PngImagePlugin

    im = Image.fromarray(PIXELS)
    out = {f"level {lvl}": encode(im, "PNG", compress_level=lvl) for lvl in range(10)}
    out["optimize"] = encode(im, "PNG", optimize=True)
    out["tRNS colour"] = encode(im, "PNG", transparency=tuple(int(v) for v in PIXELS[0, 0]))
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", (45455).to_bytes(4, "big"))
    info.add(b"sRGB", b"\x00")
    info.add_text("comment", "x" * 200)
    out["gAMA sRGB tEXt"] = encode(im, "PNG", pnginfo=info)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out["iCCP"] = encode(im, "PNG", icc_profile=icc)
    flat = np.zeros((32, 32, 3), np.uint8)
    out["flat"] = encode(Image.fromarray(flat), "PNG")
    return out


def _pillow_only(monkeypatch, data: bytes):
    import service.images as images

    with monkeypatch.context() as m:
        m.setattr(images, "pyspng", None)
        return decode_image(data, LIMITS)


def test_the_fast_png_path_takes_32x32_rgb_and_gives_pillows_pixels(monkeypatch):
    import service.images as images

    calls = []
    real = images.pyspng.load
    monkeypatch.setattr(images.pyspng, "load", lambda data, **kw: calls.append(1) or real(data, **kw))
    for name, data in _png_variants().items():
        before = len(calls)
        out = decode_image(data, LIMITS)
        assert len(calls) == before + 1, f"{name}: not decoded by libspng"
        reference = _pillow_only(monkeypatch, data)
        assert out.dtype == np.uint8 and out.shape == (32, 32, 3) and out.flags.c_contiguous
        assert np.array_equal(out, reference), name
    assert np.array_equal(decode_image(_png_variants()["level 6"], LIMITS), PIXELS)


def test_other_pngs_take_pillow(monkeypatch):
    import service.images as images

    monkeypatch.setattr(images.pyspng, "load", lambda *a, **k: pytest.fail("libspng saw a non-32x32-RGB PNG"))
    decode_image(encode(Image.fromarray(RNG.integers(0, 256, (33, 32, 3), dtype=np.uint8)), "PNG"), LIMITS)
    decode_image(encode(Image.fromarray(PIXELS[:, :, 0]), "PNG"), LIMITS)  # grayscale
    decode_image(encode(Image.fromarray(np.dstack([PIXELS, PIXELS[:, :, :1]]), "RGBA"), "PNG"), LIMITS)
    decode_image(encode(Image.fromarray(PIXELS).convert("P"), "PNG"), LIMITS)
    tiny = Limits(max_image_bytes=1 << 20, max_image_pixels=1000, max_images=4)  # below 32x32: Pillow refuses
    with pytest.raises(InputError) as e:
        decode_image(encode(Image.fromarray(PIXELS), "PNG"), tiny)
    assert e.value.status == 413


def test_a_damaged_32x32_png_gets_the_same_answer_with_and_without_libspng(monkeypatch):
    """Every cut, every flipped byte, and flipped image data under recomputed CRCs (libspng, as
    pyspng sets it up, checks neither CRCs nor Adler-32 and would return wrong pixels): the same
    pixels or the same InputError as Pillow alone gives, never another exception."""
    import zlib

    data = _png_variants()["level 6"]
    cases = [data[:n] for n in range(33, len(data), 7)]
    for i in range(33, len(data), 5):
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
    for case in cases:
        try:
            reference = _pillow_only(monkeypatch, case)
        except InputError as e:
            with pytest.raises(InputError) as got:
                decode_image(case, LIMITS)
            assert (got.value.status, str(got.value)) == (e.status, str(e))
            continue
        assert np.array_equal(decode_image(case, LIMITS), reference)
