"""Locust users for bench/mixed_load.py (not run on its own: bench.mixed_load starts locust with it).

Closed-loop clients (no wait between requests), one HTTP keep-alive connection each
(locust's FastHttpUser):

- ``PredictUser``: POST /predict, a 640x480 JPEG face photo (multipart ``image``); its
  prediction_id goes to a shared pool for the feedback clients;
- ``FeedbackByIdUser``: POST /feedback (JSON) naming a prediction_id taken from that pool
  (a fresh one per request while there are any; else its own last one);
- ``FeedbackImageUser``: POST /feedback (multipart) with a photo.

Every feedback carries a fresh idempotency key and a label cycling through the 7 FER classes.
Each client class's count comes from MIXED_PREDICT / MIXED_FEEDBACK_ID / MIXED_FEEDBACK_IMAGE;
the photos from MIXED_PHOTOS (a folder of .jpg files). Every request is also written to
MIXED_LOG (CSV: start epoch s, name, status, ms) and every 5xx/connection failure's body to
MIXED_ERRORS (JSON lines), so bench.mixed_load can draw time series and show failures in full.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import uuid
from pathlib import Path

from locust import FastHttpUser, constant, events, task

PHOTOS = [p.read_bytes() for p in sorted(Path(os.environ["MIXED_PHOTOS"]).glob("*.jpg"))]
LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
_labels = itertools.cycle(LABELS)
_ids: collections.deque[str] = collections.deque(maxlen=10_000)  # prediction_ids from /predict answers
_log = open(os.environ["MIXED_LOG"], "w", buffering=1 << 16)  # noqa: SIM115 - open for the whole run, closed on quitting
_errors = open(os.environ["MIXED_ERRORS"], "w", buffering=1)  # noqa: SIM115
_log.write("start,name,status,ms\n")
BOUNDARY = "mixedloadboundary7f3a"


def multipart(fields: dict[str, str], photo: bytes) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="face.jpg"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + photo + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, start_time=None, **kw):
    status = getattr(response, "status_code", 0) or 0
    _log.write(f"{start_time:.4f},{name},{status},{response_time:.2f}\n")
    if status >= 500 or status == 0:
        body = ""
        try:
            body = (response.text or "")[:2000] if response is not None else ""
        except Exception as exc:  # noqa: BLE001 - the body may be unreadable after a broken connection
            body = f"(body unreadable: {exc!r})"
        _errors.write(json.dumps({"start": start_time, "name": name, "status": status, "ms": response_time,
                                  "exception": repr(exception) if exception else None, "body": body}) + "\n")


@events.quitting.add_listener
def _close(**kw):
    _log.flush()
    _log.close()
    _errors.close()


class PredictUser(FastHttpUser):
    fixed_count = int(os.environ.get("MIXED_PREDICT", "12"))
    wait_time = constant(0)
    network_timeout = connection_timeout = 120.0

    def on_start(self):
        self.n = hash(self) % len(PHOTOS)
        self.bodies = [multipart({}, p) for p in PHOTOS]

    @task
    def predict(self):
        self.n += 1
        r = self.client.post("/predict", data=self.bodies[self.n % len(self.bodies)], headers=MULTIPART, name="/predict")
        if r.status_code == 200:
            try:
                _ids.append(r.json()["prediction_id"])
            except (ValueError, KeyError):
                pass


class FeedbackByIdUser(FastHttpUser):
    fixed_count = int(os.environ.get("MIXED_FEEDBACK_ID", "2"))
    wait_time = constant(0)
    network_timeout = connection_timeout = 120.0
    last: str | None = None

    def on_start(self):  # one prediction of its own, used only while the pool is empty
        r = self.client.post("/predict", data=multipart({}, PHOTOS[0]), headers=MULTIPART, name="/predict (feedback client setup)")
        if r.status_code == 200:
            self.last = r.json()["prediction_id"]

    @task
    def feedback(self):
        try:
            pid = _ids.popleft()
        except IndexError:
            pid = self.last
        if pid is None:
            return
        self.last = pid
        self.client.post("/feedback", json={"label": next(_labels), "prediction_id": pid, "idempotency_key": uuid.uuid4().hex},
                         name="/feedback (prediction_id)")


class FeedbackImageUser(FastHttpUser):
    fixed_count = int(os.environ.get("MIXED_FEEDBACK_IMAGE", "2"))
    wait_time = constant(0)
    network_timeout = connection_timeout = 120.0

    def on_start(self):
        self.n = hash(self) % len(PHOTOS)

    @task
    def feedback(self):
        self.n += 1
        body = multipart({"label": next(_labels), "idempotency_key": uuid.uuid4().hex}, PHOTOS[self.n % len(PHOTOS)])
        self.client.post("/feedback", data=body, headers=MULTIPART, name="/feedback (image)")
