"""Model health, live: agreement of predictions with later feedback, label drift, update reasons,
GET /health/detail, and the committed Grafana dashboard (service/health.py, deploy/grafana/infantino.json)."""

from __future__ import annotations

import ast
import json
import re
import secrets
import time

import httpx
import pytest

from service.health import LabelWindow, shares, total_variation
from testkit.faces import faces
from testkit.registry import train_tiny_registry
from testkit.server import PROJECT_ROOT, STILL_MODEL_ENV, BentoServer

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "infantino.json"
METRICS_MODULE = PROJECT_ROOT / "service" / "metrics.py"
SERIES_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")
TOKEN = secrets.token_hex(16)


# ---- the bookkeeping, without a server --------------------------------------------------------------
def test_total_variation_and_the_sliding_window():
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1
    assert total_variation({"a": 0.75, "b": 0.25}, {"a": 0.25, "b": 0.25, "c": 0.5}) == pytest.approx(0.5)
    window = LabelWindow(size=3)
    for label in ["a", "a", "b", "b", "b"]:  # the two oldest "a" fall out
        window.add(label)
    assert window.shares() == {"b": 1.0} and len(window.labels) == 3
    assert shares({"a": 1, "b": 3, "c": 0}) == {"a": 0.25, "b": 0.75}


