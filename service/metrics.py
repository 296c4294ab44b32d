"""Prometheus metrics of the API, exposed on BentoML's /metrics beside its own.

``bentoml.metrics`` is prometheus-client made safe for BentoML's multi-process workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import bentoml
from bentoml._internal.context import server_context
from bentoml._internal.server.http import instruments

PREDICTIONS = bentoml.metrics.Counter("infantino_predictions_total", "Predictions answered, by predicted label.", ["label", "task"])
CONFIDENCE = bentoml.metrics.Histogram(
    "infantino_prediction_confidence", "Confidence (top probability) of answered predictions.", ["task"],
    buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
INLINE_BATCH = bentoml.metrics.Histogram(
    "infantino_inline_batch_size", "Images per backbone call in an API worker (INFANTINO_BACKBONE_PLACEMENT=inline).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
FEEDBACK = bentoml.metrics.Counter("infantino_feedback_total", "Feedback items acknowledged, by true label.", ["label", "task"])
QUEUE_DEPTH = bentoml.metrics.Gauge("infantino_feedback_queue_depth", "Feedback items waiting for an update.", ["task"], multiprocess_mode="max")
SERVED_VERSION = bentoml.metrics.Gauge(
    "infantino_served_model_version", "Model version each worker serves.", ["task", "kind"], multiprocess_mode="all"
)
UPDATES = bentoml.metrics.Counter(
    "infantino_updates_total", "Online updates run, by gate verdict and its first reason (a code of online.gate.REASON_CODES; none when promoted).",
    ["task", "verdict", "reason"],
)

# Model health, live (service/health.py keeps the books).
AGREEMENT = bentoml.metrics.Counter(
    "infantino_feedback_agreement_total", "Feedback naming a prediction (prediction_id): did its label agree with the prediction, "
    "by the head version that predicted. Live accuracy = agreed=\"true\" / all.", ["task", "head_version", "agreed"],
)
LABEL_DRIFT = bentoml.metrics.Gauge(
    "infantino_label_drift", "Total-variation distance (0..1) between the labels predicted recently (a window per worker) and the "
    "training label distribution of the served head.", ["task"], multiprocess_mode="livemax",
)
DRIFT_WINDOW = bentoml.metrics.Gauge(
    "infantino_label_drift_window", "Predictions in the window the label drift is measured on.", ["task"], multiprocess_mode="livemax"
)
UPDATE_SECONDS = bentoml.metrics.Histogram(
    "infantino_update_duration_seconds", "Wall time of an online update (teach, gate, register).", ["task"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
GATE_REFUSALS = bentoml.metrics.Counter(
    "infantino_gate_refusals_total", "Gate reasons for refused candidates, every reason of each refusal (online.gate.REASON_CODES).",
    ["task", "reason"],
)
DEPENDENCY_UP = bentoml.metrics.Gauge(
    "infantino_dependency_up", "1 when the last check of a dependency succeeded (registry: the champion poll; database: a ping), by "
    "worker's worst.", ["dependency", "task"], multiprocess_mode="livemin",
)


# BentoML's request metrics (bentoml_service_request_*) are labelled by the raw request path, so
# every distinct path a client invents (random 404s) would add series without bound; BentoML 1.4
# has no setting for it (checked 1.4.40). Its middleware class is looked up when each worker
# builds its app, after the service module is imported: a subclass put in its place labels the
# service's own routes by name and every other path as one value.
UNMATCHED_PATH = "unmatched"
_PATH_LABELLED = ("metrics_request_duration", "metrics_request_total", "metrics_request_in_progress",
                  "metrics_websocket_connections", "metrics_websocket_data_received", "metrics_websocket_data_sent")


class _KnownEndpoints:
    """A BentoML metric whose ``endpoint`` label is a known route or :data:`UNMATCHED_PATH`."""

    def __init__(self, metric, known: frozenset[str]):
        self.metric, self.known = metric, known

    def labels(self, *, endpoint: str, **labels):
        return self.metric.labels(endpoint=endpoint if endpoint in self.known else UNMATCHED_PATH, **labels)


class RouteLabelledTrafficMetrics(instruments.RunnerTrafficMetricsMiddleware):
    routes: frozenset[str] = frozenset()

    def _setup(self) -> None:
        super()._setup()
        known = self.routes | set(server_context.service_routes)  # + the BentoML APIs' routes
        for name in _PATH_LABELLED:
            setattr(self, name, _KnownEndpoints(getattr(self, name), known))


def label_requests_by_route(routes: Iterable[str]) -> None:
    """Label BentoML's request metrics by ``routes`` (and the service's API routes); other paths as one."""
    RouteLabelledTrafficMetrics.routes = frozenset(routes)
    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledTrafficMetrics

# Access (service/access.py): requests refused before their body is read.
REFUSED = bentoml.metrics.Counter("infantino_requests_refused_total", "Requests refused by access control, by route and reason (unauthorized, rate_limited).", ["route", "reason"])

# The garbage collector's pauses of this worker (service/heap.py): each holds every request in flight.
GC_PAUSE = bentoml.metrics.Histogram(
    "infantino_gc_pause_seconds", "Pauses of Python's garbage collector in an API worker, by generation (1, 2: the full pass).", ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

# Where a prediction's time goes inside the API worker (service/api.py); the rest of what a client waits is
# BentoML's (request parsing, uploads to files, the answer's serialisation) and the network.
PREDICT_STAGE = bentoml.metrics.Histogram(
    "infantino_predict_stage_seconds", "Time of a prediction request in each stage of the API worker: regions (decode, face "
    "detection, crop), embed (backbone, including waiting for its batch), answer (heads and answers), record (the prediction "
    "committed, so /feedback can name it).", ["stage"],
    buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0),
)


@contextmanager
def stage_timer(stage: str) -> Iterator[None]:
    """Observe the block's wall time as ``stage`` of PREDICT_STAGE."""
    start = time.perf_counter()
    try:
        yield
    finally:
        PREDICT_STAGE.labels(stage=stage).observe(time.perf_counter() - start)


# Outages (service/errors.py): answers given while a dependency was down.
UNRECORDED = bentoml.metrics.Counter(
    "infantino_predictions_unrecorded_total", "Predictions answered without a prediction_id because the database could not record them."
)
SHADOW_PREDICTIONS = bentoml.metrics.Counter(
    "infantino_shadow_predictions_total", "Predictions the challenger also scored in shadow (not served): did its label agree with the "
    "champion's, by challenger version.", ["task", "head_version", "agreed_with_champion"],
)
SHADOW_AGREEMENT = bentoml.metrics.Counter(
    "infantino_shadow_agreement_total", "Feedback naming a prediction that the challenger also scored in shadow (not served): did the "
    "challenger's label agree with the feedback, by challenger version. Compare with infantino_feedback_agreement_total.",
    ["task", "head_version", "agreed"],
)
