"""The collector's pauses are measured without ever stalling a worker (service/heap.py)."""

from __future__ import annotations

import subprocess
import sys

from testkit.server import PROJECT_ROOT

# In a process of its own: it changes the collector's thresholds, and a deadlock must not take the test run with it.
# prometheus_client in multiprocess mode (as under `bentoml serve`) allocates while holding its one lock; with a
# collection at nearly every allocation, some run there, while a new label's value is made.
LABELS_UNDER_COLLECTIONS = """
import gc
import prometheus_client as prom
from service.heap import GcPauses

pauses = prom.Histogram("gc_pause_seconds", "pauses", ["generation"])
labelled = prom.Counter("labelled", "one label per item", ["n"])
observed = []

def observe(generation, seconds):
    pauses.labels(generation=str(generation)).observe(seconds)
    observed.append(generation)

watcher = GcPauses(observe, interval_s=0.05).start()
thresholds = gc.get_threshold()
gc.set_threshold(1, 1, 1)
for i in range(2000):
    labelled.labels(n=str(i)).inc()
gc.set_threshold(*thresholds)
watcher.stop()
print(len(observed), min(observed))
"""


def test_pauses_are_observed_even_when_a_collection_runs_inside_a_metric_update(tmp_path):
    try:
        done = subprocess.run([sys.executable, "-c", LABELS_UNDER_COLLECTIONS], check=False, cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=60, env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": ""})
    except subprocess.TimeoutExpired:
        raise AssertionError("metric updates stalled: a collection's callback waited for prometheus_client's lock") from None
    assert done.returncode == 0, done.stderr[-2000:]
    count, youngest = map(int, done.stdout.split())
    assert count > 100 and youngest >= 1  # many collections seen, none of the young generation's
