"""The serving bundle over HTTP: a real `bentoml serve` process with two API workers and two tasks.

The default task, expression, reads three drawn expressions at 48 px grey; a second task,
mouth, has its own labels (smile, frown), its own models at 40 px colour, its own queue,
updates and promotions, and is answered in the same responses.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from testkit.faces import faces, png_bytes
from testkit.registry import train_tiny_registry
from testkit.server import STILL_MODEL_ENV, BentoServer

pytestmark = pytest.mark.slow
TOKEN = "test-admin-token"
MOUTH_CLASSES = ("smile", "frown")  # drawn as the happy and sad mouths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("served") / "home"
    train_tiny_registry(home)
    train_tiny_registry(home, task="mouth", classes=MOUTH_CLASSES, image_size=40, grayscale=False, epochs=20)
    env = {
        "INFANTINO_HOME": str(home), "INFANTINO_TASKS": "expression,mouth", "INFANTINO_API_WORKERS": "2", "INFANTINO_MODEL_POLL_S": "0.5",
        "INFANTINO_MAX_IMAGE_BYTES": "300000", "INFANTINO_MAX_IMAGE_PIXELS": "4000000",
        "INFANTINO_ADMIN_TOKEN": TOKEN, **STILL_MODEL_ENV,
    }
    with BentoServer(env, log_path=home.parent / "serve.log") as srv:
        yield srv


def check_prediction(p: dict, labels=("happy", "sad", "surprise")):
    assert set(p) >= {"prediction_id", "label", "confidence", "probabilities", "head_version", "backbone_version"}
    assert list(p["probabilities"]) == list(labels)
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
    assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    assert p["confidence"] == pytest.approx(max(p["probabilities"].values()))
    assert p["head_version"] == "1" and p["backbone_version"] == "1"
    assert p["task"] == "expression" and set(p["tasks"]) == {"expression", "mouth"}
    assert p["tasks"]["expression"] == {k: p[k] for k in p["tasks"]["expression"]}  # the top level is the default task
    mouth = p["tasks"]["mouth"]
    assert sorted(mouth["probabilities"]) == sorted(MOUTH_CLASSES) and mouth["task"] == "mouth"
    assert abs(sum(mouth["probabilities"].values()) - 1) < 1e-5 and mouth["prediction_id"] != p["prediction_id"]


def test_predict_multipart_and_base64_agree(client, face_png):
    a = client.post("/predict", files={"image": ("face.png", face_png, "image/png")})
    b = client.post("/predict", json={"image_base64": base64.b64encode(face_png).decode()})
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    check_prediction(a.json())
    check_prediction(b.json())
    assert a.json()["probabilities"] == pytest.approx(b.json()["probabilities"], abs=1e-6)
    assert a.json()["prediction_id"] != b.json()["prediction_id"]


def test_model_learned_the_drawn_faces(client):
    """Not a timing check: the served model must answer like a trained one (>= 2/3 right)."""
    items = faces(4, seed=11)
    r = client.post("/predict_batch", json={"images_base64": [base64.b64encode(b).decode() for b, _ in items]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(items)
    for p in preds:
        check_prediction(p)
    accuracy = np.mean([p["label"] == label for p, (_, label) in zip(preds, items)])
    assert accuracy >= 2 / 3


def test_predict_batch_multipart(client, face_png):
    r = client.post("/predict_batch", files=[("images", ("a.png", face_png, "image/png")), ("images", ("b.png", face_png, "image/png"))])
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2


def test_feedback_by_image_and_by_prediction_id(client, face_png):
    r = client.post("/feedback", data={"label": "sad"}, files={"image": ("f.png", face_png, "image/png")})
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["feedback_id"] and first["queue_depth"] >= 1 and first["duplicate"] is False
    pid = client.post("/predict", files={"image": ("f.png", face_png, "image/png")}).json()["prediction_id"]
    r = client.post("/feedback", json={"label": "happy", "prediction_id": pid})
    assert r.status_code == 200, r.text
    assert r.json()["queue_depth"] == first["queue_depth"] + 1
    # A retried request with the same idempotency key is acknowledged once.
    body = {"label": "surprise", "prediction_id": pid, "idempotency_key": "retry-1"}
    one, two = client.post("/feedback", json=body).json(), client.post("/feedback", json=body).json()
    assert one["feedback_id"] == two["feedback_id"] and two["duplicate"] is True
    assert two["queue_depth"] == one["queue_depth"]


def test_a_request_names_its_domain_and_feedback_keeps_it(client, server, face_png):
    """`domain` on /predict and /feedback: checked (a 4xx naming the field and the accepted form),
    kept with the feedback, and inherited by feedback that names a prediction made with one."""
    from infantino.settings import Settings
    from store import Stores

    image = base64.b64encode(face_png).decode()
    for bad in ("Infant", "in fant", "", "x" * 65, "../etc"):
        r = client.post("/predict", json={"image_base64": image, "domain": bad})
        assert r.status_code in (400, 422) and "domain" in r.text and r.json()["error"], (bad, r.text)
    plain = client.post("/predict", json={"image_base64": image}).json()
    named = client.post("/predict", json={"image_base64": image, "domain": "infant"}).json()
    # Nothing was taught for this domain yet: the same answer.
    assert named["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-6)
    by_image = client.post("/feedback", json={"label": "sad", "image_base64": image, "domain": "nicu-2"})
    by_id = client.post("/feedback", json={"label": "sad", "prediction_id": named["prediction_id"]})
    overridden = client.post("/feedback", json={"label": "sad", "prediction_id": named["prediction_id"], "domain": "ward.b"})
    assert all(r.status_code == 200 for r in (by_image, by_id, overridden)), [by_image.text, by_id.text, overridden.text]
    stores = Stores.open(Settings(home=server.env["INFANTINO_HOME"]).storage.database_url)
    try:
        assert [stores.feedback.get(r.json()["feedback_id"]).domain for r in (by_image, by_id, overridden)] == ["nicu-2", "infant", "ward.b"]
    finally:
        stores.db.close()


def big_noise_png(side: int) -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)))


def bomb_png() -> bytes:
    return png_bytes(Image.new("L", (3000, 3000)))  # 9 Mpx of zeros: a few KB on the wire


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"files": {"image": ("x.txt", b"hello, not an image", "text/plain")}}, 415, "not_an_image"),
        ({"files": {"image": ("e.png", b"", "image/png")}}, 400, "empty_image"),
        ({"files": {"image": ("t.png", "TRUNCATED", "image/png")}}, 400, "corrupt_image"),
        ({"files": {"image": ("big.png", "BIG", "image/png")}}, 413, "image_too_large"),
        ({"files": {"image": ("bomb.png", "BOMB", "image/png")}}, 413, "image_too_large"),
        ({"json": {}}, 400, "missing_image"),
        ({"json": {"image_base64": "***not base64***"}}, 400, "invalid_base64"),
    ],
    ids=["not-image", "empty", "truncated", "too-many-bytes", "decompression-bomb", "missing", "bad-base64"],
)
def test_bad_images_get_clear_4xx(client, face_png, kwargs, status, code):
    if "files" in kwargs:
        name, body, ctype = kwargs["files"]["image"]
        body = {"TRUNCATED": face_png[: len(face_png) // 2], "BIG": big_noise_png(400), "BOMB": bomb_png()}.get(body, body)
        kwargs = {"files": {"image": (name, body, ctype)}}
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["message"]


def test_feedback_errors_name_the_problem(client, face_png):
    r = client.post("/feedback", json={"label": "happyish", "image_base64": base64.b64encode(face_png).decode()})
    assert r.status_code == 422 and r.json()["error"] == "unknown_label"
    assert r.json()["accepted"] == ["happy", "sad", "surprise"]
    r = client.post("/feedback", json={"label": "happy", "prediction_id": "no-such-id"})
    assert r.status_code == 404 and r.json()["error"] == "unknown_prediction_id"
    r = client.post("/feedback", json={"label": "happy"})
    assert r.status_code == 400 and r.json()["error"] == "missing_image"
    r = client.post("/feedback", json={"image_base64": base64.b64encode(face_png).decode()})
    assert r.status_code == 400 and "label" in r.text  # BentoML's own validation error names the missing field


def test_batch_limit(client, face_png):
    b64 = base64.b64encode(face_png).decode()
    r = client.post("/predict_batch", json={"images_base64": [b64] * 65})
    assert r.status_code == 413 and r.json()["error"] == "too_many_images"


def test_admin_update_needs_the_token(client):
    assert client.post("/admin/update", json={}).status_code == 401
    r = client.post("/admin/update", json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


def test_model_info_and_health(client):
    info = client.get("/model").json()
    assert info["labels"] == ["happy", "sad", "surprise"]
    assert info["head"]["version"] == "1" and info["backbone"]["version"] == "1"
    assert "val_accuracy" in info["head"]["metrics"]
    assert info["preprocessing"]["input_size"] == 48
    assert set(info["tasks"]) == {"expression", "mouth"}
    assert info["tasks"]["mouth"]["labels"] == sorted(MOUTH_CLASSES) and info["tasks"]["mouth"]["preprocessing"]["input_size"] == 40
    assert info["tasks"]["mouth"]["head"]["name"] == "infantino-mouth-head"
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200
    assert client.get("/no/such/route").status_code == 404


def backbone_batch_sizes(metrics_text: str) -> list[tuple[str, str, float]]:
    """(kind, labels, value) of the backbone's batch-size histogram: the inline micro-batcher's
    (INFANTINO_BACKBONE_PLACEMENT=inline, the default on a CPU) or BentoML's adaptive batching of the backbone service."""
    for name, selector in (("infantino_inline_batch_size", ""), ("bentoml_service_adaptive_batch_size", 'method_name="embed"')):
        series = [(kind, labels, float(v)) for kind, labels, v in re.findall(rf"^{name}_(sum|count|bucket)(?:\{{([^}}]*)\}})? (\S+)$",
                                                                              metrics_text, re.MULTILINE) if selector in labels]
        if any(kind == "count" and v > 0 for kind, _, v in series):
            return series
    return []


