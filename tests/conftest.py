"""Shared fixtures: a fresh INFANTINO_HOME per test and tiny, self-made face data sets.

Nothing here reads ../shared/data: every image is drawn with Pillow in ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from infantino.settings import get_settings
from testkit.faces import TINY_CLASSES, draw_face, face_arrays, faces, make_image_folder  # noqa: F401  (re-exported to tests)


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
    target = get_settings().storage.home / "mlflow.db"
    assert target.resolve() == (infantino_home / "mlflow.db").resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mlflow_db_template, target)
    return target


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """3 classes (happy, sad, surprise) x 12 PNG faces of 48x48."""
    return make_image_folder(tmp_path / "faces")


@pytest.fixture
def one_class_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "one_class", classes=("happy",), per_class=4)


# ---- over a real server: a module defines its own `server` fixture (a testkit BentoServer) ----------
@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's server."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def face_png() -> bytes:
    """One drawn face, as PNG bytes."""
    return faces(1, seed=5)[0][0]
