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

from online.queue import FeedbackQueue

log = logging.getLogger(__name__)


class PredictionRecorder:
    def __init__(self, queue: FeedbackQueue):
        self.queue = queue
        self._pending: list[tuple[list[dict], concurrent.futures.Future]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="prediction-recorder", daemon=True).start()

    async def record(self, rows: list[dict]) -> None:
        """Return once ``rows`` (keyword dicts of FeedbackQueue.record_prediction) are committed."""
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
            if not batch:
                continue
            try:
                self.queue.record_predictions([row for rows, _ in batch for row in rows])
            except Exception as exc:  # each waiting request answers with the error
                for _, done in batch:
                    done.set_exception(exc)
            else:
                for _, done in batch:
                    done.set_result(None)
