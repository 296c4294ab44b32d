"""infantino.images: every odd format becomes upright 8-bit RGB; bad input gets a stable error code."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from testkit.faces import draw_face
from infantino.images import ImageError, Preprocessing, fit_input, normalise, open_image, shared_input, to_model_array
from infantino.settings import get_settings


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def error_code(data, **kw) -> str:
    with pytest.raises(ImageError) as info:
        open_image(data, **kw)
    assert str(info.value)  # every error carries a human message too
    return info.value.code


def face_contrast(rgb: np.ndarray) -> float:
    """Brightness of the face centre minus the background corner (the drawn face is light on dark)."""
    h, w = rgb.shape[:2]
    centre = rgb[int(h * 0.25) : int(h * 0.4), int(w * 0.3) : int(w * 0.7)].mean()
    corner = rgb[:3, :3].mean()
    return float(centre - corner)


# ---- formats --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_common_formats_decode_to_rgb(fmt):
    face = draw_face(0, size=48)
    img = open_image(encode(face, fmt))
    assert img.mode == "RGB" and img.size == (48, 48)
    arr = np.asarray(img)
    assert face_contrast(arr) > 100, "the light face on a dark background should survive decoding"
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless
        assert np.array_equal(arr, np.asarray(face))


def test_path_and_bytes_give_the_same_pixels(tmp_path):
    face = draw_face(1, size=40)
    path = tmp_path / "face.png"
    face.save(path)
    from_path = np.asarray(open_image(path))
    from_str = np.asarray(open_image(str(path)))
    from_bytes = np.asarray(open_image(path.read_bytes()))
    assert np.array_equal(from_path, from_bytes) and np.array_equal(from_str, from_bytes)


def test_grey_image_keeps_its_values():
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))  # 5x25 gradient
    img = open_image(encode(Image.fromarray(grey, mode="L"), "PNG"))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (5, 25, 3)
    for c in range(3):
        assert np.array_equal(arr[..., c], grey)


def test_rgba_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (6, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (200, 10, 20, 255))  # opaque red
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    arr = np.asarray(open_image(encode(rgba, "PNG")))
    assert arr[3, 5].tolist() == [255, 255, 255]
    assert arr[0, 0].tolist() == [200, 10, 20]
    assert 120 <= arr[0, 1, 0] <= 135 and arr[0, 1, 0] == arr[0, 1, 1] == arr[0, 1, 2]


def test_grey_with_alpha_transparent_becomes_white():
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((0, 0), (30, 255))
    arr = np.asarray(open_image(encode(la, "PNG")))
    assert arr[0, 0].tolist() == [30, 30, 30]
    assert arr[2, 2].tolist() == [255, 255, 255]


def _palette_image() -> Image.Image:
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))  # 0 black, 1 red, 2 blue
    p.putpixel((0, 0), 1)
    p.putpixel((1, 0), 2)
    return p


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_without_transparency(fmt):
    arr = np.asarray(open_image(encode(_palette_image(), fmt)))
    assert arr[0, 0].tolist() == [255, 0, 0]
    assert arr[0, 1].tolist() == [0, 0, 255]
    assert arr[3, 3].tolist() == [0, 0, 0]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparent_index_becomes_white(fmt):
    arr = np.asarray(open_image(encode(_palette_image(), fmt, transparency=0)))
    assert arr[3, 3].tolist() == [255, 255, 255]  # index 0 was black but is transparent
    assert arr[0, 0].tolist() == [255, 0, 0]
    assert arr[0, 1].tolist() == [0, 0, 255]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = open_image(data)
    r, g, b = np.asarray(img)[4, 8].tolist()
    assert img.mode == "RGB"
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_keeps_contrast():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    arr = np.asarray(open_image(data))[..., 0].astype(int)
    assert not (arr == 255).all()
    assert arr.min() <= 2 and arr.max() >= 253
    assert len(np.unique(arr)) > 200  # a full 8-bit range, not a clipped two-tone image
    assert (np.diff(arr.ravel()) >= 0).all()  # the ramp is still a ramp


def test_12_bit_values_in_16_bit_png_are_stretched_not_clipped():
    face8 = np.asarray(draw_face(2, size=32).convert("L")).astype(np.float64)
    face16 = (face8 * 16).astype(np.uint16)  # a 12-bit sensor's range, 0..4080
    arr = np.asarray(open_image(encode(Image.fromarray(face16), "PNG")))[..., 0].astype(np.float64)
    expected = face16 * 255.0 / face16.max()
    assert np.abs(arr - expected).max() <= 1.0
    assert face_contrast(arr[..., None]) > 80 and (arr < 128).mean() > 0.3  # not clipped to white


def _exif_jpeg(orientation: int) -> bytes:
    """A 40 wide x 20 tall black JPEG with a white 10x10 patch in its stored top-left corner."""
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif, quality=95)


def _bright_corner(arr: np.ndarray) -> str:
    corners = {
        "top-left": arr[:8, :8], "top-right": arr[:8, -8:],
        "bottom-left": arr[-8:, :8], "bottom-right": arr[-8:, -8:],
    }
    means = {k: v.mean() for k, v in corners.items()}
    best = max(means, key=means.get)
    assert means[best] > 200 and sorted(means.values())[-2] < 40
    return best


@pytest.mark.parametrize(
    "orientation, corner",
    [(1, "top-left"), (6, "top-right"), (8, "bottom-left"), (3, "bottom-right")],
)
def test_exif_orientation_is_applied(orientation, corner):
    data = _exif_jpeg(orientation)
    assert Image.open(io.BytesIO(data)).size == (40, 20)  # stored landscape
    arr = np.asarray(open_image(data))
    expected_shape = (40, 20, 3) if orientation in (6, 8) else (20, 40, 3)  # 6 and 8 turn it upright
    assert arr.shape == expected_shape
    assert _bright_corner(arr) == corner


def test_exif_rotation_reaches_the_model_array():
    """Same picture stored sideways with an Orientation tag == the upright picture."""
    upright = draw_face(0, size=48)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes before tagging it 6
    exif = Image.Exif()
    exif[0x0112] = 6
    a = to_model_array(open_image(encode(upright, "JPEG", quality=95)), 32, True).astype(int)
    b = to_model_array(open_image(encode(stored, "JPEG", quality=95, exif=exif)), 32, True).astype(int)
    c = to_model_array(open_image(encode(stored, "JPEG", quality=95)), 32, True).astype(int)  # untagged
    assert np.abs(a - b).mean() < 6
    assert np.abs(a - c).mean() > 3 * np.abs(a - b).mean()


# ---- to_model_array / normalise ---------------------------------------------------------------

def test_to_model_array_grey_and_colour():
    img = Image.new("RGB", (50, 30), (200, 30, 10))
    grey = to_model_array(img, 24, grayscale=True)
    colour = to_model_array(img, 24, grayscale=False)
    assert grey.shape == colour.shape == (24, 24, 3)
    assert grey.dtype == colour.dtype == np.uint8
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert colour[12, 12].tolist() == [200, 30, 10]
    expected_luma = round(200 * 0.299 + 30 * 0.587 + 10 * 0.114)
    assert abs(int(grey[12, 12, 0]) - expected_luma) <= 1


def test_normalise_and_preprocessing_round_trip():
    prep = Preprocessing(input_size=8, grayscale=False, mean=0.5, std=0.25)
    assert Preprocessing.from_dict({k: str(v) for k, v in prep.to_dict().items()}) == prep
    batch = np.zeros((2, 8, 8, 3), np.uint8)
    batch[1] = 255
    out = normalise(batch, prep)
    assert out.shape == (2, 3, 8, 8) and out.dtype == np.float32
    assert np.allclose(out[0], -2.0) and np.allclose(out[1], 2.0)


# ---- errors -----------------------------------------------------------------------------------------

def test_empty_bytes():
    assert error_code(b"") == "empty_image"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert error_code(path) == "empty_image"


def test_random_bytes_and_text_are_not_images():
    assert error_code(np.random.default_rng(0).bytes(2048)) == "not_an_image"
    assert error_code(b"hello, I am a text file\n" * 10) == "not_an_image"


def test_truncated_jpeg_pixels():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    assert error_code(data[: len(data) // 2]) == "corrupt_image"


def test_truncated_jpeg_header():
    """Cut inside the EXIF segment: Pillow fails while opening, which must still be corrupt_image."""
    data = _exif_jpeg(6)
    assert error_code(data[:60]) == "corrupt_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_every_truncation_gives_an_image_error(fmt):
    """Never a raw OSError/ValueError: whatever the cut, the caller gets an ImageError code."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, fmt, **({"exif": exif} if fmt in ("JPEG", "PNG", "WEBP") else {}))
    codes = set()
    for n in range(1, len(data), max(len(data) // 60, 1)):
        try:
            open_image(data[:n])
            codes.add("ok")
        except ImageError as exc:
            codes.add(exc.code)
    assert codes <= {"ok", "not_an_image", "corrupt_image"}
    assert "corrupt_image" in codes or "not_an_image" in codes


def test_too_many_bytes():
    data = encode(draw_face(0, 32), "PNG")
    assert error_code(data, max_bytes=len(data) - 1) == "image_too_large"
    assert open_image(data, max_bytes=len(data)).size == (32, 32)


def test_too_many_pixels():
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    assert error_code(data, max_pixels=4999) == "image_too_large"
    assert open_image(data, max_pixels=5000).size == (100, 50)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of width x height zeros: huge when decoded, tiny on disk."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _png_bomb(9000, 9000)  # 81 Mpixel (243 MB as RGB) in a few tens of kB
    assert len(bomb) < 200_000
    assert Image.open(io.BytesIO(bomb)).size == (9000, 9000)  # a real, readable PNG
    limit = get_settings().limits.max_image_pixels  # the service's default limit
    assert 9000 * 9000 > limit
    started = time.perf_counter()
    with pytest.raises(ImageError) as info:
        open_image(bomb, max_bytes=get_settings().limits.max_image_bytes, max_pixels=limit)
    assert info.value.code == "image_too_large"
    assert "9000x9000" in str(info.value)
    assert time.perf_counter() - started < 0.5  # refused from the header, nothing decoded


def test_lying_png_header_is_refused_by_size_not_decoded():
    """A 1x1 PNG whose header claims 100000x100000: refused on the header's numbers."""
    good = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    body_start = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR body, crc
    lying = good[:8] + _png_chunk(b"IHDR", ihdr) + good[body_start:]
    assert len(lying) < 100
    assert error_code(lying, max_pixels=10_000_000) == "image_too_large"


def test_reduced_jpeg_decode_keeps_the_model_input():
    """reduce_to decodes a big JPEG at a fraction of its size, never below the model size, with
    (almost) the same model input as a full decode; other formats and small targets are untouched."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    jpeg = encode(photo, "JPEG", quality=90)
    reduced = open_image(jpeg, reduce_to=64)
    assert reduced.mode == "RGB" and min(reduced.size) >= 64 and reduced.size[0] <= 1600 // 8 * 2
    full, small = (to_model_array(img, 64, True).astype(int) for img in (open_image(jpeg), reduced))
    assert np.abs(full - small).mean() < 2.0
    assert open_image(jpeg, reduce_to=2000).size == (1600, 1200)  # never below what was asked
    assert open_image(encode(photo, "PNG"), reduce_to=64).size == (1600, 1200)  # only JPEG has a draft mode


def test_shared_input_serves_tasks_with_different_preprocessing():
    grey48, colour40 = Preprocessing(input_size=48, grayscale=True), Preprocessing(input_size=40, grayscale=False)
    shared = shared_input([grey48, colour40])
    assert (shared.input_size, shared.grayscale) == (48, False)
    assert shared_input([grey48]) == Preprocessing(input_size=48, grayscale=True)
    face = draw_face(1, 96, np.random.default_rng(0)).convert("RGB")
    tinted = Image.merge("RGB", [c.point(lambda v, k=k: min(255, v + 30 * k)) for k, c in enumerate(face.split())])
    batch = to_model_array(tinted, shared.input_size, shared.grayscale)[None]
    # Each task takes its own input from the shared array, close to preparing it from the image directly.
    for prep in (grey48, colour40):
        own = fit_input(batch, prep)
        assert own.shape == (1, prep.input_size, prep.input_size, 3)
        direct = to_model_array(tinted, prep.input_size, prep.grayscale)[None]
        assert np.abs(own.astype(int) - direct.astype(int)).mean() < 3.0
    assert fit_input(batch, shared) is batch  # agreeing preprocessing: nothing copied
    grey_batch = to_model_array(face, 48, True)[None]
    assert fit_input(grey_batch, grey48) is grey_batch
