"""INFANTINO_BACKBONE_PLACEMENT=inline over HTTP: a real `bentoml serve` whose API worker runs the
backbone itself (no backbone service), answers real predictions, and follows the champion to a
new backbone version (another input size) that it loads before it serves the head trained on it.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import re
import time

import httpx
import numpy as np
import pytest

from backbones.inference import embed_images
from infantino.images import open_image, to_model_array
from infantino.settings import Settings
from service.embedding import placement
from testkit.faces import faces
from testkit.registry import train_tiny_registry
from testkit.server import STILL_MODEL_ENV, BentoServer

pytestmark = pytest.mark.slow


def in_process(registry, head_version: str, image: bytes) -> dict[str, float]:
    """What a head version and the backbone it names answer for ``image``, computed here with torch."""
    head = registry.load_head(head_version)
    backbone = registry.load_backbone(head.backbone_version)
    prep = backbone.preprocessing
    x = to_model_array(open_image(image), prep.input_size, prep.grayscale)[None]
    probs = head.model.predict_proba(embed_images(backbone.model, x, prep))[0]
    return dict(zip(head.classes, map(float, probs)))


def inline_batches(client: httpx.Client) -> float:
    """Backbone calls made inside the API worker so far (its batch-size histogram's count)."""
    found = re.findall(r"^infantino_inline_batch_size_count(?:\{[^}]*\})?\s+(\S+)", client.get("/metrics").text, re.M)
    return sum(map(float, found))


def test_auto_placement_is_inline_on_a_cpu_and_the_service_for_torch():
    assert placement(Settings(backbone_placement="inline")) == "inline"
    assert placement(Settings(backbone_placement="service")) == "service"
    assert placement(Settings(backbone_runtime="torch")) == "service"


def test_inline_backbone_serves_predictions_and_follows_a_new_backbone_champion(tmp_path):
    home = tmp_path / "home"
    registry = train_tiny_registry(home)  # backbone v1 (48 px grey) and head v1, champion
    # ONNX Runtime computes in float32, so the answers can be compared with torch's to 1e-4 (the
    # default runtime, OpenVINO, rounds to bfloat16 on CPUs that have it: tests/test_backbone_runtime.py)
    env = {"INFANTINO_HOME": str(home), "INFANTINO_BACKBONE_PLACEMENT": "inline", "INFANTINO_BACKBONE_RUNTIME": "onnxruntime",
           "INFANTINO_MODEL_POLL_S": "0.5", **STILL_MODEL_ENV}
    items = faces(4, seed=11)
    image = items[0][0]
    with BentoServer(env, log_path=tmp_path / "serve.log") as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        p = client.post("/predict", files={"image": ("face.png", image, "image/png")}).json()
        assert (p["head_version"], p["backbone_version"]) == ("1", "1"), p
        assert p["probabilities"] == pytest.approx(in_process(registry, "1", image), abs=1e-4)  # ONNX here, torch there
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)

        # Concurrent requests share the worker's model calls, and each gets its own image's answer.
        bodies = [{"image_base64": base64.b64encode(b).decode()} for b, _ in items] * 4
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda body: client.post("/predict", json=body), bodies))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        by_image = [[r.json()["probabilities"] for r in answers[i :: len(items)]] for i in range(len(items))]
        for same in by_image:
            assert all(q == pytest.approx(same[0], abs=1e-5) for q in same)
        accuracy = np.mean([max(ps[0], key=ps[0].get) == label for ps, (_, label) in zip(by_image, items)])
        assert accuracy >= 2 / 3  # a trained model answers, not noise
        assert inline_batches(client) >= 1  # the backbone ran in the API worker

        # Feedback by image is embedded inline too.
        ack = client.post("/feedback", data={"label": items[0][1]}, files={"image": ("face.png", image, "image/png")})
        assert ack.status_code == 200, ack.text

        # A new backbone (v2, 40 px colour: v1's input would not even fit it) and head (v2) become champion.
        train_tiny_registry(home, image_size=40, grayscale=False)
        assert registry.champion_version("backbone") == "2"
        deadline, p = time.time() + 120, None
        while time.time() < deadline:
            r = client.post("/predict", files={"image": ("face.png", image, "image/png")})
            assert r.status_code == 200, r.text  # the switch refuses nothing: the backbone is loaded before its head is served
            p = r.json()
            if p["head_version"] == "2":
                break
            time.sleep(0.2)
        assert (p["head_version"], p["backbone_version"]) == ("2", "2"), p
        assert p["probabilities"] == pytest.approx(in_process(registry, "2", image), abs=1e-4)
