"""runtime/images.py load_image on what users actually feed it (issue 20): 16-bit and float images
scaled to 8 bits (not clipped), animated images (first frame, logged), EXIF orientation, odd
Pillow modes, bad arrays, decompression bombs; plus a hypothesis sweep over modes, sizes and bit
depths whose only acceptable outcomes are an InputError or a correct 8-bit image."""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen_image_edge.runtime.errors import InputError
from qwen_image_edge.runtime.images import load_image, vae_input, vision_rgb

EIGHT_BIT = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}


def scaled16(v) -> np.ndarray:
    """The 8-bit value of 16-bit data: nearest of 255/65535 steps (what an 8-bit re-encoder writes)."""
    return np.rint(np.asarray(v, np.float64) * 255 / 65535).astype(np.uint8)


def png16(path, arr: np.ndarray) -> None:
    """A 16-bit-per-channel PNG written by hand (Pillow cannot write 16-bit RGB): [H, W, 3|4] uint16."""
    h, w, c = arr.shape
    color_type = {3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


GREY16 = np.array([[0, 1000, 30000, 65535], [257, 32896, 65278, 128]], np.uint16)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(GREY16).save(path)
    assert Image.open(path).mode == "I;16"  # how Pillow opens it
    img = load_image(path)
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), scaled16(GREY16))
    assert np.asarray(img)[0, 1] == 4  # 1000/65535 of full scale; Pillow's own convert("L") gives 255


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_modes(mode):
    if mode == "I":
        img = Image.fromarray(GREY16.astype(np.int32))
    else:
        img = Image.frombytes(mode, (4, 2), GREY16.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    assert img.mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(img)), scaled16(GREY16))


def test_mode_i_outside_sixteen_bits_is_refused():
    with pytest.raises(InputError, match=r"0\.\.65535, found -5\.\.70000"):
        load_image(Image.fromarray(np.array([[-5, 70000]], np.int32)))


def test_float_mode_is_taken_from_zero_to_one():
    arr = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(arr, "F"))), [[0, 64, 128, 255]])
    with pytest.raises(InputError, match=r"\[0, 1\].*found 0\.\.255"):
        load_image(Image.fromarray(arr * 255, "F"))
    with pytest.raises(InputError, match="NaN"):
        load_image(Image.fromarray(np.array([[np.nan]], np.float32), "F"))


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_rgb_png(tmp_path, channels):
    rng = np.random.default_rng(channels)
    arr = rng.integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    arr[0, 0] = 65535
    arr[0, 1] = 300  # 8-bit clipping would make this 255
    png16(tmp_path / "c16.png", arr)
    img = load_image(tmp_path / "c16.png")
    assert img.mode == ("RGB" if channels == 3 else "RGBA")
    # Pillow keeps the high byte (floor(v / 256)); the exact rounding is within one level of it.
    diff = np.abs(np.asarray(img).astype(int) - scaled16(arr).astype(int))
    assert diff.max() <= 1
    assert np.asarray(img)[0, 1, 0] == 1


def test_arrays_of_every_bit_depth():
    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    np.testing.assert_array_equal(np.asarray(load_image(u16)), scaled16(u16))
    f = rng.random((6, 5, 4))
    for dtype in (np.float16, np.float32, np.float64):
        expected = np.rint(f.astype(dtype).astype(np.float64) * 255).astype(np.uint8)
        out = load_image(f.astype(dtype))
        assert out.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(load_image(u16[..., :1])), scaled16(u16[..., 0]))  # [H, W, 1]


@pytest.mark.parametrize(("array", "match"), [
    (np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
    (np.full((4, 4), -0.5, np.float32), r"\[0, 1\]"),
    (np.full((4, 4), np.inf), "NaN or Inf"),
    (np.zeros((4, 4, 3), np.int32), "expected uint8, uint16"),
    (np.zeros((4, 4), bool), "expected uint8, uint16"),
    (np.zeros((4, 4, 2), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((0, 4, 3), np.uint8), "H, W > 0"),
    (np.zeros((2, 4, 4, 3), np.uint8), r"\[H, W, 3\]"),
])
def test_bad_arrays(array, match):
    with pytest.raises(InputError, match=match):
        load_image(array)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_their_first_frame(tmp_path, caplog, fmt):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 8), c) for c in colours]
    path = tmp_path / f"anim.{fmt.lower()}"
    options = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    with Image.open(path) as check:
        assert check.n_frames == 3
    with caplog.at_level(logging.WARNING, logger="qwen_image_edge.runtime.images"):
        img = load_image(path)
    assert img.convert("RGB").getpixel((3, 3)) == colours[0]
    assert any("animated (3 frames); using its first frame" in r.getMessage() for r in caplog.records)
    with Image.open(path) as opened:  # an open PIL image on another frame: the first frame too, position kept
        opened.seek(2)
        assert load_image(opened).convert("RGB").getpixel((3, 3)) == colours[0]
        assert opened.tell() == 2


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as a phone held upright writes it
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "phone.jpg")
    assert loaded.size == (20, 40)
    r, g, b = loaded.getpixel((10, 3))  # the stored left edge is now at the top
    assert b > 200 and r < 60


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(tmp_path / "big.png")


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"])
def test_other_modes_become_rgb_or_rgba(mode):
    img = Image.new(mode, (6, 4))
    out = load_image(img)
    assert out.mode == ("RGBA" if mode == "RGBa" else "RGB") and out.size == (6, 4)


