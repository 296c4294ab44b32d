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
from collections.abc import Callable


def freeze_long_lived() -> None:
    """Collect what is garbage now, then exempt every surviving object from later collections."""
    gc.collect()
    gc.freeze()


def watch_pauses(observe: Callable[[int, float], None], min_generation: int = 1) -> None:
    """Call ``observe(generation, seconds)`` after each collection of ``min_generation`` or older
    (the young generation's sub-millisecond passes are not worth a call each)."""
    started: list[float] = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] >= min_generation:
            observe(info["generation"], time.perf_counter() - started[0])

    gc.callbacks.append(callback)


def heap_report() -> dict:
    """For /health/detail: objects exempt from collection, and collections per generation so far."""
    return {"frozen_objects": gc.get_freeze_count(), "collections": [s["collections"] for s in gc.get_stats()]}
