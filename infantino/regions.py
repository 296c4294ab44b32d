"""From an image to what the model classifies: the whole image, its largest face, or every face.

One function for training (``train --crop-faces``), serving (``faces=true``, ``face_crop=true``,
``/predict_sequence``) and the benchmarks, so a face is framed the same way everywhere: at the
margin the model was trained with (``Preprocessing.face_margin``), unless overridden.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from infantino.faces import Face, FaceDetector, crop_face
from infantino.images import Preprocessing, to_model_array

Mode = Literal["whole", "largest", "all"]
MODES: tuple[str, ...] = ("whole", "largest", "all")


@dataclass(frozen=True)
class Region:
    """One thing to classify: the whole image, or one face cropped from it."""

    array: np.ndarray  # model input, uint8 (S, S, 3)
    image: bytes | None  # what is kept for feedback and re-embedding (the upload, or the face crop as PNG), if asked
    face: Face | None = None


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def find_regions(
    img: Image.Image, prep: Preprocessing, mode: Mode, detector: FaceDetector | None, *,
    original: bytes | None = None, keep_images: bool = True, max_faces: int = 10, margin: float | None = None,
) -> list[Region]:
    """The regions of ``img`` to classify, by ``mode``:

    - ``whole``: the image itself;
    - ``largest``: its largest face, else the whole image (one region, always);
    - ``all``: every face (at most ``max_faces``, largest first), possibly none.

    Faces are cropped at ``margin`` (default: the model's own ``prep.face_margin``). With
    ``keep_images`` each region carries the bytes to store: ``original`` (the upload) for the
    whole image, else a PNG of it; a PNG of the crop for a face.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    found = detector.detect(img)[:max_faces] if mode != "whole" and detector is not None else []
    if mode == "largest":
        found = found[:1]
    if not found:
        if mode == "all":
            return []
        keep = (original if original is not None else png(img)) if keep_images else None
        return [Region(to_model_array(img, prep.input_size, prep.grayscale), keep)]
    margin = prep.face_margin if margin is None else margin
    regions = []
    for face in found:
        crop = crop_face(img, face, margin)
        regions.append(Region(to_model_array(crop, prep.input_size, prep.grayscale), png(crop) if keep_images else None, face))
    return regions
