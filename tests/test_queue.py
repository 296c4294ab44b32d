"""online/queue.py against real databases: a SQLite file in tmp_path and a real PostgreSQL.

PostgreSQL comes from ``TEST_POSTGRES_URL`` (default ``postgresql+psycopg2://root@127.0.0.1:5432/test``).
If it cannot be reached, its tests fail when ``CI`` is set and are skipped otherwise. Each
PostgreSQL test works in a schema of its own, dropped afterwards.

The durability and concurrency tests run real child processes (``python -c``): a child killed
with SIGKILL right after ``add()`` returned, and several children writing at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from online.queue import STATUSES, FeedbackItem, FeedbackQueue

PG_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg2://root@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 60


# ---- backends -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_error() -> str | None:
    """None if PostgreSQL answers, else why not (checked once per session)."""
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "no usable server"
        return f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        engine.dispose()


@dataclass
class Backend:
    name: str
    url: str
    kwargs: dict = field(default_factory=dict)
    opened: list[FeedbackQueue] = field(default_factory=list)

    def open(self) -> FeedbackQueue:
        q = FeedbackQueue(self.url, **self.kwargs)
        self.opened.append(q)
        return q

    def child_argv(self, script: str, *extra: str) -> list[str]:
        return [sys.executable, "-c", script, self.url, json.dumps(self.kwargs), *extra]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path, postgres_error):
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite:///{tmp_path / 'queue' / 'feedback.db'}")
        yield b
        for q in b.opened:
            q.close()
        return
    if postgres_error is not None:
        message = f"PostgreSQL at {PG_URL} is not reachable ({postgres_error})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    schema = f"test_queue_{uuid.uuid4().hex[:12]}"
    b = Backend("postgresql", PG_URL, {"schema": schema})
    yield b
    for q in b.opened:
        q.close()
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_queue(tmp_path):
    q = FeedbackQueue(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield q
    q.close()


def vec(seed: int, dim: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


# Children import everything, print "ready", then wait for this file: they start together.
WAIT_FOR_GO = r"""
import os, sys, time
print("ready", flush=True)
while not os.path.exists(sys.argv[-1]):
    time.sleep(0.002)
