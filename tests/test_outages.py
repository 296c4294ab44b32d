"""Outages of the two things a replica depends on, made real and then ended:

- the MLflow tracking server is stopped (and started again on the same port): the replica keeps
  serving its model, says so in /health/detail and /metrics, answers registry calls with a 503
  in seconds instead of holding threads in MLflow's retries, and a replica started meanwhile
  serves the shipped model instead of crash-looping; when the server is back, both catch up;
- the connection to the feedback store's PostgreSQL is cut (a proxy in between): feedback
  answers a clear 503 (nothing acknowledged, nothing lost), predictions still answer (without an
  id), the updater backs off, and when the database is back the queued feedback is taught.
"""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest

from testkit.faces import faces
from testkit.proxy import TcpProxy
from testkit.scaleout import PG_URL, MlflowServer, postgres_databases, postgres_error
from testkit.server import STILL_MODEL_ENV, BentoServer

pytestmark = pytest.mark.slow
TOKEN = "outage-admin-token"
QUICK = {"INFANTINO_REGISTRY_TIMEOUT_S": "2", "INFANTINO_REGISTRY_RETRIES": "0", "INFANTINO_MODEL_POLL_S": "0.5",
         "INFANTINO_ADMIN_TOKEN": TOKEN, "INFANTINO_FACE_DETECTOR": "none", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def wait_until(check, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"not within {timeout_s}s: {what() if callable(what) else what}"
        time.sleep(0.5)


def predict(server: BentoServer, png: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", files={"image": ("f.png", png, "image/png")}, timeout=30)


def feedback(server: BentoServer, png: bytes, label: str) -> httpx.Response:
    return httpx.post(f"{server.url}/feedback", data={"label": label}, files={"image": ("f.png", png, "image/png")}, timeout=30)


def detail(server: BentoServer) -> dict:
    return httpx.get(f"{server.url}/health/detail", timeout=30).json()


def gauge(server: BentoServer, name: str, **labels: str) -> list[float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [float(m.group(2)) for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE)
            if all(w in m.group(1) for w in want)]


@pytest.fixture(scope="module")
def tiny_tracking_server(tmp_path_factory):
    """An MLflow server (SQLite backend, so it can be stopped and started again with its state) holding the tiny model."""
    from testkit.registry import train_tiny_registry

    tmp = tmp_path_factory.mktemp("outage")
    server = MlflowServer(f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts", log_path=tmp / "mlflow.log")
    with server:
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = server.tracking_uri()
        try:
            train_tiny_registry(tmp / "trainer-home", per_class=12, epochs=5)
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI", None) if saved is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", saved)
        yield server, tmp


def test_a_registry_outage_keeps_serving_answers_503_in_seconds_and_catches_up(tiny_tracking_server):
    mlflow_server, tmp = tiny_tracking_server
    env = {**QUICK, **STILL_MODEL_ENV, "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri(), "INFANTINO_HOME": str(tmp / "home-a")}
    pngs = [(png, label) for png, label in faces(1, seed=40)]
    with BentoServer(env, log_path=tmp / "serve-a.log") as server:
        assert predict(server, pngs[0][0]).json()["head_version"] == "1"
        for png, label in pngs:
            assert feedback(server, png, label).status_code == 200
        mlflow_server.stop()
        try:
            # Still serving the last model, and saying the registry is down.
            for png, _ in pngs:
                r = predict(server, png)
                assert r.status_code == 200 and r.json()["head_version"] == "1", r.text
            assert feedback(server, *pngs[0]).status_code == 200  # the queue does not need the registry
            wait_until(lambda: not detail(server)["tasks"]["expression"]["registry"]["reachable"], 30, "registry reported down")
            assert detail(server)["status"] == "degraded"
            wait_until(lambda: gauge(server, "infantino_dependency_up", dependency="registry") == [0.0], 30, "the registry gauge at 0")
            # Registry calls answer in seconds (the client's 30 s timeout would fail the test otherwise).
            model = httpx.get(f"{server.url}/model", timeout=30)
            assert model.status_code == 200 and model.json()["head"]["version"] == "1" and "registry_error" in model.json()["head"]
            r = httpx.post(f"{server.url}/admin/update", json={"force": True}, headers=ADMIN, timeout=30)
            assert r.status_code == 503 and r.json()["error"] == "registry_unavailable" and r.headers["Retry-After"], r.text
            # A replica started during the outage serves the shipped model instead of crash-looping.
            late_env = {**env, "INFANTINO_HOME": str(tmp / "home-b"), "BENTOML_HOME": str(tmp / "bentoml-b")}
            with BentoServer(late_env, log_path=tmp / "serve-b.log") as late:
                r = predict(late, pngs[0][0])
                assert r.status_code == 200 and r.json()["head_version"] == "0", r.text
                mlflow_server.start()
                # Both catch up: the late replica follows the registry's champion, the update runs.
                wait_until(lambda: predict(late, pngs[0][0]).json()["head_version"] == "1", 60, "the late replica follows the champion")
                wait_until(lambda: detail(server)["tasks"]["expression"]["registry"]["reachable"], 30, "registry reported up")
                r = httpx.post(f"{server.url}/admin/update", json={"force": True}, headers=ADMIN, timeout=120)
                assert r.status_code == 200, r.text
                assert r.json()["feedback_items"] == len(pngs) + 1  # everything acknowledged during the outage is taught
        finally:
            if mlflow_server.proc is None or mlflow_server.proc.poll() is not None:
                mlflow_server.start()


def test_a_database_outage_refuses_feedback_with_503_keeps_predicting_and_the_updater_catches_up(tiny_tracking_server, tmp_path):
    error = postgres_error()
    if error is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_URL} is not reachable ({error})")
        pytest.skip(f"PostgreSQL at {PG_URL} is not reachable ({error})")
    import sqlalchemy as sa

    mlflow_server, _ = tiny_tracking_server
    with postgres_databases("queue") as db:
        url = sa.make_url(db["queue"])
        with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
            queue_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
            env = {**QUICK, "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri(), "INFANTINO_HOME": str(tmp_path / "home"),
                   "INFANTINO_QUEUE_URL": queue_url, "INFANTINO_UPDATE_MIN_ITEMS": "100000", "INFANTINO_UPDATE_INTERVAL_S": "6"}
            pngs = faces(1, seed=41)
            with BentoServer(env, log_path=tmp_path / "serve.log") as server:
                before = predict(server, pngs[0][0]).json()
                assert before["prediction_id"]
                for png, label in pngs:
                    assert feedback(server, png, label).status_code == 200
                proxy.cut()
                # Feedback: a clear 503, never an acknowledgement that was not stored.
                r = feedback(server, *pngs[0])
                assert r.status_code == 503 and r.json()["error"] == "database_unavailable" and r.headers["Retry-After"], r.text
                r = httpx.post(f"{server.url}/feedback", json={"label": pngs[0][1], "prediction_id": before["prediction_id"]}, timeout=30)
                assert r.status_code == 503 and r.json()["error"] == "database_unavailable", r.text
                # Predictions still answer, without an id to name them by.
                r = predict(server, pngs[1][0])
                assert r.status_code == 200 and r.json()["prediction_id"] is None and r.json()["label"], r.text
                wait_until(lambda: not detail(server)["database"]["reachable"], 30, "database reported down")
                wait_until(lambda: gauge(server, "infantino_dependency_up", dependency="database") == [0.0], 30,
                           lambda: [line for line in httpx.get(f"{server.url}/metrics").text.splitlines() if "dependency_up" in line])
                time.sleep(8)  # past the update interval: the updater fails and backs off meanwhile
                proxy.restore()
                assert predict(server, pngs[1][0]).json()["prediction_id"]
                assert feedback(server, *pngs[1]).status_code == 200
                # The updater catches up: every item acknowledged is taught (registered as a version), none lost.
                versions = len(httpx.get(f"{mlflow_server.url}/api/2.0/mlflow/model-versions/search", timeout=30).json().get("model_versions", []))

                def drained():
                    counts = httpx.get(f"{server.url}/model", timeout=30).json()["queue"]
                    return counts.get("queued", 0) == 0 and sum(counts.values()) == len(pngs) + 1

                wait_until(drained, 120, "the queued feedback taught after the outage")
                after = httpx.get(f"{mlflow_server.url}/api/2.0/mlflow/model-versions/search", timeout=30).json()["model_versions"]
                assert len(after) > versions
