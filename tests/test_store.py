"""store/ (feedback, predictions, lease) against real databases: a SQLite file in tmp_path and a real PostgreSQL.

PostgreSQL comes from ``TEST_POSTGRES_URL`` (default ``postgresql://root@127.0.0.1:5432/test``).
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

from store import FeedbackItem, IdempotencyConflict, Stores, UnknownPrediction
from store.schema import STATUSES
from testkit.scaleout import PG_URL, postgres_error as check_postgres

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 60


# ---- backends -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_error() -> str | None:
    """None if PostgreSQL answers, else why not (checked once per session)."""
    return check_postgres(PG_URL)


@dataclass
class Backend:
    name: str
    url: str
    kwargs: dict = field(default_factory=dict)
    opened: list[Stores] = field(default_factory=list)

    def open(self) -> Stores:
        q = Stores.open(self.url, **self.kwargs)
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
            q.db.close()
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
        q.db.close()
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_queue(tmp_path):
    q = Stores.open(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield q
    q.db.close()


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
    fid, dup = q.feedback.add(task="expression", label="happy", embedding=e, backbone_version="3", image=b"\x89PNG\x00\xff",
                     prediction_id="p1", predicted_label="sad")
    bare, _ = q.feedback.add(task="expression", label="sad", embedding=None, backbone_version=None)  # image None: privacy
    after = time.time()
    assert dup is False and len(fid) == 32 and uuid.UUID(hex=fid).version == 4

    # A second queue object (as another worker would) sees the committed rows.
    items = backend.open().feedback.queued("expression")
    assert [i.id for i in items] == [fid, bare]
    first = items[0]
    assert isinstance(first, FeedbackItem)
    assert first.embedding.dtype == np.float32 and np.array_equal(first.embedding, e)
    assert first.embedding.tobytes() == e.tobytes()  # bit-exact
    assert (first.task, first.label, first.status, first.backbone_version) == ("expression", "happy", "queued", "3")
    assert (first.image, first.prediction_id, first.predicted_label) == (b"\x89PNG\x00\xff", "p1", "sad")
    assert before <= first.created == first.updated <= after and first.used_by_version is None
    assert items[1].embedding is None and items[1].image is None and items[1].backbone_version is None

    assert q.feedback.get(fid).label == "happy" and q.feedback.get("nope") is None
    assert q.feedback.get(fid, include_image=False).image is None
    assert [i.image for i in q.feedback.items("expression", include_images=False)] == [None, None]
    assert q.feedback.items("other-task") == [] and q.feedback.depth("other-task") == 0

    # float64 in, float32 out; the embedding is writable (a copy, not a view of the row).
    f64, _ = q.feedback.add(task="expression", label="happy", embedding=np.linspace(0, 1, 8), backbone_version="3")
    got = q.feedback.get(f64).embedding
    assert got.dtype == np.float32 and np.array_equal(got, np.linspace(0, 1, 8).astype(np.float32))
    got[0] = 5.0


def test_validation(sqlite_queue):
    q = sqlite_queue
    with pytest.raises(ValueError, match="1-D"):
        q.feedback.add(task="t", label="a", embedding=np.zeros((2, 3)), backbone_version="1")
    with pytest.raises(ValueError, match="NaN"):
        q.feedback.add(task="t", label="a", embedding=np.array([1.0, np.nan]), backbone_version="1")
    with pytest.raises(ValueError, match="backbone_version"):
        q.feedback.add(task="t", label="a", embedding=vec(1), backbone_version=None)
    with pytest.raises(ValueError, match="label"):
        q.feedback.add(task="t", label="", embedding=None, backbone_version=None)
    with pytest.raises(TypeError, match="image"):
        q.feedback.add(task="t", label="a", embedding=None, backbone_version=None, image="not bytes")
    for bad in (lambda: q.feedback.mark(["x"], "done"), lambda: q.feedback.items("t", status="done")):
        with pytest.raises(ValueError) as info:
            bad()
        assert all(repr(s) in str(info.value) for s in STATUSES)
    with pytest.raises(ValueError, match="ttl_s"):
        q.lease.try_acquire("updater", "a", 0)
    assert q.feedback.depth("t") == 0
    with pytest.raises(ValueError, match="schema"):
        Stores.open(f"sqlite:///{q.db.url.database}", schema="x")
    with pytest.raises(ValueError, match="table_prefix"):
        Stores.open(f"sqlite:///{q.db.url.database}", table_prefix="bad-prefix;")


def test_idempotency_key(backend):
    q = backend.open()
    a, dup_a = q.feedback.add(task="expression", label="happy", embedding=vec(1), backbone_version="1", image=b"img",
                              idempotency_key="req-1")
    b, dup_b = q.feedback.add(task="expression", label="happy", embedding=vec(1), backbone_version="1", image=b"img",
                              idempotency_key="req-1")
    assert (dup_a, dup_b) == (False, True) and a == b  # a retry: acknowledged once
    for label, image in (("sad", b"img"), ("happy", b"another image")):  # the same key for other feedback
        with pytest.raises(IdempotencyConflict):
            q.feedback.add(task="expression", label=label, embedding=vec(2), backbone_version="1", image=image, idempotency_key="req-1")
    assert q.feedback.get(a).label == "happy"  # nothing new stored
    other, dup = q.feedback.add(task="other", label="happy", embedding=None, backbone_version=None, idempotency_key="req-1")
    assert other != a and dup is False  # keys are per task
    x, _ = q.feedback.add(task="expression", label="happy", embedding=None, backbone_version=None)
    y, _ = q.feedback.add(task="expression", label="happy", embedding=None, backbone_version=None)
    assert x != y  # no key: never deduplicated
    assert q.feedback.depth("expression") == 3 and q.feedback.depth("other") == 1


def test_depth_counts_mark(backend):
    q = backend.open()
    assert q.feedback.depth("expression") == 0 and q.feedback.counts("expression") == {"queued": 0, "used": 0, "held_out": 0}
    ids = [q.feedback.add(task="expression", label="happy", embedding=vec(i), backbone_version="1")[0] for i in range(6)]
    assert [i.id for i in q.feedback.queued("expression")] == ids  # oldest first
    assert [i.id for i in q.feedback.queued("expression", limit=2)] == ids[:2]

    q.feedback.mark(ids[:3], "used", used_by_version="7")
    q.feedback.mark([ids[3]], "held_out")
    q.feedback.mark([], "used")  # no-op
    assert q.feedback.depth("expression") == 2
    assert q.feedback.counts("expression") == {"queued": 2, "used": 3, "held_out": 1}
    used = q.feedback.items("expression", status="used")
    assert [i.id for i in used] == ids[:3] and {i.used_by_version for i in used} == {"7"}
    assert all(i.updated >= i.created for i in used)
    assert [i.id for i in q.feedback.queued("expression")] == ids[4:]
    assert len(q.feedback.items("expression")) == 6

    # More ids than one UPDATE takes (chunked, one transaction); unknown ids are ignored.
    q.feedback.mark([uuid.uuid4().hex for _ in range(1200)] + ids[4:], "used", used_by_version="8")
    assert q.feedback.counts("expression") == {"queued": 0, "used": 5, "held_out": 1}
    q.feedback.mark([ids[0]], "queued")  # back in the queue; used_by_version cleared
    assert q.feedback.get(ids[0]).status == "queued" and q.feedback.get(ids[0]).used_by_version is None


def test_oldest_queued_age(backend):
    q = backend.open()
    assert q.feedback.oldest_queued_age("expression") is None
    first, _ = q.feedback.add(task="expression", label="happy", embedding=None, backbone_version=None)
    time.sleep(0.25)
    q.feedback.add(task="expression", label="sad", embedding=None, backbone_version=None)
    age = q.feedback.oldest_queued_age("expression")
    assert 0.25 <= age < 10
    q.feedback.mark([first], "used", "1")
    assert q.feedback.oldest_queued_age("expression") < 0.25
    q.feedback.mark([i.id for i in q.feedback.queued("expression")], "held_out")
    assert q.feedback.oldest_queued_age("expression") is None


def test_set_embedding(backend):
    q = backend.open()
    fid, _ = q.feedback.add(task="expression", label="happy", embedding=vec(1, 64), backbone_version="1", image=b"img")
    new = vec(2, 128)
    q.feedback.set_embedding(fid, new, "2")
    item = q.feedback.get(fid)
    assert np.array_equal(item.embedding, new) and item.embedding.shape == (128,)
    assert item.backbone_version == "2" and item.status == "queued" and item.image == b"img"
    with pytest.raises(KeyError):
        q.feedback.set_embedding("missing", new, "2")


def test_table_prefix_keeps_queues_apart(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = Stores.open(url, table_prefix="a_"), Stores.open(url, table_prefix="b_")
    a.feedback.add(task="t", label="x", embedding=None, backbone_version=None)
    assert (a.feedback.depth("t"), b.feedback.depth("t")) == (1, 0)
    assert {"a_feedback", "b_feedback", "a_leases"} <= set(sa.inspect(a.db.engine).get_table_names())
    a.db.close(), b.db.close()


def test_sqlite_pragmas(sqlite_queue):
    q = sqlite_queue
    q.feedback.add(task="t", label="x", embedding=None, backbone_version=None)  # a durable write
    with q.db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


# ---- predictions ----------------------------------------------------------------------------------

def test_predictions_record_get_prune(backend):
    q = backend.open()
    e = vec(3)
    q.predictions.record([dict(prediction_id="p-old", task="expression", label="happy", embedding=e,
                        backbone_version="1", head_version="4", image=b"jpeg")])
    time.sleep(0.3)
    q.predictions.record([dict(prediction_id="p-new", task="expression", label="sad", embedding=vec(4),
                        backbone_version="1", head_version="4")])

    got = backend.open().predictions.get("p-old")  # another worker's view
    assert {"task", "label", "embedding", "backbone_version", "head_version", "image", "created"} <= set(got)
    assert (got["task"], got["label"], got["backbone_version"], got["head_version"], got["image"]) == (
        "expression", "happy", "1", "4", b"jpeg")
    assert got["embedding"].dtype == np.float32 and np.array_equal(got["embedding"], e)
    assert time.time() - got["created"] < 10
    assert q.predictions.get("p-new")["image"] is None
    assert q.predictions.get("unknown") is None

    assert q.predictions.prune(3600) == 0
    assert q.predictions.prune(0.15) == 1  # only p-old is older than that
    assert q.predictions.get("p-old") is None and q.predictions.get("p-new") is not None

    # Recording the same id again replaces it.
    q.predictions.record([dict(prediction_id="p-new", task="expression", label="surprise", embedding=e,
                        backbone_version="2", head_version="5")])
    assert q.predictions.get("p-new")["label"] == "surprise"


def test_feedback_by_prediction_copies_it_inside_the_database(backend):
    q = backend.open()
    e = vec(7)
    q.predictions.record([dict(prediction_id="p1", task="expression", label="happy", embedding=e, backbone_version="3",
                               head_version="9", image=b"crop-png", confidence=0.6, margin=0.2)])
    fid, dup = q.feedback.add_from_prediction("p1", label="sad", task="expression", idempotency_key="k1")
    item = q.feedback.get(fid)
    assert not dup and (item.label, item.predicted_label, item.prediction_id, item.backbone_version, item.image) == (
        "sad", "happy", "p1", "3", b"crop-png")
    np.testing.assert_array_equal(item.embedding, e)
    # A retry is acknowledged once; the same key for a different label is a conflict, not a duplicate.
    assert q.feedback.add_from_prediction("p1", label="sad", task="expression", idempotency_key="k1") == (fid, True)
    with pytest.raises(IdempotencyConflict) as conflict:
        q.feedback.add_from_prediction("p1", label="angry", task="expression", idempotency_key="k1")
    assert conflict.value.feedback_id == fid and conflict.value.stored_label == "sad"
    assert q.feedback.get(fid).label == "sad" and q.feedback.depth("expression") == 1
    # Unknown, or of another task: nothing stored.
    for pid, task in (("nope", "expression"), ("p1", "mouth")):
        with pytest.raises(UnknownPrediction):
            q.feedback.add_from_prediction(pid, label="sad", task=task)
    # Without images kept, only the embedding is copied.
    fid2, _ = q.feedback.add_from_prediction("p1", label="sad", task="expression", keep_image=False)
    assert q.feedback.get(fid2).image is None and q.feedback.get(fid2).embedding is not None
    # Deleting removes the items and their images.
    assert q.feedback.delete_for_prediction("p1") == 2 and q.feedback.get(fid) is None
    assert q.feedback.delete("nope") is False


def test_the_domain_travels_from_prediction_to_feedback(backend):
    q = backend.open()
    q.predictions.record([dict(prediction_id="p1", task="expression", label="happy", embedding=vec(1), backbone_version="3",
                               head_version="9", domain="infant")])
    by_id, _ = q.feedback.add_from_prediction("p1", label="sad", task="expression")
    named, _ = q.feedback.add_from_prediction("p1", label="sad", task="expression", domain="nicu-2")
    by_image, _ = q.feedback.add(task="expression", label="fear", embedding=vec(2), backbone_version="3", domain="infant")
    plain, _ = q.feedback.add(task="expression", label="fear", embedding=vec(3), backbone_version="3")
    assert [q.feedback.get(i).domain for i in (by_id, named, by_image, plain)] == ["infant", "nicu-2", "infant", None]
    assert [i.domain for i in q.feedback.items("expression", include_images=False)] == ["infant", "nicu-2", "infant", None]
    with pytest.raises(ValueError, match="domain"):
        q.feedback.add(task="expression", label="fear", embedding=vec(4), backbone_version="3", domain="x" * 65)


def test_a_store_made_before_a_new_column_gains_it(backend):
    """Tables made by an earlier version (no `domain` column) get the column when the store opens;
    their rows are kept and read as having none."""
    first = backend.open()
    first.feedback.add(task="expression", label="sad", embedding=vec(1), backbone_version="3")
    first.db.close()
    engine = sa.create_engine(backend.url)
    schema = backend.kwargs.get("schema")
    with engine.begin() as conn:
        for table in ("feedback", "predictions"):
            conn.execute(sa.text(f'ALTER TABLE {f"{schema}." if schema else ""}{table} DROP COLUMN domain'))
    engine.dispose()
    again = backend.open()
    assert [i.domain for i in again.feedback.items("expression")] == [None]
    fid, _ = again.feedback.add(task="expression", label="sad", embedding=vec(2), backbone_version="3", domain="infant")
    assert again.feedback.get(fid).domain == "infant"


# ---- lease ----------------------------------------------------------------------------------------

def test_lease_exclusive_renew_expire_release(backend):
    a, b = backend.open(), backend.open()  # two processes' worth of queues
    assert a.lease.holder("updater") is None
    assert a.lease.try_acquire("updater", "worker-a", ttl_s=0.6)
    assert not b.lease.try_acquire("updater", "worker-b", ttl_s=0.6)
    assert b.lease.holder("updater") == "worker-a"
    assert a.lease.try_acquire("updater", "worker-a", ttl_s=0.6)  # renewal
    assert b.lease.try_acquire("other-lease", "worker-b", ttl_s=5)  # leases are independent

    b.lease.release("updater", "worker-b")  # not b's: nothing happens
    assert a.lease.holder("updater") == "worker-a"

    time.sleep(0.8)  # a stops renewing: the lease expires
    assert a.lease.holder("updater") is None
    assert b.lease.try_acquire("updater", "worker-b", ttl_s=5)
    assert not a.lease.try_acquire("updater", "worker-a", ttl_s=5)
    assert a.lease.holder("updater") == "worker-b"

    b.lease.release("updater", "worker-b")
    assert a.lease.holder("updater") is None
    assert a.lease.try_acquire("updater", "worker-a", ttl_s=5)


LEASE_CHILD = r"""
import json, sys
from store import Stores
url, kwargs, holder = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
q = Stores.open(url, **kwargs)
q.lease.holder("updater")  # connected
""" + WAIT_FOR_GO + r"""
print(json.dumps([q.lease.try_acquire("updater", holder, 30.0) for _ in range(3)]), flush=True)
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
    assert backend.open().lease.holder("updater") == winners[0]