"""


def run_children(argvs: list[list[str]], go_file: Path) -> list[subprocess.CompletedProcess]:
    """Run child processes whose script calls WAIT_FOR_GO; release them at once; collect their output."""
    procs = [subprocess.Popen([*a, str(go_file)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for a in argvs]
    for p in procs:
        line = p.stdout.readline()
        assert line == "ready\n", p.communicate(timeout=CHILD_TIMEOUT_S)[1][-2000:]
    go_file.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=CHILD_TIMEOUT_S)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


# ---- feedback items -------------------------------------------------------------------------------

def test_add_commits_and_reads_back(backend):
    q = backend.open()
    e = vec(0)
    before = time.time()
    fid, dup = q.add(task="expression", label="happy", embedding=e, backbone_version="3", image=b"\x89PNG\x00\xff",
                     prediction_id="p1", predicted_label="sad")
    bare, _ = q.add(task="expression", label="sad", embedding=None, backbone_version=None)  # image None: privacy
    after = time.time()
    assert dup is False and len(fid) == 32 and uuid.UUID(hex=fid).version == 4

    # A second queue object (as another worker would) sees the committed rows.
    items = backend.open().queued("expression")
    assert [i.id for i in items] == [fid, bare]
    first = items[0]
    assert isinstance(first, FeedbackItem)
    assert first.embedding.dtype == np.float32 and np.array_equal(first.embedding, e)
    assert first.embedding.tobytes() == e.tobytes()  # bit-exact
    assert (first.task, first.label, first.status, first.backbone_version) == ("expression", "happy", "queued", "3")
    assert (first.image, first.prediction_id, first.predicted_label) == (b"\x89PNG\x00\xff", "p1", "sad")
    assert before <= first.created == first.updated <= after and first.used_by_version is None
    assert items[1].embedding is None and items[1].image is None and items[1].backbone_version is None

    assert q.get(fid).label == "happy" and q.get("nope") is None
    assert q.get(fid, include_image=False).image is None
    assert [i.image for i in q.items("expression", include_images=False)] == [None, None]
    assert q.items("other-task") == [] and q.depth("other-task") == 0

    # float64 in, float32 out; the embedding is writable (a copy, not a view of the row).
    f64, _ = q.add(task="expression", label="happy", embedding=np.linspace(0, 1, 8), backbone_version="3")
    got = q.get(f64).embedding
    assert got.dtype == np.float32 and np.array_equal(got, np.linspace(0, 1, 8).astype(np.float32))
    got[0] = 5.0


def test_validation(sqlite_queue):
    q = sqlite_queue
    with pytest.raises(ValueError, match="1-D"):
        q.add(task="t", label="a", embedding=np.zeros((2, 3)), backbone_version="1")
    with pytest.raises(ValueError, match="NaN"):
        q.add(task="t", label="a", embedding=np.array([1.0, np.nan]), backbone_version="1")
    with pytest.raises(ValueError, match="backbone_version"):
        q.add(task="t", label="a", embedding=vec(1), backbone_version=None)
    with pytest.raises(ValueError, match="label"):
        q.add(task="t", label="", embedding=None, backbone_version=None)
    with pytest.raises(TypeError, match="image"):
        q.add(task="t", label="a", embedding=None, backbone_version=None, image="not bytes")
    for bad in (lambda: q.mark(["x"], "done"), lambda: q.items("t", status="done")):
        with pytest.raises(ValueError) as info:
            bad()
        assert all(repr(s) in str(info.value) for s in STATUSES)
    with pytest.raises(ValueError, match="ttl_s"):
        q.try_acquire_lease("updater", "a", 0)
    assert q.depth("t") == 0
    with pytest.raises(ValueError, match="schema"):
        FeedbackQueue(f"sqlite:///{q.url.database}", schema="x")
    with pytest.raises(ValueError, match="table_prefix"):
        FeedbackQueue(f"sqlite:///{q.url.database}", table_prefix="bad-prefix;")


def test_idempotency_key(backend):
    q = backend.open()
    a, dup_a = q.add(task="expression", label="happy", embedding=vec(1), backbone_version="1", idempotency_key="req-1")
    b, dup_b = q.add(task="expression", label="sad", embedding=vec(2), backbone_version="1", idempotency_key="req-1")
    assert (dup_a, dup_b) == (False, True) and a == b
    assert q.get(a).label == "happy"  # first write wins, nothing new stored
    other, dup = q.add(task="other", label="happy", embedding=None, backbone_version=None, idempotency_key="req-1")
    assert other != a and dup is False  # keys are per task
    x, _ = q.add(task="expression", label="happy", embedding=None, backbone_version=None)
    y, _ = q.add(task="expression", label="happy", embedding=None, backbone_version=None)
    assert x != y  # no key: never deduplicated
    assert q.depth("expression") == 3 and q.depth("other") == 1


def test_depth_counts_mark(backend):
    q = backend.open()
    assert q.depth("expression") == 0 and q.counts("expression") == {"queued": 0, "used": 0, "held_out": 0}
    ids = [q.add(task="expression", label="happy", embedding=vec(i), backbone_version="1")[0] for i in range(6)]
    assert [i.id for i in q.queued("expression")] == ids  # oldest first
    assert [i.id for i in q.queued("expression", limit=2)] == ids[:2]

    q.mark(ids[:3], "used", used_by_version="7")
    q.mark([ids[3]], "held_out")
    q.mark([], "used")  # no-op
    assert q.depth("expression") == 2
    assert q.counts("expression") == {"queued": 2, "used": 3, "held_out": 1}
    used = q.items("expression", status="used")
    assert [i.id for i in used] == ids[:3] and {i.used_by_version for i in used} == {"7"}
    assert all(i.updated >= i.created for i in used)
    assert [i.id for i in q.queued("expression")] == ids[4:]
    assert len(q.items("expression")) == 6

    # More ids than one UPDATE takes (chunked, one transaction); unknown ids are ignored.
    q.mark([uuid.uuid4().hex for _ in range(1200)] + ids[4:], "used", used_by_version="8")
    assert q.counts("expression") == {"queued": 0, "used": 5, "held_out": 1}
    q.mark([ids[0]], "queued")  # back in the queue; used_by_version cleared
    assert q.get(ids[0]).status == "queued" and q.get(ids[0]).used_by_version is None


def test_oldest_queued_age(backend):
    q = backend.open()
    assert q.oldest_queued_age("expression") is None
    first, _ = q.add(task="expression", label="happy", embedding=None, backbone_version=None)
    time.sleep(0.25)
    q.add(task="expression", label="sad", embedding=None, backbone_version=None)
    age = q.oldest_queued_age("expression")
    assert 0.25 <= age < 10
    q.mark([first], "used", "1")
    assert q.oldest_queued_age("expression") < 0.25
    q.mark([i.id for i in q.queued("expression")], "held_out")
    assert q.oldest_queued_age("expression") is None


def test_set_embedding(backend):
    q = backend.open()
    fid, _ = q.add(task="expression", label="happy", embedding=vec(1, 64), backbone_version="1", image=b"img")
    new = vec(2, 128)
    q.set_embedding(fid, new, "2")
    item = q.get(fid)
    assert np.array_equal(item.embedding, new) and item.embedding.shape == (128,)
    assert item.backbone_version == "2" and item.status == "queued" and item.image == b"img"
    with pytest.raises(KeyError):
        q.set_embedding("missing", new, "2")


def test_table_prefix_keeps_queues_apart(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = FeedbackQueue(url, table_prefix="a_"), FeedbackQueue(url, table_prefix="b_")
    a.add(task="t", label="x", embedding=None, backbone_version=None)
    assert (a.depth("t"), b.depth("t")) == (1, 0)
    assert {"a_feedback", "b_feedback", "a_leases"} <= set(sa.inspect(a.engine).get_table_names())
    a.close(), b.close()


def test_sqlite_pragmas(sqlite_queue):
    q = sqlite_queue
    q.add(task="t", label="x", embedding=None, backbone_version=None)  # a durable write
    with q.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


# ---- predictions ----------------------------------------------------------------------------------

def test_predictions_record_get_prune(backend):
    q = backend.open()
    e = vec(3)
    q.record_prediction(prediction_id="p-old", task="expression", label="happy", embedding=e,
                        backbone_version="1", head_version="4", image=b"jpeg")
    time.sleep(0.3)
    q.record_prediction(prediction_id="p-new", task="expression", label="sad", embedding=vec(4),
                        backbone_version="1", head_version="4")

    got = backend.open().get_prediction("p-old")  # another worker's view
    assert {"task", "label", "embedding", "backbone_version", "head_version", "image", "created"} <= set(got)
    assert (got["task"], got["label"], got["backbone_version"], got["head_version"], got["image"]) == (
        "expression", "happy", "1", "4", b"jpeg")
    assert got["embedding"].dtype == np.float32 and np.array_equal(got["embedding"], e)
    assert time.time() - got["created"] < 10
    assert q.get_prediction("p-new")["image"] is None
    assert q.get_prediction("unknown") is None

    assert q.prune_predictions(3600) == 0
    assert q.prune_predictions(0.15) == 1  # only p-old is older than that
    assert q.get_prediction("p-old") is None and q.get_prediction("p-new") is not None

    # Recording the same id again replaces it.
    q.record_prediction(prediction_id="p-new", task="expression", label="surprise", embedding=e,
                        backbone_version="2", head_version="5")
    assert q.get_prediction("p-new")["label"] == "surprise"


# ---- lease ----------------------------------------------------------------------------------------

def test_lease_exclusive_renew_expire_release(backend):
    a, b = backend.open(), backend.open()  # two processes' worth of queues
    assert a.lease_holder("updater") is None
    assert a.try_acquire_lease("updater", "worker-a", ttl_s=0.6)
    assert not b.try_acquire_lease("updater", "worker-b", ttl_s=0.6)
    assert b.lease_holder("updater") == "worker-a"
    assert a.try_acquire_lease("updater", "worker-a", ttl_s=0.6)  # renewal
    assert b.try_acquire_lease("other-lease", "worker-b", ttl_s=5)  # leases are independent

    b.release_lease("updater", "worker-b")  # not b's: nothing happens
    assert a.lease_holder("updater") == "worker-a"

    time.sleep(0.8)  # a stops renewing: the lease expires
    assert a.lease_holder("updater") is None
    assert b.try_acquire_lease("updater", "worker-b", ttl_s=5)
    assert not a.try_acquire_lease("updater", "worker-a", ttl_s=5)
    assert a.lease_holder("updater") == "worker-b"

    b.release_lease("updater", "worker-b")
    assert a.lease_holder("updater") is None
    assert a.try_acquire_lease("updater", "worker-a", ttl_s=5)


LEASE_CHILD = r"""
import json, sys
from online.queue import FeedbackQueue
url, kwargs, holder = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
q = FeedbackQueue(url, **kwargs)
q.lease_holder("updater")  # connected
""" + WAIT_FOR_GO + r"""
print(json.dumps([q.try_acquire_lease("updater", holder, 30.0) for _ in range(3)]), flush=True)
"""


def test_lease_race_between_processes(backend, tmp_path):
    """Six processes try for the same free lease at the same instant: exactly one holds it."""
    backend.open()  # tables exist before the race, so it is only about the lease
    holders = [f"worker-{i}" for i in range(6)]
    results = run_children([backend.child_argv(LEASE_CHILD, h) for h in holders], tmp_path / "go")
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    outcomes = {h: json.loads(r.stdout) for h, r in zip(holders, results)}
    winners = [h for h, got in outcomes.items() if any(got)]
    assert len(winners) == 1, outcomes
    assert outcomes[winners[0]] == [True, True, True]  # the winner keeps renewing
    assert backend.open().lease_holder("updater") == winners[0]


# ---- durability and concurrency ---------------------------------------------------------------------

KILL_CHILD = r"""
import json, os, signal, sys
import numpy as np
from online.queue import FeedbackQueue
url, kwargs, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
q = FeedbackQueue(url, **kwargs)
i = 0
while True:
    fid, _ = q.add(task="expression", label="happy", embedding=np.full(16, i, np.float32), backbone_version="1",
                   image=bytes([i % 256]) * 100, idempotency_key=f"k{i}")
    print(fid, flush=True)  # acknowledged
    i += 1
    if mode == "self" and i == 20:
        os.kill(os.getpid(), signal.SIGKILL)  # right after add() returned, no cleanup of any kind