def test_concurrent_predictions_are_batched(client, server, face_png):
    """16 concurrent clients: the backbone's batching (inline or in its service) must merge requests (batch size > 1)."""
    b64 = base64.b64encode(face_png).decode()

    def call(_):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/predict", json={"image_base64": b64})
            return r.status_code, r.text[:200]

    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(160)))
    assert [a for a in answers if a[0] != 200] == []
    series = backbone_batch_sizes(client.get("/metrics").text)
    sums, counts = [v for k, _, v in series if k == "sum"], [v for k, _, v in series if k == "count"]
    assert sum(counts) > 0
    assert sum(sums) / sum(counts) > 1.0, "no request was ever batched with another"
    assert max(v for k, labels, v in series if k == "bucket" and 'le="1.0"' in labels) < sum(counts)


def test_metrics_and_server_still_healthy(client):
    text = client.get("/metrics").text
    for name in ("infantino_predictions_total", "infantino_prediction_confidence_bucket", "infantino_feedback_total",
                 "infantino_feedback_queue_depth", "infantino_served_model_version"):
        assert name in text, name
    assert client.get("/readyz").status_code == 200


def test_faces_in_a_scene(client):
    """Two faces pasted into a scene: both found with their boxes; an empty scene says so."""
    from testkit.faces import draw_face

    rng = np.random.default_rng(0)
    scene = Image.new("RGB", (640, 360), (30, 30, 30))
    scene.paste(draw_face(0, 160, rng), (60, 100))
    scene.paste(draw_face(2, 128, rng), (420, 60))
    r = client.post("/predict", json={"image_base64": base64.b64encode(png_bytes(scene)).decode(), "faces": True})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["face_count"] == 2 and answer["whole_image"] is None
    big, small = answer["faces"]
    assert abs(big["box"][0] - 60) < 40 and abs(small["box"][0] - 420) < 40
    for face in answer["faces"]:
        check_prediction(face)
    # The crop is what a correction teaches: feedback on a face's prediction_id works.
    fb = client.post("/feedback", json={"label": "happy", "prediction_id": big["prediction_id"]})
    assert fb.status_code == 200, fb.text

    empty = png_bytes(Image.new("RGB", (320, 240), (90, 90, 90)))
    r = client.post("/predict", json={"image_base64": base64.b64encode(empty).decode(), "faces": True})
    assert r.json()["face_count"] == 0 and r.json()["message"].startswith("no face found")
    check_prediction(r.json()["whole_image"])
    r = client.post("/predict", json={"image_base64": base64.b64encode(empty).decode(), "faces": True, "whole_image_if_no_face": False})
    assert r.json() == {"face_count": 0, "faces": [], "whole_image": None, "message": "no face found"}


