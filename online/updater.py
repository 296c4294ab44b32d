"""The online updater: queued feedback -> the lineage's root head taught all feedback -> gate -> new version.

Each update teaches the offline-trained root head (``partial_fit``) every feedback item so far,
not just the new ones on top of the last champion: no drift accumulates along a chain of
updates, and the gate can judge the result on cross-fitted evidence from all feedback
(online/gate.py).

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
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np

from infantino.embeddings import EmbeddingSet, stack_rows
from infantino.periodic import Periodic
from infantino.settings import OnlineSettings
from online.gate import evaluate_gate, paired_evidence
from registry.store import CHALLENGER, CHAMPION, LoadedHead, ModelRegistry
from heads import configure_online, predict_proba, teach
from heads.domain import class_shares
from store import FeedbackItem, FeedbackStore, Lease
from store.schema import QUEUED, USED

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
    feedback_items: int  # all feedback the candidate was taught (and the gate's evidence)
    left_out_items: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    gate_codes: list[str] = field(default_factory=list)  # why it was refused (online.gate.REASON_CODES); empty when promoted

    def to_dict(self) -> dict:
        return asdict(self)


UNPROVEN_TAG = "unproven_promotions"  # on a head version: promotions in a row, ending with it, without a gain over their champion
# On a head version: the last version of its lineage whose promotion was proven (itself, if it was;
# the root before any was). Later candidates must show a gain over it on every item it was not taught:
# evidence that accumulates along a chain of unproven promotions, so the gate's rule (c) gains power
# as feedback grows (against the champion alone it saw one batch, 32 items: on the infant benchmark
# it stopped the loop at 192 of 224 items, 2026-12-06).
PROVEN_TAG = "proven_reference"


def taught_to(item: FeedbackItem, head_version: str) -> bool:
    """Whether head ``head_version`` (an online update) was taught ``item``: each update teaches every
    usable item there is, and marks the new ones used by its version, so the items it was taught
    are those used by it or by an earlier version."""
    return item.status == USED and item.used_by_version is not None and int(item.used_by_version) <= int(head_version)


def fold_of(item_id: str, folds: int) -> int:
    """A fixed, pseudo-random fold per item, the same in every process and every update."""
    return int(item_id[:8], 16) % folds


def taught_head(root, data: EmbeddingSet, domains: list[str | None], settings, training_prior: np.ndarray | None = None):
    """The root head taught ``data``, from ``domains``, with the deployment's online ``settings`` (the root itself is never changed)."""
    head = configure_online(copy.deepcopy(root), settings, training_prior)
    return teach(head, data.x, data.y, domains) if len(data) else head


def crossfit_taught(root, data: EmbeddingSet, domains: list[str | None], ids: list[str], settings,
                    training_prior: np.ndarray | None = None) -> np.ndarray:
    """Each item's probabilities (for its domain) by the root taught every *other* fold: evidence no model
    saw. What the online updater's candidates are judged on, and the champion's answers a backbone
    adaptation must beat (adaptation/backbone.py; online/gate.py rule d)."""
    folds = np.array([fold_of(i, settings.gate_folds) for i in ids], dtype=int)
    named = np.array(domains, dtype=object)
    out = np.zeros((len(data), len(root.classes_)))
    for k in np.unique(folds):
        rest = folds != k
        head = taught_head(root, EmbeddingSet(data.x[rest], data.y[rest]), list(named[rest]), settings, training_prior)
        out[~rest] = predict_proba(head, data.x[~rest], list(named[~rest]))
    return out


def accuracy(head, data: EmbeddingSet) -> float:
    return float(np.mean(head.predict(data.x) == data.y)) if len(data) else float("nan")