"""


@pytest.mark.parametrize("killer", ["self", "parent"])
def test_acknowledged_items_survive_sigkill(backend, killer):
    """A child adds items and dies by SIGKILL right after an add() returned; every acknowledged item is there."""
    proc = subprocess.Popen(backend.child_argv(KILL_CHILD, killer), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        for line in proc.stdout:
            acknowledged.append(line.strip())
            if killer == "parent" and len(acknowledged) == 30:
                proc.send_signal(signal.SIGKILL)  # while it is busy adding the next one
                break
        proc.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert len(acknowledged) >= 20

    q = backend.open()  # a new process' view of the store
    stored = {i.id: i for i in q.items("expression")}
    assert set(acknowledged) <= set(stored)
    assert len(stored) - len(acknowledged) <= 1  # at most the one in flight, committed but not printed
    for n, fid in enumerate(acknowledged):
        assert np.array_equal(stored[fid].embedding, np.full(16, n, np.float32))
        assert stored[fid].image == bytes([n % 256]) * 100


WRITER_CHILD = r"""
import json, sys
import numpy as np
from online.queue import FeedbackQueue
url, kwargs, worker, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
""" + WAIT_FOR_GO + r"""
q = FeedbackQueue(url, **kwargs)  # all children create the tables of an empty database at once
ids = []
for i in range(n):
    ids.append(q.add(task="expression", label=f"w{worker}", embedding=np.full(8, i, np.float32),
                     backbone_version="1")[0])
    if i == n // 2:
        shared = q.add(task="expression", label="shared", embedding=None, backbone_version=None,
                       idempotency_key="same-request")[0]
