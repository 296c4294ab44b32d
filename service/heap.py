"""Keep Python's full garbage-collection passes off the serving path, and show the pauses that remain.

A worker holds hundreds of thousands of long-lived objects (about 290,000 from importing the
service alone: BentoML, MLflow, scikit-learn, pydantic; then the models and clients; the count a
worker froze is in /health/detail). Each full (generation 2) collection walked all of them: 245-259 ms with the GIL
held, every 7-8 s under bench/serve.py's 16 clients, which stalled every request in flight at
once and made the p99 latency over 3x the median (README "Serving"). ``gc.freeze()`` moves the
objects alive at that moment to a permanent generation the collector skips: the full passes that
followed took 11-58 ms. Reference counting still frees frozen objects that are released (an old
model after a swap); only reference cycles among them stay, and the heap is frozen rarely (at
start and after each champion switch), so that is a few objects per switch.

The pauses that remain are observed as ``infantino_gc_pause_seconds`` (by generation) and the
frozen count is in GET /health/detail.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable

from infantino.periodic import Periodic

MAX_UNREPORTED = 10_000  # pauses kept between two reports (the oldest are dropped past it)


def freeze_long_lived() -> None:
    """Collect what is garbage now, then exempt every surviving object from later collections."""
    gc.collect()
    gc.freeze()


class GcPauses:
    """Collector pauses of generation ``min_generation`` or older, handed to ``observe(generation, seconds)``
    by a thread of its own (``start()`` / ``stop()``), never by the collector's callback.

    Why not observe in the callback: a collection runs inside whatever allocation triggered it,
    and so may its callback. prometheus_client's multiprocess values share one non-reentrant lock
    per process, and allocate while holding it (a new label's value, its file); a collection
    triggered there whose callback observed a metric would wait for that lock forever, and with
    it every request of the worker (seen as a freshly started worker that answered nothing: the
    first requests create labels). So the callback only appends to a deque (atomic, no lock);
    the thread empties it every ``interval_s``. The young generation's sub-millisecond passes
    are not worth an observation each.
    """

    def __init__(self, observe: Callable[[int, float], None], min_generation: int = 1, interval_s: float = 1.0):
        self.observe, self.min_generation = observe, min_generation
        self._seen: deque[tuple[int, float]] = deque(maxlen=MAX_UNREPORTED)
        self._started_at = 0.0
        self._reporter = Periodic(self.report, interval_s, "gc-pauses")

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
        elif info["generation"] >= self.min_generation:
            self._seen.append((info["generation"], time.perf_counter() - self._started_at))

    def report(self) -> None:
        """Observe the pauses seen since the last report (those an observation itself causes wait for the next)."""
        for _ in range(len(self._seen)):
            self.observe(*self._seen.popleft())

    def start(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        self._reporter.start()
        return self

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        self._reporter.stop()
        self.report()


def heap_report() -> dict:
    """For /health/detail: objects exempt from collection, and collections per generation so far."""
    return {"frozen_objects": gc.get_freeze_count(), "collections": [s["collections"] for s in gc.get_stats()]}
