"""The crop framing travels with the model (issue 11): each registered model is served the crops
it was trained on, read from its preprocessing tags, and a promotion changes the framing live.

Two tiny models on one registry, trained with face margins 0.5 and 0 (FER2013's tight framing);
the served crop of a drawn face is read back from the prediction log (the stored crop is what a
correction would teach) and compared with ``crop_face`` at the model's own margin.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from infantino.settings import Settings
from registry.store import ModelRegistry
from store import Stores
from testkit.faces import draw_face, png_bytes
from testkit.registry import train_tiny_registry
from testkit.server import STILL_MODEL_ENV, BentoServer


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("framing") / "home"
    train_tiny_registry(home, per_class=12, epochs=4, face_margin=0.0)  # v1: tight crops
    train_tiny_registry(home, per_class=12, epochs=4, face_margin=0.5)  # v2 (champion): wide crops
    return home


@pytest.fixture(scope="module")
def server(home):
    env = {"INFANTINO_HOME": str(home), "INFANTINO_API_WORKERS": "1", "INFANTINO_MODEL_POLL_S": "0.5",
           "INFANTINO_FACE_DETECTOR": "haar", **STILL_MODEL_ENV}
    with BentoServer(env, log_path=home.parent / "serve.log") as srv:
        yield srv


def served_crop(client, home) -> tuple[dict, Image.Image]:
    """Predict a scene with one face; return that face's answer and the crop the service stored for it."""
    scene = Image.new("RGB", (640, 400), (30, 30, 30))
    scene.paste(draw_face(0, 140, np.random.default_rng(0)), (250, 130))
    r = client.post("/predict", json={"image_base64": base64.b64encode(png_bytes(scene)).decode(), "faces": True})
    assert r.status_code == 200, r.text
    assert r.json()["face_count"] == 1, r.text
    face = r.json()["faces"][0]
    stores = Stores.open(Settings(home=home).storage.database_url)
    try:
        stored = stores.predictions.get(face["prediction_id"])
    finally:
        stores.db.close()
    return face, Image.open(io.BytesIO(stored["image"]))


def side(box: list[float], margin: float) -> int:
    return round(max(box[2], box[3]) * (1 + 2 * margin))  # infantino.faces.crop_face's square


@pytest.mark.slow
def test_each_model_is_served_the_crops_it_was_trained_on(client, home):
    registry = ModelRegistry(Settings(home=home))
    margins = {v: float(registry.version_info("backbone", v).tags["preprocessing.face_margin"]) for v in ("1", "2")}
    assert margins == {"1": 0.0, "2": 0.5}  # the framing is recorded with each model

    face, crop = served_crop(client, home)
    assert face["backbone_version"] == "2"
    assert crop.size == (side(face["box"], 0.5),) * 2

    registry.promote("head", "1")  # the tight model's head, which names backbone v1
    deadline = time.time() + 60
    while time.time() < deadline and client.get("/model").json()["head"]["version"] != "1":
        time.sleep(0.5)
    face, crop = served_crop(client, home)
    assert face["backbone_version"] == "1"
    assert crop.size == (side(face["box"], 0.0),) * 2