print(json.dumps({"ids": ids, "shared": shared}), flush=True)
"""


def test_concurrent_writers_lose_nothing(backend, tmp_path):
    """4 processes x 50 adds at once, on a database none of them has created yet: all 200 are stored."""
    workers, n = 4, 50
    results = run_children([backend.child_argv(WRITER_CHILD, str(w), str(n)) for w in range(workers)], tmp_path / "go")
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    reports = [json.loads(r.stdout) for r in results]
    acknowledged = [fid for rep in reports for fid in rep["ids"]]
    assert len(set(acknowledged)) == workers * n

    q = backend.open()
    items = q.items("expression")
    assert len({rep["shared"] for rep in reports}) == 1  # one idempotency key, one item, whoever won
    assert len(items) == workers * n + 1
    assert set(acknowledged) | {reports[0]["shared"]} == {i.id for i in items}
    assert q.counts("expression")["queued"] == workers * n + 1
    for w in range(workers):
        mine = [i for i in items if i.label == f"w{w}"]  # each writer's items, in its own order
        assert [int(i.embedding[0]) for i in mine] == list(range(n))


def test_threads_share_one_queue(backend):
    q = backend.open()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(15):
                q.add(task="expression", label=f"t{t}", embedding=vec(i, 8), backbone_version="1")
                q.depth("expression")
            q.try_acquire_lease("updater", f"thread-{t}", ttl_s=30)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert q.depth("expression") == 90
    assert q.lease_holder("updater").startswith("thread-")
