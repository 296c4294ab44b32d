"""Bad requests of any shape against a real `bentoml serve`: each gets a short 4xx JSON error, never a 5xx.

Several of these used to fail inside BentoML's own input parsing, before the service's error
handling ran (service/middleware.py); the fuzz test at the end throws hostile bodies for a
bounded time.
"""

from __future__ import annotations

import base64
import io
import secrets
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from testkit.registry import train_tiny_registry
from testkit.server import STILL_MODEL_ENV, BentoServer

pytestmark = pytest.mark.slow
LABELS = ["happy", "sad", "surprise"]
SHORT_ERROR_BYTES = 1000  # an error answer quotes no large input back
FUZZ_SECONDS = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("hardening") / "home"
    train_tiny_registry(home, per_class=12, epochs=5)  # what the model learned does not matter here
    env = {
        "INFANTINO_HOME": str(home), "INFANTINO_API_WORKERS": "1", "INFANTINO_MAX_IMAGE_BYTES": "300000",
        **STILL_MODEL_ENV,
    }
    with BentoServer(env, log_path=home.parent / "serve.log") as srv:
        yield srv


def jpeg(png: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, "JPEG")
    return out.getvalue()


def check_error(r: httpx.Response, status: int | None = None, code: str | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert status is None or r.status_code == status, (r.status_code, r.text[:300])
    assert len(r.content) < SHORT_ERROR_BYTES, r.text[:300]
    body = r.json()
    assert isinstance(body["error"], str) and isinstance(body["message"], str), body
    assert code is None or body["error"] == code, body
    return body


PREDICT_FIELDS = ["image", "image_base64", "faces", "whole_image_if_no_face", "domain"]


@pytest.mark.parametrize(
    "path, request_kwargs, status, code",
    [
        ("/predict", {"files": {"file": ("f.png", "PNG", "image/png")}}, 400, "unknown_field"),
        ("/predict", {"files": {"upload": ("f.jpg", "JPEG", "image/jpeg")}}, 400, "unknown_field"),
        ("/predict", {"files": {"image": ("a" * 5000 + ".png", "PNG", "image/png")}}, 400, "invalid_multipart"),
        ("/predict", {"files": {"image": ("a" * 300 + ".png", "PNG", "image/png")}}, 400, "filename_too_long"),
        ("/predict", {"data": {"image": "http://example.com/face.png"}}, 400, "not_a_file"),
        ("/predict", {"data": {"image": "file:///etc/passwd"}}, 400, "not_a_file"),
        ("/predict", {"data": {"image": "http://169.254.169.254/latest"}, "files": {"x": ("", b"", "text/plain")}}, 400, None),
        ("/predict", {"data": {"faces": "true"}, "files": {"image": ("f.png", "PNG", "image/png"), "extra": ("e.bin", b"\xff\x00", "x/y")}},
         400, "unknown_field"),
        ("/feedback", {"data": {"label": "happy"}, "files": {"image": ("f.png", "PNG", "image/png"), "label2": ("l.txt", b"sad", "text/plain")}},
         400, "unknown_field"),
        ("/feedback", {"files": {"label": ("l.bin", b"\x89PNG\xff", "application/octet-stream"), "image": ("f.png", "PNG", "image/png")}},
         400, "not_a_value"),
        ("/feedback", {"json": {"label": "happy", "image_base64": "B64", "idempotency_key": "k" * 5000}}, 422, "invalid_value"),
        ("/feedback", {"json": {"label": "happy", "prediction_id": "p" * 5000}}, 422, "invalid_value"),
        ("/predict", {"content": b"\xff\xfe{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ("/predict", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 400, "invalid_json"),
        ("/predict", {"content": b"--xx\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=xx"}}, 400, None),
        ("/predict", {"content": b"image=1", "headers": {"content-type": "multipart/form-data"}}, 400, "invalid_multipart"),
        ("/predict", {"json": {"image_base64": 5, "faces": "maybe"}}, 422, "invalid_value"),
        ("/feedback", {"json": {"image_base64": "B64"}}, 400, "missing_field"),
    ],
    ids=["field-file", "field-upload", "filename-5000", "filename-300", "url-for-file", "file-url-for-file", "url-and-empty-part",
         "unknown-binary-part", "unknown-text-part", "label-as-binary-file", "long-idempotency-key", "long-prediction-id",
         "non-utf8-json", "text-plain", "truncated-multipart", "multipart-no-boundary", "wrong-types", "missing-label"],
)
def test_requests_bentoml_cannot_read_get_clear_4xx(client, face_png, path, request_kwargs, status, code):
    """Each of these failed in BentoML's input parsing (most with a 500) before the service's errors applied."""
    swap = {"PNG": face_png, "JPEG": jpeg(face_png), "B64": base64.b64encode(face_png).decode()}
    kwargs = dict(request_kwargs)
    if "files" in kwargs:
        kwargs["files"] = {k: (n, swap.get(b, b) if isinstance(b, str) else b, t) for k, (n, b, t) in kwargs["files"].items()}
    if "json" in kwargs:
        kwargs["json"] = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in kwargs["json"].items()}
    body = check_error(client.post(path, **kwargs), status, code)
    if code in ("unknown_field", "not_a_file"):
        assert body["accepted"] and set(body["accepted"]) >= {"image", "image_base64"}


def test_unknown_field_names_the_accepted_fields(client, face_png):
    body = check_error(client.post("/predict", files={"file": ("f.png", face_png, "image/png")}), 400, "unknown_field")
    assert body["accepted"] == PREDICT_FIELDS and "'file'" in body["message"]
    body = check_error(client.post("/predict_batch", files={"image": ("f.png", face_png, "image/png")}), 400, "unknown_field")
    assert body["accepted"] == ["images", "images_base64", "faces", "whole_image_if_no_face", "domain"]


def test_a_jpeg_sent_as_video_is_answered(client, face_png):
    """OpenCV's FFmpeg backend opens a still image with an unknown frame count (it used to crash the endpoint)."""
    r = client.post("/predict_sequence", files={"video": ("v.jpg", jpeg(face_png), "image/jpeg")})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["frame_count"] == 1


def test_errors_never_echo_large_input(client, face_png):
    big = "x" * 1_000_000
    b64 = base64.b64encode(face_png).decode()
    png = ("f.png", face_png, "image/png")
    for r in (client.post("/feedback", json={"label": big, "image_base64": b64}),
              client.post("/feedback", data={"label": big[:900_000]}, files={"image": png}),  # under Starlette's 1 MB part limit
              client.post("/feedback", data={"label": big}, files={"image": png}),  # over it
              client.post("/feedback", json={"label": "happy", "image_base64": b64, "idempotency_key": big}),
              client.post("/feedback", json={"label": "happy", "image_base64": b64, "task": big}),
              client.post("/predict", files={"f" * 3000: png}),
              client.post("/predict", json={"image_base64": big}),
              client.post("/predict", json={"image_base64": 5, "faces": big}),
              client.post("/predict_sequence", json={"frames_base64": [b64], "ema_alpha": big})):
        check_error(r)
        assert "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in r.text


def test_batch_answers_per_item(client, face_png):
    files = [("images", ("a.png", face_png, "image/png")), ("images", ("b.png", b"not an image", "image/png")),
             ("images", ("c.png", face_png[: len(face_png) // 2], "image/png")), ("images", ("d.png", face_png, "image/png"))]
    r = client.post("/predict_batch", files=files)
    assert r.status_code == 200, r.text[:300]
    good, not_image, truncated, good2 = r.json()["predictions"]
    for p in (good, good2):
        assert p["label"] in LABELS and p["prediction_id"]
    assert {k: v for k, v in not_image.items() if v is not None} == {"error": "not_an_image", "message": not_image["message"], "index": 1}
    assert truncated["error"] == "corrupt_image" and truncated["index"] == 2
    r = client.post("/predict_batch", json={"images_base64": [base64.b64encode(face_png).decode(), "***"]})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["predictions"][1] == {"error": "invalid_base64", "message": "images_base64 is not valid base64", "accepted": None, "index": 1}
    # The OpenAPI schema still describes the answer, item errors included.
    spec = client.get("/docs.json")
    assert spec.status_code == 200 and "ItemError" in spec.text


def test_metrics_are_not_labelled_by_random_paths(client):
    paths = [f"/no-such-{secrets.token_hex(6)}" for _ in range(50)]
    for p in paths:
        assert client.get(p).status_code == 404
        assert client.post(p, json={}).status_code == 404
    text = client.get("/metrics").text
    assert not [p for p in paths if p in text]
    assert 'endpoint="unmatched"' in text
    assert 'endpoint="/predict"' in text  # the service's own routes keep their names


# ---- fuzzing: hostile bodies for a bounded time ----------------------------------------------------
ROUTES = ["/predict", "/predict_batch", "/predict_sequence", "/feedback"]
FIELDS = ["image", "images", "frames", "video", "image_base64", "images_base64", "frames_base64", "label", "prediction_id",
          "idempotency_key", "faces", "task", "ema_alpha", "file", "upload", "", "x" * 300]
names = st.one_of(st.sampled_from(FIELDS), st.text(max_size=40))
blobs = st.one_of(st.binary(max_size=2000), st.text(max_size=2000).map(str.encode), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=300),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4), max_leaves=12)
filenames = st.one_of(st.none(), st.text(max_size=300), st.sampled_from(["a.png", "../../etc/passwd", "x" * 250]))
content_types = st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain", "video/mp4", "", "x/\u00e9"])


@st.composite
def hostile_requests(draw):
    path = draw(st.sampled_from(ROUTES))
    kind = draw(st.sampled_from(["multipart", "json", "urlencoded", "raw"]))
    if kind == "multipart":
        parts = draw(st.lists(st.tuples(names, filenames, blobs, content_types), min_size=0, max_size=6))
        files = [(n, (f, b, t)) if f is not None else (n, (None, b)) for n, f, b, t in parts]
        return path, {"files": files or [("image", ("a.png", b"", "image/png"))]}
    if kind == "json":
        return path, {"json": draw(st.dictionaries(names, json_values, max_size=6) | json_values)}
    if kind == "urlencoded":
        return path, {"data": draw(st.dictionaries(names, st.text(max_size=300), max_size=6))}
    ctype = draw(st.sampled_from(["application/json", "multipart/form-data; boundary=b", "application/x-www-form-urlencoded",
                                  "text/plain", "image/png", "application/vnd.bentoml+pickle", "multipart/form-data", ""]))
    return path, {"content": draw(blobs), "headers": {"content-type": ctype}}


@st.composite
def valid_requests(draw, png: bytes):
    """Requests the service should answer with a 200 (now and then with a bad item inside a batch)."""
    b64 = base64.b64encode(png).decode()
    faces_flag = draw(st.sampled_from(["true", "false"]))
    return draw(st.sampled_from([
        ("/predict", {"files": {"image": ("f.png", png, "image/png")}, "data": {"faces": faces_flag}}),
        ("/predict", {"json": {"image_base64": b64, "faces": faces_flag == "true"}}),
        ("/predict_batch", {"json": {"images_base64": [b64, draw(st.text(max_size=40))]}}),
        ("/predict_sequence", {"json": {"frames_base64": [b64, b64]}}),
        ("/feedback", {"json": {"label": draw(st.sampled_from(["happy", "sad", "surprise"])), "image_base64": b64}}),
    ]))


def response_schemas(client) -> dict:
    """Each POST route's 200 answer schema from the service's own OpenAPI document, and the error body's."""
    from jsonschema import Draft202012Validator

    from service.schemas import ErrorBody

    spec = client.get("/docs.json").json()
    out = {}
    for path in ROUTES:
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        schema = next(iter(content.values()))["schema"]
        out[path] = Draft202012Validator({**schema, "components": spec.get("components", {})})
    out["error"] = Draft202012Validator(ErrorBody.model_json_schema())
    return out


def test_fuzz_hostile_bodies_never_get_a_5xx_and_every_answer_matches_the_schema(client, face_png):
    """Random field names, bytes, long and non-UTF-8 strings, wrong content types, repeated fields,
    mixed with valid calls: never a 5xx; every 4xx a short JSON error matching the error schema,
    every 200 the route's answer schema in the service's OpenAPI document; the server still answers afterwards."""
    deadline = time.monotonic() + FUZZ_SECONDS
    schemas = response_schemas(client)
    failures, answered = [], []

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(hostile_requests(), valid_requests(face_png)))
    def one(request):
        if time.monotonic() > deadline:
            return
        path, kwargs = request
        r = client.post(path, **kwargs)
        shown = kwargs if len(repr(kwargs)) < 500 else repr(kwargs)[:500]
        if r.status_code >= 500:
            failures.append((path, shown, r.status_code, r.text[:200]))
            return
        validator = schemas[path] if r.status_code == 200 else schemas["error"]
        if r.status_code >= 400:
            check_error(r)
        errors = [e.message[:200] for e in validator.iter_errors(r.json())]
        if errors:
            failures.append((path, shown, r.status_code, errors[:3]))
        answered.append(r.status_code)

    one()
    assert failures == []
    assert 200 in answered and any(400 <= s < 500 for s in answered), sorted(set(answered))  # both kinds were checked
    assert client.get("/readyz").status_code == 200
