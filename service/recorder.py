"""Group commit of prediction records: concurrent requests share one SQLite/PostgreSQL transaction.

Every /predict answer carries prediction ids that /feedback may name from any worker or
replica, so a request's records must be committed before it answers. Committed one request
at a time, 16 concurrent requests queue for the SQLite write lock and the transactions cost
most of the API worker's thread time (measured with py-spy under bench/serve.py's load).
Here one writer thread commits whatever has accumulated while the previous commit ran, and
each request waits only for the commit that holds its rows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

from store import PredictionLog

log = logging.getLogger(__name__)


class PredictionRecorder:
    def __init__(self, log_: PredictionLog):
        self.log = log_
        self._pending: list[tuple[list[dict], concurrent.futures.Future]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> "PredictionRecorder":
        self._thread = threading.Thread(target=self._run, name="prediction-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit what is pending, then stop."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def record(self, rows: list[dict]) -> None:
        """Return once ``rows`` (see PredictionLog.record) are committed."""
        if not rows:
            return
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending.append((rows, done))
        self._wake.set()
        await asyncio.wrap_future(done)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                try:
                    self.log.record([row for rows, _ in batch for row in rows])
                except Exception as exc:  # each waiting request answers with the error
                    for _, done in batch:
                        done.set_exception(exc)
                else:
                    for _, done in batch:
                        done.set_result(None)
            if self._stopping:
                return