# ---- durability and concurrency ---------------------------------------------------------------------

KILL_CHILD = r"""
import json, os, signal, sys
import numpy as np
from store import Stores
url, kwargs, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
q = Stores.open(url, **kwargs)
i = 0
while True:
    fid, _ = q.feedback.add(task="expression", label="happy", embedding=np.full(16, i, np.float32), backbone_version="1",
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
    stored = {i.id: i for i in q.feedback.items("expression")}
    assert set(acknowledged) <= set(stored)
    assert len(stored) - len(acknowledged) <= 1  # at most the one in flight, committed but not printed
    for n, fid in enumerate(acknowledged):
        assert np.array_equal(stored[fid].embedding, np.full(16, n, np.float32))
        assert stored[fid].image == bytes([n % 256]) * 100


WRITER_CHILD = r"""
import json, sys
import numpy as np
from store import Stores
url, kwargs, worker, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
""" + WAIT_FOR_GO + r"""
q = Stores.open(url, **kwargs)  # all children create the tables of an empty database at once
ids = []
for i in range(n):
    ids.append(q.feedback.add(task="expression", label=f"w{worker}", embedding=np.full(8, i, np.float32),
                     backbone_version="1")[0])
    if i == n // 2:
        shared = q.feedback.add(task="expression", label="shared", embedding=None, backbone_version=None,
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
    items = q.feedback.items("expression")
    assert len({rep["shared"] for rep in reports}) == 1  # one idempotency key, one item, whoever won
    assert len(items) == workers * n + 1
    assert set(acknowledged) | {reports[0]["shared"]} == {i.id for i in items}
    assert q.feedback.counts("expression")["queued"] == workers * n + 1
    for w in range(workers):
        mine = [i for i in items if i.label == f"w{w}"]  # each writer's items, in its own order
        assert [int(i.embedding[0]) for i in mine] == list(range(n))


def test_threads_share_one_queue(backend):
    q = backend.open()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(15):
                q.feedback.add(task="expression", label=f"t{t}", embedding=vec(i, 8), backbone_version="1")
                q.feedback.depth("expression")
            q.lease.try_acquire("updater", f"thread-{t}", ttl_s=30)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert q.feedback.depth("expression") == 90
    assert q.lease.holder("updater").startswith("thread-")