def test_a_mode_pillow_cannot_convert_is_an_input_error():
    with pytest.raises(InputError, match="mode La cannot be converted"):
        load_image(Image.new("La", (2, 2)))


def test_runtime_edits_a_sixteen_bit_image_as_its_eight_bit_version(runtime_pipe, tmp_path):
    """End to end: the runtime edits a 16-bit PNG exactly as it edits the correctly scaled 8-bit image."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 65536, (48, 64, 3), dtype=np.uint16)
    png16(tmp_path / "photo16.png", arr)
    eight = Image.open(tmp_path / "photo16.png").convert("RGB")  # what Pillow decoded, 8-bit
    a = runtime_pipe.edit([str(tmp_path / "photo16.png")], "make it blue", steps=1, seed=0)
    b = runtime_pipe.edit([eight], "make it blue", steps=1, seed=0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    grey = GREY16[:, :2].repeat(16, 0).repeat(16, 1)  # [32, 32] 16-bit greyscale
    c = runtime_pipe.edit([Image.fromarray(grey)], "make it blue", steps=1, seed=0)
    d = runtime_pipe.edit([Image.fromarray(scaled16(grey))], "make it blue", steps=1, seed=0)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


# --------------------------------------------------------------------------------- hypothesis

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I", "F", "CMYK", "YCbCr"]


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I;16B"):
        data = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        return mode, data, Image.frombytes(mode, (w, h), data.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "I":
        data = rng.integers(draw(st.sampled_from([0, -10])), draw(st.sampled_from([65536, 70000])), (h, w))
        return mode, data, Image.fromarray(data.astype(np.int32))
    if mode == "F":
        data = rng.random((h, w)).astype(np.float32) * draw(st.sampled_from([1.0, 1.5]))
        return mode, data, Image.fromarray(data, "F")
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    return mode, data, Image.frombytes(mode, (w, h), data.tobytes())


@settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pil_images())
def test_property_any_pil_mode(example):
    mode, data, img = example
    try:
        out = load_image(img)
    except InputError:
        # Only data outside the declared range may be refused.
        assert mode in ("I", "F") and (data.min() < 0 or data.max() > (65535 if mode == "I" else 1.0))
        return
    assert out.mode in EIGHT_BIT and out.size == img.size
    if mode in ("I;16", "I;16B", "I"):
        np.testing.assert_array_equal(np.asarray(out), scaled16(data))
    elif mode == "F":
        np.testing.assert_array_equal(np.asarray(out), np.rint(data.astype(np.float64) * 255).astype(np.uint8))
    elif mode in EIGHT_BIT:
        assert out is img  # 8-bit input is passed through untouched
    rgb, vae = vision_rgb(out), vae_input(out, 32, 32)  # and the pipeline can take it
    assert rgb.mode == "RGB" and vae.shape == (1, 4, 32, 32) and np.isfinite(vae).all()


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(["uint8", "uint16", "float16", "float32", "float64", "int32", "bool"]))
    shape = draw(st.sampled_from([(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4), (5, 7, 2), (0, 7, 3), (2, 2, 2, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.startswith("float"):
        scale = draw(st.sampled_from([1.0, 1.0, 255.0]))
        arr = (rng.random(shape) * scale).astype(dtype)
        if draw(st.booleans()) and arr.size:
            arr.flat[0] = draw(st.sampled_from([np.nan, np.inf, -0.1]))
    elif dtype == "bool":
        arr = rng.random(shape) > 0.5
    else:
        arr = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    return arr


@settings(derandomize=True, max_examples=150, deadline=None)
@given(arrays())
def test_property_any_array(arr):
    try:
        out = load_image(arr)
    except InputError:
        valid_shape = arr.size > 0 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)))
        in_range = arr.dtype.kind != "f" or not arr.size or (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1)
        assert not (valid_shape and in_range and arr.dtype.name in ("uint8", "uint16") + ("float16", "float32", "float64"))
        return
    squeezed = arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    expected = {"uint8": lambda a: a, "uint16": scaled16}.get(
        arr.dtype.name, lambda a: np.rint(a.astype(np.float64) * 255).astype(np.uint8))(squeezed)
    np.testing.assert_array_equal(np.asarray(out), expected)
