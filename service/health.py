"""Model health, live: the bookkeeping behind the model-health metrics (service/metrics.py) and GET /health/detail.

One :class:`ModelHealth` per worker keeps:

- **agreement**: each feedback item that names a prediction (``prediction_id``) counts whether
  its label agreed with what that prediction answered, by the head version that answered it;
  live accuracy per version is ``agreed="true"`` over all in PromQL;
- **label drift**: the total-variation distance between the labels this worker predicted
  recently (the last :data:`DRIFT_WINDOW`) and the served head's training label distribution:
  the label shares of its validation embeddings (a random split of its training data, stored
  with the head's lineage; stratified replay samples would hide the imbalance). They are loaded
  when a head is switched to, once per lineage (online updates share their root's), never per request;
- **updates**: their duration and the gate's reasons (``online.gate.REASON_CODES``);
- **dependencies**: the registry as the champion polls found it (``ModelSource.last_ok``; nothing
  is asked again), the database by a ping every :data:`CHECK_S` in a background loop, so
  reporting them never waits on the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Callable, Iterable, Mapping

import numpy as np

from infantino.periodic import Periodic
from infantino.settings import redact
from online.updater import UpdateReport
from registry.shipped import SHIPPED_VERSION, has_shipped, shipped_embeddings
from registry.store import LoadedHead
from service import metrics

log = logging.getLogger(__name__)

DRIFT_WINDOW = 1000  # recent predictions per task and worker the label drift is measured on
CHECK_S = 10.0  # how often the database is pinged and the dependency gauges refreshed
STALE_POLLS = 10  # a registry whose last answer is this many poll intervals old (and >= 30 s) counts as unreachable
DATABASE = "database"
REGISTRY = "registry"
ALL_TASKS = "all"


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Half the L1 distance between two distributions over labels (0: the same, 1: disjoint)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def shares(counts: Mapping[str, float]) -> dict[str, float]:
    total = float(sum(counts.values()))
    return {k: v / total for k, v in counts.items() if v} if total else {}


def training_label_shares(head: LoadedHead, registry) -> dict[str, float] | None:
    """The label shares of ``head``'s validation embeddings (its training distribution); None when
    they cannot be had (a bundled head with the registry down)."""
    if head.version == SHIPPED_VERSION and head.run_id == "" and has_shipped(registry.task):
        labels = shipped_embeddings()[1].y  # the package's own files (served as version 0)
    else:
        labels = registry.load_embeddings(head)[1].y
    counts = Counter(np.asarray(labels, int).tolist())
    return shares({c: counts.get(i, 0) for i, c in enumerate(head.classes)})


class LabelWindow:
    """The last ``size`` predicted labels, counted as they come and go."""

    def __init__(self, size: int = DRIFT_WINDOW):
        self.labels: deque[str] = deque(maxlen=size)
        self.counts: Counter[str] = Counter()

    def add(self, label: str) -> None:
        if len(self.labels) == self.labels.maxlen:
            self.counts[self.labels[0]] -= 1
        self.labels.append(label)
        self.counts[label] += 1

    def shares(self) -> dict[str, float]:
        return shares(self.counts)


class ModelHealth:
    """Model-health bookkeeping of one worker (thread-safe); ``start``/``stop`` its check loop."""

    def __init__(self, tasks: Iterable[str], ping_database: Callable[[], object], poll_s: float, window: int = DRIFT_WINDOW,
                 check_s: float = CHECK_S):
        self.tasks = list(tasks)
        self.ping_database, self.poll_s = ping_database, poll_s
        self._lock = threading.Lock()
        self._windows = {task: LabelWindow(window) for task in self.tasks}
        self._reference: dict[str, dict[str, float]] = {}  # task -> training label shares
        self._reference_of: dict[str, str] = {}  # task -> the lineage (embeddings run) they belong to
        self._sources: dict[str, object] = {}  # task -> service.models.ModelSource (its champion polls)
        self.database: dict = {"last_ok": None, "last_failure": None, "last_error": None}
        self.loop = Periodic(self.check, check_s, "model-health")

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "ModelHealth":
        self.loop.start()
        self.loop.wake()  # a first check at once
        return self

    def stop(self) -> None:
        self.loop.stop()

    # ---- hooks ----------------------------------------------------------------------------------
    def follow(self, task: str, source) -> None:
        """Report ``task``'s registry from ``source``'s champion polls (``last_ok``, ``last_failure``, ``last_error``)."""
        self._sources[task] = source

    def head_switched(self, task: str, head: LoadedHead, registry) -> None:
        """A worker now serves ``head``: load its training label distribution unless its lineage's is loaded."""
        key = head.embeddings_run_id or f"v{head.version}"
        if self._reference_of.get(task) == key:
            return
        try:
            reference = training_label_shares(head, registry)
        except Exception as exc:  # the registry is down: no drift until the next switch
            log.warning("%s: no training label distribution for head v%s (%s); label drift not measured", task, head.version,
                        redact(exc)[:300])
            reference = None
        with self._lock:
            if reference:
                self._reference[task], self._reference_of[task] = reference, key
            else:
                self._reference.pop(task, None)
                self._reference_of.pop(task, None)
            self._update_drift(task)

    def predicted(self, records: Iterable[Mapping]) -> None:
        """Predictions answered (``service.answers`` records: ``task``, ``label``)."""
        touched = set()
        with self._lock:
            for r in records:
                window = self._windows.get(r["task"])
                if window is not None:
                    window.add(r["label"])
                    touched.add(r["task"])
            for task in touched:
                self._update_drift(task)

    def feedback_on(self, task: str, label: str, predicted: Mapping) -> None:
        """Feedback ``label`` for a prediction that answered ``predicted`` (``label``, ``head_version``)."""
        agreed = "true" if label == predicted["label"] else "false"
        metrics.AGREEMENT.labels(task=task, head_version=str(predicted["head_version"]), agreed=agreed).inc()

    def updated(self, report: UpdateReport) -> None:
        codes = [] if report.promoted else (report.gate_codes or ["other"])
        metrics.UPDATES.labels(task=report.task, verdict="promoted" if report.promoted else "rejected",
                               reason=codes[0] if codes else "none").inc()
        metrics.UPDATE_SECONDS.labels(task=report.task).observe(report.seconds)
        for code in codes:
            metrics.GATE_REFUSALS.labels(task=report.task, reason=code).inc()

    # ---- drift ----------------------------------------------------------------------------------
    def _update_drift(self, task: str) -> None:  # holding the lock
        window, reference = self._windows[task], self._reference.get(task)
        metrics.DRIFT_WINDOW.labels(task=task).set(len(window.labels))
        if reference and window.labels:
            metrics.LABEL_DRIFT.labels(task=task).set(total_variation(window.shares(), reference))

    def drift(self, task: str) -> dict:
        with self._lock:
            window, reference = self._windows[task], self._reference.get(task)
            recent = window.shares()
            return {"window": len(window.labels), "window_size": window.labels.maxlen, "recent": recent, "training": reference,
                    "total_variation": total_variation(recent, reference) if reference and recent else None}

    # ---- dependencies ---------------------------------------------------------------------------
    def check(self) -> None:
        """Ping the database and refresh the dependency gauges (the check loop's job)."""
        try:
            self.ping_database()
            self.database["last_ok"] = time.time()
        except Exception as exc:
            self.database["last_failure"], self.database["last_error"] = time.time(), redact(exc)[:300]
        metrics.DEPENDENCY_UP.labels(dependency=DATABASE, task=ALL_TASKS).set(float(_up(self.database, None)))
        for task, source in list(self._sources.items()):
            metrics.DEPENDENCY_UP.labels(dependency=REGISTRY, task=task).set(float(self._registry(source)["reachable"]))

    def _registry(self, source) -> dict:
        state = {"last_ok": source.last_ok, "last_failure": source.last_failure, "last_error": source.last_error}
        return {"reachable": _up(state, max(30.0, STALE_POLLS * self.poll_s)), **_ages(state), "uri": source.registry.display_uri}

    def detail(self, served_versions: Mapping[str, Mapping | None]) -> dict:
        """``served_versions``: per task ``{'head_version', 'backbone_version'}``, or None when nothing is served yet."""
        tasks = {}
        for task in self.tasks:
            source = self._sources.get(task)
            registry = self._registry(source) if source is not None else {"reachable": False}
            tasks[task] = {"serving": served_versions.get(task), "registry": registry, "label_drift": self.drift(task)}
        database = {"reachable": _up(self.database, 3 * self.loop.interval_s), **_ages(self.database)}
        ready = all(t["serving"] is not None for t in tasks.values())
        healthy = database["reachable"] and all(t["registry"]["reachable"] for t in tasks.values())
        return {"status": "ok" if ready and healthy else ("degraded" if ready else "not_ready"),
                "ready": ready, "database": database, "tasks": tasks}


def _up(state: Mapping, stale_after_s: float | None) -> bool:
    """The last check succeeded (and, with ``stale_after_s``, recently enough)."""
    ok, failed = state["last_ok"], state["last_failure"]
    if ok is None or (failed is not None and failed > ok):
        return False
    return stale_after_s is None or time.time() - ok <= stale_after_s


def _ages(state: Mapping) -> dict:
    now = time.time()
    return {"last_ok": state["last_ok"], "last_ok_age_s": None if state["last_ok"] is None else round(now - state["last_ok"], 3),
            "last_failure": state["last_failure"], "last_error": state["last_error"]}
