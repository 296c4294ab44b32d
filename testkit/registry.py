"""A tiny trained registry: a real backbone and head, trained in seconds on drawn faces."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from infantino.settings import Settings
from registry.store import ModelRegistry
from testkit.faces import TINY_CLASSES, make_image_folder


def train_tiny_registry(home: Path, per_class: int = 30, epochs: int = 15, task: str | None = None,
                        classes: Sequence[str] = TINY_CLASSES, image_size: int = 48, grayscale: bool = True,
                        face_margin: float = 0.0) -> ModelRegistry:
    """Train test_efficientnet on drawn faces (class i gets mouth shape i) and register it as
    ``task``'s champion (default: expression, 3 classes, 48 px grey; ``face_margin``: the framing recorded with it)."""
    from training.pipeline import train_and_register
    from training.trainer import TrainConfig

    data = make_image_folder(home.parent / f"{home.name}-{task or 'faces'}", classes=classes, per_class=per_class, seed=1)
    registry = ModelRegistry(Settings(home=home), task=task)
    cfg = TrainConfig(backbone="test_efficientnet", image_size=image_size, grayscale=grayscale, epochs=epochs, batch_size=16, face_margin=face_margin,
                      lr=3e-3, threads=1, mixup_prob=0.0, occlusion_p=0.0, erasing_p=0.0, val_fraction=0.25)
    train_and_register(data, cfg, registry, classes=None)
    return registry
