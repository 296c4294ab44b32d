"""From embeddings to answers: each task's head applied to each region, and the records that
let /feedback name any of them later.

``Served`` is what one worker serves for one task; a ``Snapshot`` holds every task's, taken
once per request so a swap in the middle of a request cannot mix versions.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from heads import predict_proba
from infantino.images import Preprocessing
from infantino.regions import Region
from registry.store import LoadedHead
from service import metrics
from service.schemas import Answer, Prediction


@dataclass(frozen=True)
class Served:
    """One task's head in this worker, with the preprocessing of the backbone it reads; replaced whole on a swap."""

    head: LoadedHead
    preprocessing: Preprocessing

    @property
    def classes(self) -> list[str]:
        return self.head.classes


Snapshot = dict[str, Served]


def task_predictions(task: str, served: Served, embeddings: np.ndarray, regions: list[Region],
                     records: list[dict], domain: str | None = None) -> list[Prediction]:
    """One task's prediction per region, for a request from ``domain`` (heads/domain.py); each is
    added to ``records`` (see store.PredictionLog.record)."""
    probs = predict_proba(served.head.model, embeddings, domain)
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.concatenate([np.zeros_like(probs), probs], 1)
    out = []
    for emb, p, (second, first), region in zip(embeddings, probs, top2, regions):
        best = int(p.argmax())
        label = served.classes[best]
        prediction = Prediction(
            prediction_id=uuid.uuid4().hex, label=label, confidence=float(p[best]),
            probabilities={c: float(v) for c, v in zip(served.classes, p)}, task=task,
            backbone_version=served.head.backbone_version, head_version=served.head.version,
        )
        records.append(dict(prediction_id=prediction.prediction_id, task=task, label=label, embedding=emb,
                            confidence=float(first), margin=float(first - second), image=region.image,
                            backbone_version=served.head.backbone_version, head_version=served.head.version, domain=domain))
        metrics.PREDICTIONS.labels(label=label, task=task).inc()
        metrics.CONFIDENCE.labels(task=task).observe(float(p[best]))
        out.append(prediction)
    return out


def build_answers(snapshot: Snapshot, embeddings: dict[str, np.ndarray], regions: list[Region],
                  default_task: str, domain: str | None = None) -> tuple[list[Answer], list[dict]]:
    """Per region, the default task's prediction at the top level and every task's under ``tasks``."""
    records: list[dict] = []
    per_task = {task: task_predictions(task, served, embeddings[task], regions, records, domain) for task, served in snapshot.items()}
    answers = []
    for i, region in enumerate(regions):
        by_task = {task: per_task[task][i] for task in snapshot}
        face = region.face
        answers.append(Answer(**by_task[default_task].model_dump(), tasks=by_task,
                              box=list(face.box) if face is not None else None,
                              detector_score=float(face.score) if face is not None else None))
    return answers, records
