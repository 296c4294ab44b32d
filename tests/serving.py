"""Helpers for tests that run a real `bentoml serve`: a tiny trained registry and image bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from typing import Sequence

from conftest import TINY_CLASSES, draw_face, make_image_folder
from infantino.settings import Settings
from registry.store import ModelRegistry
from training.pipeline import train_and_register
from training.trainer import TrainConfig


def train_tiny_registry(home: Path, per_class: int = 30, epochs: int = 15, task: str | None = None,
                        classes: Sequence[str] = TINY_CLASSES, image_size: int = 48, grayscale: bool = True) -> ModelRegistry:
    """Train test_efficientnet on drawn faces (class i gets mouth shape i) and register it as
    ``task``'s champion (default: expression, 3 classes, 48 px grey)."""
    data = make_image_folder(home.parent / f"{home.name}-{task or 'faces'}", classes=classes, per_class=per_class, seed=1)
    registry = ModelRegistry(Settings(home=home), task=task)
    cfg = TrainConfig(backbone="test_efficientnet", image_size=image_size, grayscale=grayscale, epochs=epochs, batch_size=16,
                      lr=3e-3, threads=1, mixup_prob=0.0, occlusion_p=0.0, erasing_p=0.0, val_fraction=0.25)
    train_and_register(data, cfg, registry, classes=None)
    return registry


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def faces(n_per_class: int, seed: int, shifted: bool = False) -> list[tuple[bytes, str]]:
    """(png bytes, label) pairs; ``shifted`` makes them under-exposed (a third of the brightness),
    like a dim ward at night: a domain the model never saw."""
    rng = np.random.default_rng(seed)
    out = []
    for label, name in enumerate(TINY_CLASSES):
        for _ in range(n_per_class):
            img = draw_face(label, 48, rng)
            out.append((png_bytes(Image.eval(img, lambda v: v // 3) if shifted else img), name))
    return out