class Updater:
    def __init__(self, settings: OnlineSettings, registry: ModelRegistry, feedback: FeedbackStore, lease: Lease,
                 embed: EmbedFn | None = None, on_report: Callable[[UpdateReport], object] | None = None):
        self.settings, self.registry, self.feedback, self.lease = settings, registry, feedback, lease
        self.task = registry.task
        self.embed, self.on_report = embed, on_report
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # The lease tells processes apart; this lock, the threads of one process (the background
        # loop and POST /admin/update share one holder name, which the lease would let in twice).
        self._one_at_a_time = threading.Lock()
        # A failing run (the registry or the database down) is retried with backoff, up to once a
        # minute; queued items stay queued, so the first run after the outage catches up.
        self.loop = Periodic(self.run_once, min(5.0, settings.update_interval_s), f"online-updater-{self.task}", max_backoff_s=60.0)
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
        if not self._one_at_a_time.acquire(blocking=False):
            return None
        try:
            if not self.lease.try_acquire(name, self.holder, self.settings.lease_ttl_s):
                return None
            with self.lease.kept(name, self.holder, self.settings.lease_ttl_s):  # a worker killed mid-update blocks others one TTL
                if self.feedback.depth(self.task) == 0:
                    return None
                report = self._update()
        finally:
            self._one_at_a_time.release()
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
        # Items stored before the backbone served stage features hold the embedding alone (stack_rows).
        return EmbeddingSet(stack_rows(*(np.asarray(i.embedding)[None] for i in items)),
                            np.array([classes.index(i.label) for i in items], np.int64))

    def _update(self) -> UpdateReport:
        started = time.time()
        s = self.settings
        champion = self.registry.load_head(CHAMPION)
        classes = champion.classes
        _, validation = self._training_embeddings(champion)
        self.reembed(champion.backbone_version)

        # Every usable item of this backbone is taught to the root and is the gate's evidence.
        items = self.feedback.items(self.task, include_images=False)
        usable = [i for i in items if i.backbone_version == champion.backbone_version and i.label in classes and i.embedding is not None]
        new = [i for i in usable if i.status == QUEUED]
        left_out = sum(i.status == QUEUED for i in items) - len(new)
        taught = self._as_set(usable, classes)
        domains = [i.domain for i in usable]  # each item's domain, as its client named it (heads/domain.py)

        root_head = self._root(champion)
        root = root_head.model
        training_prior = class_shares(validation.y, len(classes))  # a stratified split: the training data's mix
        candidate = taught_head(root, taught, domains, self.settings, training_prior)
        crossfit = crossfit_taught(root, taught, domains, [i.id for i in usable], self.settings, training_prior)
        over_champion = None
        reference = self._proven_reference(champion, root_head)
        if champion.version != root_head.version:  # the champion learned feedback: does the candidate know more than the last proof?
            unseen = np.array([not taught_to(i, reference.version) for i in usable], bool)
            over_champion = paired_evidence(crossfit[unseen], predict_proba(reference.model, taught.x[unseen], [d for d, u in zip(domains, unseen) if u])
                                            if unseen.any() else np.zeros((0, len(classes))), taught.y[unseen])
        verdict = evaluate_gate(
            accuracy(root, validation), accuracy(candidate, validation), candidate_proba=crossfit,
            root_proba=root.predict_proba(taught.x) if len(taught) else np.zeros((0, len(classes))), labels=taught.y,
            max_val_drop=s.gate_max_val_drop, alpha=s.gate_alpha, min_items=s.gate_min_items, over_champion=over_champion,
            unproven_before=int(champion.tags.get(UNPROVEN_TAG, 0)), max_unproven=s.gate_max_unproven_promotions,
            worse_alpha=s.gate_worse_alpha,
        )
        proven_reference = reference.version if verdict.unproven_promotions else None  # None: the new version itself
        version = self._register(candidate, champion, verdict, usable, new, proven_reference)
        promoted = verdict.passed
        self.registry.promote("head", version, CHAMPION if promoted else CHALLENGER)
        self.feedback.mark([i.id for i in new], USED, used_by_version=version)
        report = UpdateReport(self.task, version, champion.version, promoted, verdict.summary, len(new), len(usable),
                              left_out, time.time() - started, verdict.metrics, list(verdict.codes))
        log.info("online update: %s", report)
        return report

    def _proven_reference(self, champion: LoadedHead, root: LoadedHead) -> LoadedHead:
        """The champion's last proven ancestor (PROVEN_TAG; a champion registered before the tag: itself)."""
        version = champion.tags.get(PROVEN_TAG) or champion.version
        if version == champion.version:
            return champion
        if version == root.version:
            return root
        if version not in self._roots:  # a small cache of fixed versions, as the roots'
            self._roots[version] = self.registry.load_head(version)
        return self._roots[version]

    def _register(self, candidate, champion: LoadedHead, verdict, taught: list[FeedbackItem], new: list[FeedbackItem],
                  proven_reference: str | None) -> str:
        root = champion.tags.get("lineage_root") or champion.version
        tags = {
            "origin": "online_update", "parent_version": champion.version, "embeddings_run_id": champion.embeddings_run_id,
            "lineage_root": root, "gate": verdict.summary[:4000], "feedback_items": str(len(taught)),
            "val_accuracy": f"{verdict.metrics['val_accuracy_candidate']:.4f}",
            "feedback_accuracy_crossfit": f"{verdict.metrics['feedback_accuracy_candidate']:.4f}",
            UNPROVEN_TAG: str(verdict.unproven_promotions),
        }
        if proven_reference is not None:
            tags[PROVEN_TAG] = proven_reference
        if not verdict.passed:  # with the version, before any alias names it: whoever sees the challenger sees why
            tags["gate_reason"] = verdict.summary[:4000]
        with self.registry.start_run(f"online-update-from-v{champion.version}", tags={"kind": "online_update"}):
            mlflow.log_params({"parent_version": champion.version, "lineage_root": root, "new_items": len(new),
                               "feedback_items": len(taught),
                               **{k: v for k, v in candidate.get_params(deep=False).items() if isinstance(v, (int, float, str))}})
            mlflow.log_metrics({k: v for k, v in verdict.metrics.items() if np.isfinite(v)})
            with tempfile.TemporaryDirectory() as tmp:
                lineage = {"parent_version": champion.version, "lineage_root": root, "taught": [i.id for i in taught],
                           "new": [i.id for i in new], "verdict": verdict.summary}
                (Path(tmp) / "lineage.json").write_text(json.dumps(lineage))
                mlflow.log_artifact(str(Path(tmp) / "lineage.json"))
            return self.registry.log_head(candidate, champion.classes, champion.backbone_version, tags)
