"""The online updater: queued feedback -> partial_fit of the champion head -> gate -> new version.

Triggers: at least ``update_min_items`` queued (default 32), or at least one item queued for
``update_interval_s`` (default 60 s), or on demand (``infantino update``, POST /admin/update).
Every API worker runs this loop, but a lease in the shared store lets exactly one update run
at a time across workers and replicas. Order of effects, so a kill at any point loses nothing:
register the new head version -> set its alias (one atomic registry call) -> mark the feedback
used. Killed before the last step, the items are still queued and the next run takes them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np

from infantino import EMBEDDING_DIM
from infantino.settings import Settings
from online.gate import evaluate_gate
from online.queue import FeedbackItem, FeedbackQueue
from registry.store import CHALLENGER, CHAMPION, LoadedHead, ModelRegistry
from training.head import EmbeddingSet

log = logging.getLogger(__name__)


@dataclass
class UpdateReport:
    head_version: str
    parent_version: str
    promoted: bool
    verdict: str
    new_items: int
    held_out_items: int
    replay_items: int
    left_out_items: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _held_out(item_id: str, fraction: float) -> bool:
    """A fixed, pseudo-random choice per item, the same in every process."""
    return int(item_id[:8], 16) % 1000 < fraction * 1000


class Updater:
    def __init__(self, settings: Settings, registry: ModelRegistry, queue: FeedbackQueue,
                 on_promoted: Callable[[], object] | None = None):
        self.settings, self.registry, self.queue = settings, registry, queue
        self.task = registry.task
        self.on_promoted = on_promoted
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._embeddings: dict[str, tuple[EmbeddingSet, EmbeddingSet]] = {}
        self._roots: dict[str, LoadedHead] = {}

    # ---- triggering -----------------------------------------------------------------------------
    def start(self) -> "Updater":
        threading.Thread(target=self._loop, name="online-updater", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def nudge(self, depth: int) -> None:
        """Called after each acknowledged feedback: wake up at once when the batch is full."""
        if depth >= self.settings.update_min_items:
            self._wake.set()

    def due(self) -> bool:
        depth = self.queue.depth(self.task)
        if depth >= self.settings.update_min_items:
            return True
        age = self.queue.oldest_queued_age(self.task)
        return depth > 0 and age is not None and age >= self.settings.update_interval_s

    def _loop(self) -> None:
        poll = min(5.0, self.settings.update_interval_s)
        while not self._stop.is_set():
            self._wake.wait(poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.run_once()
            except Exception:
                log.exception("online update failed; the feedback stays queued for the next run")

    def run_once(self, force: bool = False) -> UpdateReport | None:
        """Run one update if due (or ``force``) and this process wins the lease."""
        if not force and not self.due():
            return None
        lease = f"updater:{self.task}"
        if not self.queue.try_acquire_lease(lease, self.holder, self.settings.lease_ttl_s):
            return None
        try:
            if self.queue.depth(self.task) == 0:
                return None
            return self._update()
        finally:
            self.queue.release_lease(lease, self.holder)

    # ---- the update -----------------------------------------------------------------------------
    def _training_embeddings(self, head: LoadedHead) -> tuple[EmbeddingSet, EmbeddingSet]:
        key = head.embeddings_run_id
        if key not in self._embeddings:
            self._embeddings[key] = self.registry.load_embeddings(head)
        return self._embeddings[key]

    def _root(self, head: LoadedHead) -> LoadedHead:
        """The offline-trained head this lineage started from (the gate's fixed reference)."""
        version = head.tags.get("lineage_root") or head.version
        if version not in self._roots:
            self._roots[version] = head if version == head.version else self.registry.load_head(version)
        return self._roots[version]

    def reembed(self, backbone_version: str) -> dict[str, int]:
        """After a backbone change, re-embed stored feedback from its images with the new backbone.

        Items stored without images (the privacy setting) cannot follow: they are counted and
        left out of updates, as their embeddings belong to a backbone no longer served.
        """
        stale = [i for i in self.queue.items(self.task, include_images=False) if i.backbone_version != backbone_version]
        if not stale:
            return {"reembedded": 0, "without_image": 0}
        from infantino.images import open_image, to_model_array
        from training.model import embed_images

        backbone = self.registry.load_backbone(backbone_version)
        prep = backbone.preprocessing
        done = without_image = 0
        for item in stale:
            full = self.queue.get(item.id)
            if full is None or not full.image:
                without_image += 1
                continue
            x = to_model_array(open_image(full.image, reduce_to=prep.input_size), prep.input_size, prep.grayscale)[None]
            self.queue.set_embedding(item.id, embed_images(backbone.model, x, prep)[0], backbone_version)
            done += 1
        log.info("re-embedded %d feedback item(s) with backbone v%s; %d without image left out", done, backbone_version, without_image)
        return {"reembedded": done, "without_image": without_image}

    def _as_set(self, items: list[FeedbackItem], classes: list[str]) -> EmbeddingSet:
        if not items:
            return EmbeddingSet(np.zeros((0, EMBEDDING_DIM), np.float32), np.zeros(0, np.int64))
        return EmbeddingSet(np.stack([i.embedding for i in items]).astype(np.float32),
                            np.array([classes.index(i.label) for i in items], np.int64))

    def _update(self) -> UpdateReport:
        started = time.time()
        s = self.settings
        champion = self.registry.load_head(CHAMPION)
        classes = champion.classes
        replay, validation = self._training_embeddings(champion)
        self.reembed(champion.backbone_version)

        queued = self.queue.queued(self.task)
        usable = [i for i in queued if i.backbone_version == champion.backbone_version and i.label in classes and i.embedding is not None]
        left_out = len(queued) - len(usable)
        new_held = [i for i in usable if _held_out(i.id, s.update_holdout_fraction)]
        new_train = [i for i in usable if not _held_out(i.id, s.update_holdout_fraction)]

        # Evidence never trained on: all held-out feedback so far for this backbone, new included.
        older_held = [i for i in self.queue.items(self.task, "held_out") if i.backbone_version == champion.backbone_version]
        held = self._as_set(older_held + new_held, classes)
        # Replay against forgetting: training embeddings and older feedback, `ratio` times the new items.
        new_set = self._as_set(new_train, classes)
        rng = np.random.default_rng(int(time.time()))
        n_replay = int(round(s.update_replay_ratio * len(new_set.y)))
        older_used = [i for i in self.queue.items(self.task, "used") if i.backbone_version == champion.backbone_version]
        older = self._as_set(older_used, classes).sample(n_replay // 2, seed=int(rng.integers(1 << 31)))
        base = replay.sample(n_replay - len(older.y), seed=int(rng.integers(1 << 31)))
        x = np.concatenate([new_set.x, older.x, base.x])
        y = np.concatenate([new_set.y, older.y, base.y])

        candidate = copy.deepcopy(champion.model)
        # A gentle step: partial_fit continues the head's own Adam state, whose step size was
        # fixed at the first fit; set it here (sklearn reads learning_rate_init at every step).
        candidate.set_params(learning_rate_init=s.update_learning_rate)
        if hasattr(candidate, "_optimizer"):
            candidate._optimizer.learning_rate_init = s.update_learning_rate
        if len(y):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(s.update_passes):
                    order = rng.permutation(len(y))
                    candidate.partial_fit(x[order], y[order])
        root = self._root(champion)
        verdict = evaluate_gate(champion.model, candidate, validation.x, validation.y, held.x, held.y, s.gate_max_val_drop,
                                s.gate_heldout_z, root=root.model)
        version = self._register(candidate, champion, verdict, new_train, new_held, len(base.y) + len(older.y))
        promoted = verdict.passed
        self.registry.promote("head", version, CHAMPION if promoted else CHALLENGER)
        if not promoted:
            self.registry.client.set_model_version_tag(self.registry.names["head"], version, "gate_reason", verdict.summary)
        self.queue.mark([i.id for i in new_train], "used", used_by_version=version)
        self.queue.mark([i.id for i in new_held], "held_out", used_by_version=version)
        report = UpdateReport(version, champion.version, promoted, verdict.summary, len(new_train), len(held.y),
                              len(base.y) + len(older.y), left_out, time.time() - started, verdict.metrics)
        log.info("online update: %s", report)
        try:
            from service import metrics

            metrics.UPDATES.labels(task=self.task, verdict="promoted" if promoted else "rejected").inc()
        except Exception:  # metrics only exist inside a BentoML worker
            pass
        if promoted and self.on_promoted:
            self.on_promoted()
        return report

    def _register(self, candidate, champion: LoadedHead, verdict, new_train, new_held, n_replay: int) -> str:
        tags = {
            "origin": "online_update", "parent_version": champion.version, "embeddings_run_id": champion.embeddings_run_id,
            "lineage_root": champion.tags.get("lineage_root") or champion.version,
            "gate": verdict.summary[:4000], "feedback_items": str(len(new_train)),
            "val_accuracy": f"{verdict.metrics['val_accuracy_candidate']:.4f}",
        }
        with self.registry.start_run(f"online-update-from-v{champion.version}", tags={"kind": "online_update"}):
            mlflow.log_params({"parent_version": champion.version, "passes": self.settings.update_passes,
                               "learning_rate": self.settings.update_learning_rate, "replay_items": n_replay,
                               "new_items": len(new_train), "held_out_new": len(new_held)})
            mlflow.log_metrics({k: v for k, v in verdict.metrics.items() if np.isfinite(v)})
            with tempfile.TemporaryDirectory() as tmp:
                lineage = {"parent_version": champion.version, "trained_on": [i.id for i in new_train],
                           "held_out": [i.id for i in new_held], "verdict": verdict.summary}
                (Path(tmp) / "lineage.json").write_text(json.dumps(lineage))
                mlflow.log_artifact(str(Path(tmp) / "lineage.json"))
            return self.registry.log_head(candidate, champion.classes, champion.backbone_version, tags)
