"""The online updater: queued feedback -> partial_fit of the champion head -> gate -> new version.

Triggers: at least ``update_min_items`` queued (default 32), or at least one item queued for
``update_interval_s`` (default 60 s), or on demand (``infantino update``, POST /admin/update).
Every API worker runs this loop, but a lease in the shared store lets exactly one update run
at a time across workers and replicas. Order of effects, so a kill at any point loses nothing:
register the new head version -> set its alias (one atomic registry call) -> mark the feedback
used. Killed before the last step, the items are still queued and the next run takes them.

The updater knows no serving framework and no deep-learning library: whoever runs it gives it
an ``embed`` function (stored images -> embeddings by a named backbone version) for the
re-embedding a backbone change needs, and an ``on_report`` callback for what each update did.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np

from infantino.embeddings import EmbeddingSet
from infantino.periodic import Periodic
from infantino.settings import OnlineSettings
from online.gate import evaluate_gate
from registry.store import CHALLENGER, CHAMPION, LoadedHead, ModelRegistry
from store import FeedbackItem, FeedbackStore, Lease

log = logging.getLogger(__name__)

# Stored images (uploads or face crops) -> float32 (N, 64) embeddings made by backbone ``version``.
EmbedFn = Callable[[list[bytes], str], np.ndarray]


@dataclass
class UpdateReport:
    task: str
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


def held_out(item_id: str, fraction: float) -> bool:
    """A fixed, pseudo-random choice per item, the same in every process."""
    return int(item_id[:8], 16) % 1000 < fraction * 1000


class Updater:
    def __init__(self, settings: OnlineSettings, registry: ModelRegistry, feedback: FeedbackStore, lease: Lease,
                 embed: EmbedFn | None = None, on_report: Callable[[UpdateReport], object] | None = None):
        self.settings, self.registry, self.feedback, self.lease = settings, registry, feedback, lease
        self.task = registry.task
        self.embed, self.on_report = embed, on_report
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.loop = Periodic(self.run_once, min(5.0, settings.update_interval_s), f"online-updater-{self.task}")
        self._embeddings: dict[str, tuple[EmbeddingSet, EmbeddingSet]] = {}
        self._roots: dict[str, LoadedHead] = {}

    # ---- lifecycle and triggering ---------------------------------------------------------------
    def start(self) -> "Updater":
        """Check for a due update every few seconds in the background (until ``stop``)."""
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()

    def nudge(self, depth: int) -> None:
        """Called after each acknowledged feedback: wake up at once when the batch is full."""
        if depth >= self.settings.update_min_items:
            self.loop.wake()

    def due(self) -> bool:
        depth = self.feedback.depth(self.task)
        if depth >= self.settings.update_min_items:
            return True
        age = self.feedback.oldest_queued_age(self.task)
        return depth > 0 and age is not None and age >= self.settings.update_interval_s

    def run_once(self, force: bool = False) -> UpdateReport | None:
        """Run one update if due (or ``force``) and this process wins the lease."""
        if not force and not self.due():
            return None
        name = f"updater:{self.task}"
        if not self.lease.try_acquire(name, self.holder, self.settings.lease_ttl_s):
            return None
        try:
            if self.feedback.depth(self.task) == 0:
                return None
            report = self._update()
        finally:
            self.lease.release(name, self.holder)
        if self.on_report is not None:
            self.on_report(report)
        return report

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
        stale = [i for i in self.feedback.items(self.task, include_images=False) if i.backbone_version != backbone_version]
        if not stale:
            return {"reembedded": 0, "without_image": 0}
        if self.embed is None:
            raise RuntimeError(f"{len(stale)} feedback item(s) need re-embedding with backbone v{backbone_version}, "
                               "and this updater was given no embed function")
        done = without_image = 0
        for item in stale:
            full = self.feedback.get(item.id)
            if full is None or not full.image:
                without_image += 1
                continue
            self.feedback.set_embedding(item.id, self.embed([full.image], backbone_version)[0], backbone_version)
            done += 1
        log.info("re-embedded %d feedback item(s) with backbone v%s; %d without image left out", done, backbone_version, without_image)
        return {"reembedded": done, "without_image": without_image}

    def _as_set(self, items: list[FeedbackItem], classes: list[str]) -> EmbeddingSet:
        if not items:
            return EmbeddingSet.empty()
        return EmbeddingSet(np.stack([i.embedding for i in items]).astype(np.float32),
                            np.array([classes.index(i.label) for i in items], np.int64))

    def _update(self) -> UpdateReport:
        started = time.time()
        s = self.settings
        champion = self.registry.load_head(CHAMPION)
        classes = champion.classes
        replay, validation = self._training_embeddings(champion)
        self.reembed(champion.backbone_version)

        queued = self.feedback.queued(self.task, include_images=False)
        usable = [i for i in queued if i.backbone_version == champion.backbone_version and i.label in classes and i.embedding is not None]
        left_out = len(queued) - len(usable)
        new_held = [i for i in usable if held_out(i.id, s.update_holdout_fraction)]
        new_train = [i for i in usable if not held_out(i.id, s.update_holdout_fraction)]

        # Evidence never trained on: all held-out feedback so far for this backbone, new included.
        older_held = [i for i in self.feedback.items(self.task, "held_out", include_images=False)
                      if i.backbone_version == champion.backbone_version]
        held = self._as_set(older_held + new_held, classes)
        # Replay against forgetting: training embeddings and older feedback, `ratio` times the new items.
        new_set = self._as_set(new_train, classes)
        rng = np.random.default_rng(int(time.time()))
        n_replay = int(round(s.update_replay_ratio * len(new_set)))
        older_used = [i for i in self.feedback.items(self.task, "used", include_images=False)
                      if i.backbone_version == champion.backbone_version]
        older = self._as_set(older_used, classes).sample(n_replay // 2, seed=int(rng.integers(1 << 31)))
        base = replay.sample(n_replay - len(older), seed=int(rng.integers(1 << 31)))
        batch = EmbeddingSet.concat(new_set, older, base)

        candidate = copy.deepcopy(champion.model)
        candidate.set_params(online_learning_rate=s.update_learning_rate, online_passes=s.update_passes)
        if len(batch):
            candidate.partial_fit(batch.x, batch.y)
        root = self._root(champion)
        verdict = evaluate_gate(champion.model, candidate, validation.x, validation.y, held.x, held.y, s.gate_max_val_drop,
                                s.gate_heldout_z, root=root.model)
        version = self._register(candidate, champion, verdict, new_train, new_held, len(base) + len(older))
        promoted = verdict.passed
        self.registry.promote("head", version, CHAMPION if promoted else CHALLENGER)
        if not promoted:
            self.registry.client.set_model_version_tag(self.registry.names["head"], version, "gate_reason", verdict.summary)
        self.feedback.mark([i.id for i in new_train], "used", used_by_version=version)
        self.feedback.mark([i.id for i in new_held], "held_out", used_by_version=version)
        report = UpdateReport(self.task, version, champion.version, promoted, verdict.summary, len(new_train), len(held),
                              len(base) + len(older), left_out, time.time() - started, verdict.metrics)
        log.info("online update: %s", report)
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
