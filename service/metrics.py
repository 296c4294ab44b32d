"""Prometheus metrics of the API, exposed on BentoML's /metrics beside its own.

``bentoml.metrics`` is prometheus-client made safe for BentoML's multi-process workers.
"""

from __future__ import annotations

from typing import Iterable

import bentoml
from bentoml._internal.context import server_context
from bentoml._internal.server.http import instruments

PREDICTIONS = bentoml.metrics.Counter("infantino_predictions_total", "Predictions answered, by predicted label.", ["label", "task"])
CONFIDENCE = bentoml.metrics.Histogram(
    "infantino_prediction_confidence", "Confidence (top probability) of answered predictions.", ["task"],
    buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
FEEDBACK = bentoml.metrics.Counter("infantino_feedback_total", "Feedback items acknowledged, by true label.", ["label", "task"])
QUEUE_DEPTH = bentoml.metrics.Gauge("infantino_feedback_queue_depth", "Feedback items waiting for an update.", ["task"], multiprocess_mode="max")
SERVED_VERSION = bentoml.metrics.Gauge(
    "infantino_served_model_version", "Model version each worker serves.", ["task", "kind"], multiprocess_mode="all"
)
UPDATES = bentoml.metrics.Counter("infantino_updates_total", "Online updates run, by gate verdict.", ["task", "verdict"])


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
