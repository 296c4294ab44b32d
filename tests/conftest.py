"""Shared fixtures: a fresh INFANTINO_HOME per test and tiny, self-made face data sets.

Nothing here reads ../shared/data: every image is drawn with Pillow in ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image, ImageDraw

from infantino.settings import get_settings

TINY_CLASSES = ("happy", "sad", "surprise")


@pytest.fixture(autouse=True)
def infantino_home(tmp_path, monkeypatch):
    """Each test gets its own INFANTINO_HOME (so its own SQLite MLflow registry) and fresh settings."""
    home = tmp_path / "infantino_home"
    for key in list(os.environ):
        if key.startswith("INFANTINO_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("INFANTINO_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _reset_mlflow()
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
    _reset_mlflow()


def _reset_mlflow() -> None:
    """Forget the previous test's tracking URI and close any run a failing test left open."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run(status="KILLED")
    mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI, which set_tracking_uri exports


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite database, built once per session.

    Creating one runs MLflow's migrations (seconds on a busy machine); copying it is instant.
    """
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def fresh_mlflow_db(infantino_home, mlflow_db_template) -> Path:
    """Put a copy of the empty registry where the settings look for it: $INFANTINO_HOME/mlflow.db."""
    target = get_settings().home / "mlflow.db"
    assert target.resolve() == (infantino_home / "mlflow.db").resolve()
    shutil.copyfile(mlflow_db_template, target)
    return target


# ---- drawing ------------------------------------------------------------------------------------

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


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """3 classes (happy, sad, surprise) x 12 PNG faces of 48x48."""
    return make_image_folder(tmp_path / "faces")


@pytest.fixture
def one_class_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "one_class", classes=("happy",), per_class=4)
