"""Turn whatever image a user sends into the array the model expects.

One decoder for training and serving, so both see the same pixels: EXIF rotation is
applied, palette/CMYK/RGBA/16-bit/grey are all normalised to 8-bit RGB, and size limits
refuse decompression bombs before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What Pillow raises on truncated or broken files, at open (header) or at load (pixels) time.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, ArithmeticError, struct.error)


class ImageError(ValueError):
    """An image that cannot be used; ``code`` is a stable, machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# The crop framing of a model whose training faces came already cropped (FER2013's 48x48 faces):
# the margin around a detector's box (infantino.faces) at which that model sees faces at the
# scale it was trained on. Chosen by measurement on the feedback half of the infant photos: as it
# is, the shipped model reads margins -0.15 to +0.05 within 3 photos of each other
# (bench/face_framing.py), but what the online loop learns from the feedback peaks at -0.1, a crop
# 0.8 of the box's side (brow to chin, without hair and ears): 59.3% after the domain memory against
# 53.9% at 0 (bench/framing_for_learning.py, 2026-12-06). A model trained with `--crop-faces`
# records its own margin instead.
PRECROPPED_FACE_MARGIN = -0.1


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input, framing included. Stored with every backbone version.

    ``face_margin`` is the framing: the margin around a detected face's box (a fraction of the
    box's side, each way) at which this model expects faces. It travels with the model because
    a model trained on tightly framed faces must be served tight crops, and one trained on
    loose crops, loose ones.
    """

    input_size: int = 64
    grayscale: bool = True
    mean: float = 0.5
    std: float = 0.5
    face_margin: float = PRECROPPED_FACE_MARGIN

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "grayscale": self.grayscale, "mean": self.mean, "std": self.std,
                "face_margin": self.face_margin}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        # A model registered before framing was recorded was trained on pre-cropped faces.
        margin = d.get("face_margin")
        return cls(
            input_size=int(d["input_size"]),
            grayscale=str(d.get("grayscale", True)).lower() in ("1", "true"),
            mean=float(d.get("mean", 0.5)),
            std=float(d.get("std", 0.5)),
            face_margin=PRECROPPED_FACE_MARGIN if margin in (None, "") else float(margin),
        )


def open_image(
    source: bytes | str | Path, max_bytes: int | None = None, max_pixels: int | None = None, reduce_to: int | None = None,
) -> Image.Image:
    """Decode bytes or a file into an upright 8-bit RGB PIL image, or raise ImageError.

    ``reduce_to``: the caller will shrink the whole image to this many pixels a side, so a
    JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay at least that
    (Pillow's draft mode: the DCT does the downscaling; 6x faster for a 640x480 photo to
    64 px, a mean pixel difference of 0.2 grey levels after the final resize).
    """
    if isinstance(source, (str, Path)):
        source = Path(source).read_bytes()
    if not source:
        raise ImageError("empty_image", "the image is empty (0 bytes)")
    if max_bytes is not None and len(source) > max_bytes:
        raise ImageError("image_too_large", f"the image has {len(source)} bytes; the limit is {max_bytes}")
    try:
        # Our own pixel limit applies below, with our error; Pillow's is a second line of defence
        # (it refuses twice its MAX_IMAGE_PIXELS at open) whose warning we silence here only.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source))
    except Image.DecompressionBombError as exc:
        raise ImageError("image_too_large", f"the image is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(
            "not_an_image",
            "the body is not an image Pillow can read (accepted: jpeg, png, webp, gif, bmp, tiff and other Pillow formats)",
        ) from None
    except _DECODE_ERRORS as exc:  # a known format whose header is cut short or broken
        raise ImageError("corrupt_image", f"the image header could not be read (truncated or corrupt): {exc}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError("image_too_large", f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        if reduce_to and img.format == "JPEG":
            img.draft(img.mode, (reduce_to, reduce_to))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except _DECODE_ERRORS as exc:
        raise ImageError("corrupt_image", f"the image could not be decoded (truncated or corrupt): {exc}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow's convert('L') clips 16-bit values at 255; rescale to the real range instead.
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0
        scale = 255.0 / top if top > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as most viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def to_model_array(img: Image.Image, size: int, grayscale: bool) -> np.ndarray:
    """Resize to a size×size uint8 array (H, W, 3); grey images keep 3 identical channels."""
    if grayscale:
        img = img.convert("L")
    img = img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def normalise(batch_uint8: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), scaled as the backbone was trained."""
    x = batch_uint8.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - prep.mean) / prep.std


def shared_input(preps: "list[Preprocessing]") -> Preprocessing:
    """One input array for several models (one per task): the largest size, colour unless all are grey.

    Each model then takes what it needs with :func:`fit_input`; with a single task, or tasks
    that agree, that is the array itself and nothing is resized twice. Faces are framed as the
    first model (the default task's) was trained: its ``face_margin``.
    """
    return Preprocessing(input_size=max(p.input_size for p in preps), grayscale=all(p.grayscale for p in preps),
                         face_margin=preps[0].face_margin)


def fit_input(batch_uint8: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Adapt uint8 (N, H, W, 3) arrays made for a :func:`shared_input` to one model's preprocessing."""
    size_ok = batch_uint8.shape[1] == prep.input_size and batch_uint8.shape[2] == prep.input_size
    grey_ok = not prep.grayscale or (
        np.array_equal(batch_uint8[..., 0], batch_uint8[..., 1]) and np.array_equal(batch_uint8[..., 1], batch_uint8[..., 2]))
    if size_ok and grey_ok:
        return batch_uint8
    return np.stack([to_model_array(Image.fromarray(a), prep.input_size, prep.grayscale) for a in batch_uint8])
