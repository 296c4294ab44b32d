"""Test faces drawn with Pillow: class i gets mouth shape i (smile, frown, open mouth, straight).

Nothing here reads ../shared/data: tests and quick checks make their own images.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

TINY_CLASSES = ("happy", "sad", "surprise")


def draw_face(label: int, size: int = 48, rng: np.random.Generator | None = None) -> Image.Image:
    """A grey-background RGB picture of a light face whose mouth depends on ``label``.

    0: smile (arc opening up), 1: frown (arc opening down), 2: open mouth (a dark ellipse),
    anything else: a straight mouth. Position, size and brightness jitter with ``rng``.
    """
    rng = rng or np.random.default_rng(label)
    bg = int(rng.integers(20, 70))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    s = size / 48.0
    dx, dy = rng.integers(-3, 4, size=2) * s
    skin = int(rng.integers(190, 245))
    d.ellipse([8 * s + dx, 5 * s + dy, 40 * s + dx, 44 * s + dy], fill=(skin, skin - 10, skin - 25))
    for ex in (17, 31):  # eyes
        d.ellipse([(ex - 2.5) * s + dx, 17 * s + dy, (ex + 2.5) * s + dx, 21 * s + dy], fill=(15, 15, 15))
    box = [16 * s + dx, 28 * s + dy, 32 * s + dx, 38 * s + dy]
    width = max(int(2 * s), 1)
    if label == 0:
        d.arc(box, 10, 170, fill=(10, 10, 10), width=width)
    elif label == 1:
        d.arc([box[0], box[1] + 5 * s, box[2], box[3] + 5 * s], 190, 350, fill=(10, 10, 10), width=width)
    elif label == 2:
        d.ellipse([20 * s + dx, 29 * s + dy, 28 * s + dx, 39 * s + dy], fill=(10, 10, 10))
    else:
        d.line([box[0], 33 * s + dy, box[2], 33 * s + dy], fill=(10, 10, 10), width=width)
    return img


def make_image_folder(
    root: str | Path,
    classes: Sequence[str] = TINY_CLASSES,
    per_class: int = 12,
    size: int = 48,
    seed: int = 0,
    fmt: str = "PNG",
) -> Path:
    """Write ``root/<class>/<i>.<fmt>`` face images; class i gets mouth shape i. Returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    suffix = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}[fmt]
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_face(label, size, rng).save(folder / f"{i:03d}.{suffix}", fmt)
    return root


def face_arrays(n_per_class: int, n_classes: int = 3, size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 grey faces (N, size, size) and int labels, class-major."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label in range(n_classes):
        for _ in range(n_per_class):
            xs.append(np.asarray(draw_face(label, size, rng).convert("L")))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def faces(n_per_class: int, seed: int, shifted: bool = False, classes: Sequence[str] = TINY_CLASSES) -> list[tuple[bytes, str]]:
    """(png bytes, label) pairs; ``shifted`` makes them under-exposed (a third of the brightness),
    like a dim ward at night: a domain the model never saw."""
    rng = np.random.default_rng(seed)
    out = []
    for label, name in enumerate(classes):
        for _ in range(n_per_class):
            img = draw_face(label, 48, rng)
            out.append((png_bytes(Image.eval(img, lambda v: v // 3) if shifted else img), name))
    return out