def test_sequence_of_frames_and_a_video(client, tmp_path):
    """Frames and a short video made here (OpenCV writes it): per-frame scores and the clip's aggregate."""
    import cv2

    frames = [b for b, _ in faces(2, seed=21)]  # 6 frames: 2 per class
    r = client.post("/predict_sequence", json={"frames_base64": [base64.b64encode(b).decode() for b in frames], "ema_alpha": 0.5})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["frame_count"] == 6 and [f["index"] for f in out["frames"]] == list(range(6))
    per_frame = np.array([[f["probabilities"][c] for c in ("happy", "sad", "surprise")] for f in out["frames"]])
    assert list(out["aggregate"]["mean"].values()) == pytest.approx(per_frame.mean(0).tolist(), abs=1e-6)
    ema = per_frame[0]
    for p in per_frame[1:]:
        ema = 0.5 * p + 0.5 * ema
    assert list(out["aggregate"]["ema"].values()) == pytest.approx(ema.tolist(), abs=1e-6)

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (48, 48))
    for b in frames * 2:  # 12 frames at 5 fps: 2.4 s
        writer.write(cv2.cvtColor(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), cv2.COLOR_RGB2BGR))
    writer.release()
    r = client.post("/predict_sequence", files={"video": ("clip.avi", path.read_bytes(), "video/x-msvideo")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["frame_count"] == 12
    times = [f["time_s"] for f in out["frames"]]
    assert times == sorted(times) and times[-1] == pytest.approx(11 / 5)
    assert out["aggregate"]["mean_label"] in ("happy", "sad", "surprise")
    assert out["tasks"]["mouth"]["aggregate"]["mean_label"] in MOUTH_CLASSES

    r = client.post("/predict_sequence", files={"video": ("x.avi", b"not a video at all", "video/x-msvideo")})
    assert r.status_code == 415 and r.json()["error"] == "not_a_video"
    r = client.post("/predict_sequence", json={"frames_base64": [base64.b64encode(frames[0]).decode()] * 65})
    assert r.status_code == 413 and r.json()["error"] == "too_many_frames"
    r = client.post("/predict_sequence", json={})
    assert r.status_code == 400 and r.json()["error"] == "bad_sequence"


def test_a_second_task_has_its_own_labels_feedback_and_updates(client, server):
    """mouth is answered beside expression; its feedback, queue, update and promotion are its own."""
    from infantino.settings import Settings
    from registry.store import ModelRegistry

    items = [(b, {"happy": "smile", "sad": "frown"}[label]) for b, label in faces(6, seed=31) if label != "surprise"]
    r = client.post("/predict_batch", json={"images_base64": [base64.b64encode(b).decode() for b, _ in items]})
    assert r.status_code == 200, r.text
    mouth = [p["tasks"]["mouth"] for p in r.json()["predictions"]]
    assert np.mean([m["label"] == label for m, (_, label) in zip(mouth, items)]) >= 2 / 3  # it learned its own task

    # Feedback names its task; by prediction_id the task is the prediction's own.
    b64 = base64.b64encode(items[0][0]).decode()
    r = client.post("/feedback", json={"label": "smile", "image_base64": b64, "task": "mouth"})
    assert r.status_code == 200 and r.json()["task"] == "mouth", r.text
    depth = r.json()["queue_depth"]
    r = client.post("/feedback", json={"label": "frown", "prediction_id": mouth[1]["prediction_id"]})
    assert r.status_code == 200 and r.json()["task"] == "mouth" and r.json()["queue_depth"] == depth + 1, r.text
    for m, (_, label) in zip(mouth[2:], items[2:]):
        assert client.post("/feedback", json={"label": label, "prediction_id": m["prediction_id"], "task": "mouth"}).status_code == 200

    # Errors name the accepted values of the task asked about.
    r = client.post("/feedback", json={"label": "happy", "image_base64": b64, "task": "mouth"})
    assert r.status_code == 422 and r.json()["error"] == "unknown_label" and r.json()["accepted"] == sorted(MOUTH_CLASSES)
    r = client.post("/feedback", json={"label": "smile", "image_base64": b64, "task": "age"})
    assert r.status_code == 422 and r.json()["error"] == "unknown_task" and r.json()["accepted"] == ["expression", "mouth"]
    r = client.post("/feedback", json={"label": "happy", "prediction_id": mouth[0]["prediction_id"], "task": "expression"})
    assert r.status_code == 404 and r.json()["error"] == "unknown_prediction_id"

    # An update of mouth registers (and gates) a new mouth head; expression is untouched.
    expression_queue = client.get("/model").json()["queue"]
    r = client.post("/admin/update", json={"force": True, "task": "mouth"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["task"] == "mouth" and report["parent_version"] == "1" and report["head_version"] == "2"
    assert report["new_items"] == report["feedback_items"] == len(items)
    home = server.env["INFANTINO_HOME"]
    mouth_reg, expression_reg = ModelRegistry(Settings(home=home), task="mouth"), ModelRegistry(Settings(home=home), task="expression")
    assert sorted(v["version"] for v in mouth_reg.list_versions("head")) == ["1", "2"]
    assert [v["version"] for v in expression_reg.list_versions("head")] == ["1"]
    assert expression_reg.champion_version("head") == "1"
    assert mouth_reg.champion_version("head", "champion" if report["promoted"] else "challenger") == "2"
    info = client.get("/model").json()
    assert info["queue"] == expression_queue and info["tasks"]["mouth"]["queue"]["queued"] == 0
