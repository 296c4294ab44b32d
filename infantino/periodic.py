"""A background loop with a visible lifecycle: ``start()``, ``stop()`` (joins), and ``wake()``.

Every recurring job of a worker (following the champion alias, the online updater, pruning
old predictions) is one of these, started and stopped by the service that owns it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``job()`` every ``interval_s`` seconds (sooner after ``wake()``) until stopped.

    An exception in ``job`` is logged and the loop goes on: the next run is the retry, after a
    wait that doubles with each failure in a row up to ``max_backoff_s`` (a dependency that is
    down is not hammered, and the first success restores the interval).
    """

    def __init__(self, job: Callable[[], object], interval_s: float, name: str, max_backoff_s: float | None = None):
        self.job, self.interval_s, self.name = job, interval_s, name
        self.max_backoff_s = max(interval_s, max_backoff_s if max_backoff_s is not None else interval_s)
        self.failures = 0  # in a row
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Periodic":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def wait_s(self) -> float:
        """The wait before the next run: the interval, doubled per failure in a row, at most max_backoff_s."""
        return min(self.interval_s * 2 ** min(self.failures, 30), self.max_backoff_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.wait_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.job()
                self.failures = 0
            except Exception:
                self.failures += 1
                log.exception("%s failed (%d in a row); retrying in %.1f s", self.name, self.failures, self.wait_s)
