"""Prometheus metrics of the API, exposed on BentoML's /metrics beside its own.

``bentoml.metrics`` is prometheus-client made safe for BentoML's multi-process workers.
"""

from __future__ import annotations

import bentoml

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