# ---- the dashboard ---------------------------------------------------------------------------------
def defined_metrics() -> set[str]:
    """Names of the metrics service/metrics.py defines (``bentoml.metrics.X("name", ...)``), without ``_total``."""
    names = set()
    for node in ast.walk(ast.parse(METRICS_MODULE.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr == "metrics" and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value.removesuffix("_total"))
    return names


def series_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers followed by a selector or a range."""
    return {m for m in re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?=\{|\[)", expr)}


def base_name(series: str) -> str:
    for suffix in SERIES_SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def dashboard_expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_the_dashboard_reads_only_metrics_the_service_defines():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["panels"]
    exprs = dashboard_expressions()
    used = {base_name(s) for e in exprs for s in series_names(e) | set(re.findall(r"\b(infantino_[a-z0-9_]+)", e))}
    ours = {n for n in used if n.startswith("infantino_")}
    assert ours and ours <= defined_metrics(), ours - defined_metrics()
    assert used - ours <= {"bentoml_service_request", "bentoml_service_request_duration_seconds", "bentoml_service_request_in_progress"}, used
    # what the dashboard is for: each is read by some panel
    for name in ("infantino_feedback_agreement", "infantino_prediction_confidence", "infantino_label_drift", "infantino_feedback_queue_depth",
                 "infantino_updates", "infantino_gate_refusals", "infantino_update_duration_seconds", "infantino_served_model_version",
                 "bentoml_service_request", "bentoml_service_request_duration_seconds"):
        assert name in used, name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# ---- over a real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("health") / "home"
    train_tiny_registry(home, per_class=12, epochs=5)  # what the model learned does not matter here
    env = {
        "INFANTINO_HOME": str(home), "INFANTINO_API_WORKERS": "1", "INFANTINO_ADMIN_TOKEN": TOKEN,
        **STILL_MODEL_ENV,
    }
    with BentoServer(env, log_path=home.parent / "serve.log") as srv:
        yield srv


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(name, labels): value}."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(scraped: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in scraped.items() if n == name and set(labels.items()) <= ls)


@pytest.mark.slow
def test_feedback_by_prediction_id_counts_agreement_per_head_version(client):
    pngs = [png for png, _ in faces(1, seed=11)]
    before = scrape(client)
    preds = [client.post("/predict", files={"image": ("f.png", png, "image/png")}).json() for png in pngs]
    labels = client.get("/model").json()["labels"]
    version = preds[0]["head_version"]
    agree, disagree = preds[0], preds[1]
    wrong = next(label for label in labels if label != disagree["label"])
    key = secrets.token_hex(8)
    for body in ({"label": agree["label"], "prediction_id": agree["prediction_id"], "idempotency_key": key},
                 {"label": agree["label"], "prediction_id": agree["prediction_id"], "idempotency_key": key},  # a retry: not counted again
                 {"label": wrong, "prediction_id": disagree["prediction_id"]}):
        r = client.post("/feedback", json=body)
        assert r.status_code == 200, r.text
    client.post("/feedback", data={"label": labels[0]}, files={"image": ("f.png", pngs[2], "image/png")})  # no prediction: not counted
    after = scrape(client)
    name = "infantino_feedback_agreement_total"
    for agreed, n in (("true", 1), ("false", 1)):
        assert value(after, name, task="expression", head_version=version, agreed=agreed) - \
            value(before, name, task="expression", head_version=version, agreed=agreed) == n, agreed

    # label drift against the training labels, over this worker's recent predictions
    drift = [v for (n, ls), v in after.items() if n == "infantino_label_drift" and ("task", "expression") in ls]
    assert drift and 0 <= drift[0] <= 1
    assert value(after, "infantino_label_drift_window", task="expression") >= len(preds)
    # BentoML's request metrics the dashboard reads
    assert value(after, "bentoml_service_request_total", endpoint="/predict") >= len(preds)
    assert any(n == "bentoml_service_request_duration_seconds_bucket" for n, _ in after)


@pytest.mark.slow
def test_health_detail_reports_dependencies_and_drift_without_asking_the_network(client):
    client.post("/predict", files={"image": ("f.png", faces(1, seed=12)[0][0], "image/png")})
    r = client.get("/health/detail")
    assert r.status_code == 200, r.text
    detail = r.json()
    assert detail["status"] == "ok" and detail["ready"] and detail["database"]["reachable"], detail
    task = detail["tasks"]["expression"]
    assert task["serving"]["head_version"] == client.get("/model").json()["head"]["version"]
    assert task["registry"]["reachable"] and task["registry"]["last_ok_age_s"] < 30 and "@" not in task["registry"]["uri"]
    drift = task["label_drift"]
    labels = client.get("/model").json()["labels"]
    assert set(drift["training"]) <= set(labels) and sum(drift["training"].values()) == pytest.approx(1)
    assert drift["window"] >= 1 and 0 <= drift["total_variation"] <= 1
    # the worker froze its long-lived objects at start (service/heap.py), and its collector's pauses are measured
    assert detail["heap"]["frozen_objects"] > 10_000 and len(detail["heap"]["collections"]) == 3, detail["heap"]
    # (reported by a thread of their own every second, never from inside a collection)
    deadline = time.time() + 15
    while value(gauges := scrape(client), "infantino_gc_pause_seconds_count", generation="1") == 0 and time.time() < deadline:
        time.sleep(0.5)
    assert value(gauges, "infantino_gc_pause_seconds_count", generation="1") > 0
    # the prediction's time is accounted per stage of the worker
    for stage in ("regions", "embed", "answer", "record"):
        assert value(gauges, "infantino_predict_stage_seconds_count", stage=stage) >= 1, stage
    assert value(gauges, "infantino_dependency_up", dependency="database") == 1
    assert value(gauges, "infantino_dependency_up", dependency="registry", task="expression") == 1


@pytest.mark.slow
def test_a_refused_update_is_counted_by_gate_reason_with_its_duration(client):
    labels = client.get("/model").json()["labels"]
    for png, _ in faces(1, seed=13):  # a few items: far too little evidence for the gate
        assert client.post("/feedback", data={"label": labels[0]}, files={"image": ("f.png", png, "image/png")}).status_code == 200
    before = scrape(client)
    r = client.post("/admin/update", json={"force": True}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert not report["promoted"] and report["gate_codes"][0] == "too_little_evidence", report
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("infantino_updates_total", task="expression", verdict="rejected", reason="too_little_evidence") == 1
    for code in report["gate_codes"]:
        assert grew("infantino_gate_refusals_total", task="expression", reason=code) == 1, code
    assert grew("infantino_update_duration_seconds_count", task="expression") == 1
    assert grew("infantino_update_duration_seconds_sum", task="expression") == pytest.approx(report["seconds"], rel=0.01)


@pytest.mark.slow
def test_the_newest_challenger_is_scored_in_shadow_without_being_served(client):
    labels = client.get("/model").json()["labels"]
    for png, _ in faces(1, seed=14):  # too little evidence: the candidate is refused and becomes the challenger
        assert client.post("/feedback", data={"label": labels[0]}, files={"image": ("f.png", png, "image/png")}).status_code == 200
    r = client.post("/admin/update", json={"force": True}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and not r.json()["promoted"], r.text
    challenger, champion = r.json()["head_version"], r.json()["parent_version"]
    deadline = __import__("time").time() + 30
    while (client.get("/health/detail").json()["tasks"]["expression"]["shadow"] or {}).get("head_version") != challenger:
        assert __import__("time").time() < deadline, client.get("/health/detail").json()
        __import__("time").sleep(0.3)
    before = scrape(client)
    preds = [client.post("/predict", files={"image": ("f.png", png, "image/png")}).json() for png, _ in faces(1, seed=15)]
    assert {p["head_version"] for p in preds} == {champion}  # the challenger answers nobody
    r = client.post("/feedback", json={"label": labels[1], "prediction_id": preds[0]["prediction_id"]})
    assert r.status_code == 200, r.text
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("infantino_shadow_predictions_total", task="expression", head_version=challenger) == len(preds)
    assert grew("infantino_shadow_agreement_total", task="expression", head_version=challenger) == 1
    shadow = client.get("/health/detail").json()["tasks"]["expression"]["shadow"]
    assert shadow["predictions"] >= len(preds) and shadow["feedback"] >= 1 and 0 <= shadow["agreement_with_champion"] <= 1


def test_a_failed_poll_or_ping_reports_the_dependency_down_from_what_was_last_seen():
    from types import SimpleNamespace

    from service.health import ModelHealth

    def down():
        raise ConnectionError("postgresql://user:secret@db/x refused")

    health = ModelHealth(["expression"], down, poll_s=1.0)
    now = __import__("time").time()
    source = SimpleNamespace(last_ok=now - 5, last_failure=now - 1, last_error="timed out", registry=SimpleNamespace(display_uri="http://mlflow"))
    health.follow("expression", source)
    health.check()
    detail = health.detail({"expression": {"head_version": "1", "backbone_version": "1"}})
    assert detail["status"] == "degraded" and detail["ready"]
    assert not detail["database"]["reachable"] and "secret" not in detail["database"]["last_error"]
    assert not detail["tasks"]["expression"]["registry"]["reachable"]
    source.last_ok = now  # the next poll answered
    assert health.detail({"expression": None})["tasks"]["expression"]["registry"]["reachable"]
    source.last_ok = now - 60  # answered, but polls have not come back for a minute (stuck in retries)
    assert not health.detail({"expression": None})["tasks"]["expression"]["registry"]["reachable"]
    assert health.detail({"expression": None})["status"] == "not_ready"
