"""Shadow mode: the newest challenger scored on live traffic, never served.

The gate judges a candidate on the feedback it was taught (cross-fitted) and on validation data;
shadow mode adds the evidence an operator trusts most: how the refused candidate would have done
on what users actually send. Each worker loads the challenger head when it is newer than the
champion and reads the same backbone (its embeddings are the champion's: scoring costs one small
head call), and

- for every prediction, counts whether the challenger's label agrees with the champion's
  (``infantino_shadow_predictions_total``: how different it would be), and
- for every feedback that names a prediction, scores the challenger on that prediction's stored
  embedding and counts whether it agrees with the feedback
  (``infantino_shadow_agreement_total``: its live accuracy, beside the champion's
  ``infantino_feedback_agreement_total``).

Off with ``INFANTINO_SHADOW_CHALLENGER=false``. Nothing here changes an answer.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from registry.store import CHALLENGER, CHAMPION, LoadedHead
from service import metrics

log = logging.getLogger(__name__)


class ShadowChallenger:
    """One task's challenger head in one worker, when there is one worth scoring."""

    def __init__(self, task: str):
        self.task = task
        self.head: LoadedHead | None = None
        self._lock = threading.Lock()
        self.counts = {"predictions": 0, "agreed_with_champion": 0, "feedback": 0, "agreed_with_feedback": 0}

    def follow(self, aliases: dict[str, str], champion: LoadedHead | None, load) -> None:
        """After a registry poll: load the challenger (``load(version)``) if it is worth scoring, or drop it."""
        version = aliases.get(CHALLENGER)
        if version is None or champion is None or int(version) <= int(aliases.get(CHAMPION, champion.version)):
            self._set(None)  # none, or older than the champion: a candidate already overtaken
            return
        if self.head is not None and self.head.version == version and self.head.backbone_version == champion.backbone_version:
            return
        head = load(version)
        self._set(head if head.backbone_version == champion.backbone_version and head.classes == champion.classes else None)

    def _set(self, head: LoadedHead | None) -> None:
        with self._lock:
            if (head and head.version) != (self.head and self.head.version):
                self.counts = dict.fromkeys(self.counts, 0)
                if head is not None:
                    log.info("%s: scoring challenger head v%s in shadow", self.task, head.version)
            self.head = head

    def scored(self, embeddings: np.ndarray, champion_labels: list[str], backbone_version: str) -> None:
        """The champion answered ``champion_labels`` for ``embeddings`` (made by ``backbone_version``)."""
        head = self.head
        if head is None or head.backbone_version != backbone_version or not len(embeddings):
            return
        labels = [head.classes[i] for i in head.model.predict_proba(embeddings).argmax(1)]
        agreed = sum(a == b for a, b in zip(labels, champion_labels))
        with self._lock:
            self.counts["predictions"] += len(labels)
            self.counts["agreed_with_champion"] += agreed
        if agreed:
            metrics.SHADOW_PREDICTIONS.labels(task=self.task, head_version=head.version, agreed_with_champion="true").inc(agreed)
        if len(labels) - agreed:
            metrics.SHADOW_PREDICTIONS.labels(task=self.task, head_version=head.version, agreed_with_champion="false").inc(len(labels) - agreed)

    def feedback_on(self, label: str, embedding: np.ndarray | None, backbone_version: str | None) -> None:
        """Feedback ``label`` for a prediction whose embedding (by ``backbone_version``) was stored."""
        head = self.head
        if head is None or embedding is None or backbone_version != head.backbone_version:
            return
        predicted = head.classes[int(head.model.predict_proba(np.asarray(embedding, np.float32)[None]).argmax(1)[0])]
        agreed = predicted == label
        with self._lock:
            self.counts["feedback"] += 1
            self.counts["agreed_with_feedback"] += int(agreed)
        metrics.SHADOW_AGREEMENT.labels(task=self.task, head_version=head.version, agreed=str(agreed).lower()).inc()

    def report(self) -> dict | None:
        """For /health/detail: this worker's counts for the challenger it scores, or None."""
        head = self.head
        if head is None:
            return None
        with self._lock:
            c = dict(self.counts)
        return {"head_version": head.version, **c,
                "agreement_with_champion": c["agreed_with_champion"] / c["predictions"] if c["predictions"] else None,
                "live_accuracy": c["agreed_with_feedback"] / c["feedback"] if c["feedback"] else None}
