"""Durability over a real `bentoml serve`: feedback acknowledged before a kill -9 is stored exactly once, and the
server's worker processes stop with it (issue 16, points 3 and 7).

Four clients stream feedback (by image, and by the prediction_id of a /predict made first), each item with its own
idempotency key, until the server's whole process group is killed with SIGKILL. A server restarted on the same
home then takes every unacknowledged item again and a sample of acknowledged ones: the acknowledged ones answer
``duplicate=true`` with their first feedback_id, and the store holds every key once.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
import sqlalchemy as sa

from infantino.settings import Settings
from store import Stores
from testkit.faces import faces
from testkit.registry import train_tiny_registry
from testkit.server import STILL_MODEL_ENV, BentoServer

pytestmark = pytest.mark.slow
LABELS = ["happy", "sad", "surprise"]
CLIENTS = 4
KILL_AFTER_S = 3.0
MIN_ACKED_BEFORE_KILL = 12  # a loaded machine answers slowly at first: kill only once items are being acknowledged
RETRY_ACKED_SAMPLE = 20
STOP_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("durability") / "home"
    train_tiny_registry(home, per_class=12, epochs=5)  # what the model learned does not matter here
    return home


def server_env(home, workers: int = 1) -> dict[str, str]:
    return {"INFANTINO_HOME": str(home), "INFANTINO_API_WORKERS": str(workers), "INFANTINO_MAX_IMAGE_BYTES": "300000",
            **STILL_MODEL_ENV}


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (a zombie no longer runs: orphans may wait for a reaper that never comes here)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"pid {p.pid} pgid {os.getpgid(p.pid)} ppid {p.ppid()}: {' '.join(p.cmdline())[:160]}")
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return out


def port_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (SO_REUSEADDR, as servers bind: TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def wait_until(check, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return check()


def kill_leftovers(procs: list[psutil.Process]) -> None:
    """Clean up processes this test started that outlived their server (each by its own pid)."""
    for p in alive(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# ---- the workers stop with their server -------------------------------------------------------------------------------

def start_two_workers(home, port: int | None = None, log_name: str = "serve-workers.log") -> tuple[BentoServer, list[psutil.Process]]:
    srv = BentoServer(server_env(home, workers=2), port=port, log_path=home.parent / log_name).start()
    procs = descendants(srv.proc.pid)
    return srv, procs


def test_workers_stop_when_the_server_gets_sigterm(registry_home):
    srv, procs = start_two_workers(registry_home)
    try:
        # Two API workers below the main process (and the backbone service's worker, with INFANTINO_BACKBONE_PLACEMENT=service).
        assert len(alive(procs)) >= 2, describe(procs)
        print("\nserver processes:\n  " + "\n  ".join(describe([psutil.Process(srv.proc.pid), *procs])))
        os.kill(srv.proc.pid, signal.SIGTERM)  # the main process only, as a supervisor would
        srv.proc.wait(STOP_TIMEOUT_S)
        assert wait_until(lambda: not alive(procs), STOP_TIMEOUT_S), f"left behind: {describe(alive(procs))}"
        assert wait_until(lambda: port_free(srv.port), 10), f"port {srv.port} still taken"
    finally:
        srv.stop()
        kill_leftovers(procs)
    # A new server starts on the same port.
    again, again_procs = start_two_workers(registry_home, port=srv.port, log_name="serve-workers-again.log")
    try:
        assert httpx.get(f"{again.url}/readyz", timeout=10).status_code == 200
    finally:
        again.stop()
        wait_until(lambda: not alive(again_procs), 10)
        kill_leftovers(again_procs)


def test_killing_the_process_group_leaves_nothing_listening(registry_home):
    srv, procs = start_two_workers(registry_home, log_name="serve-killpg.log")
    try:
        assert len(alive(procs)) >= 2, describe(procs)
        before = describe(procs)  # with each one's process group: circus starts every worker in a session of its own
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(STOP_TIMEOUT_S)
        assert wait_until(lambda: not alive(procs), STOP_TIMEOUT_S), \
            f"left behind by killpg({srv.proc.pid}): {describe(alive(procs))}; the server was {before}"
        assert wait_until(lambda: port_free(srv.port), 10), f"port {srv.port} still taken"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{srv.url}/readyz", timeout=5)
    finally:
        srv.stop()
        kill_leftovers(procs)


# ---- kill -9 while feedback streams in ------------------------------------------------------------------------------

@dataclass
class Item:
    """One feedback request: its body (JSON, or multipart with an image), sent again unchanged on retry."""

    key: str
    label: str
    kind: str  # "image" | "prediction"
    image: bytes | None = None
    prediction_id: str | None = None

    def post(self, client: httpx.Client, label: str | None = None) -> httpx.Response:
        label = label or self.label
        if self.kind == "image":
            return client.post("/feedback", data={"label": label, "idempotency_key": self.key},
                               files={"image": ("face.png", self.image, "image/png")})
        return client.post("/feedback", json={"label": label, "prediction_id": self.prediction_id, "idempotency_key": self.key})


@dataclass
class Stream:
    acked: dict[str, tuple[Item, str]] = field(default_factory=dict)  # key -> (item, feedback_id)
    unacked: dict[str, tuple[Item, str]] = field(default_factory=dict)  # key -> (item, what went wrong)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def stream_feedback(url: str, n: int, seed: int, stream: Stream, stop: threading.Event) -> None:
    rng = random.Random(seed)
    images = [png for png, _ in faces(4, seed=seed)]
    with httpx.Client(base_url=url, timeout=60) as client:
        i, last_prediction_id = 0, None
        while not stop.is_set():
            i += 1
            item = Item(key=f"c{n}-{i}-{uuid.uuid4().hex[:8]}", label=rng.choice(LABELS),
                        kind="prediction" if i % 2 else "image", image=rng.choice(images))
            if item.kind == "prediction":
                try:
                    r = client.post("/predict", files={"image": ("face.png", item.image, "image/png")})
                except httpx.TransportError:
                    continue  # no prediction, so no feedback to send: nothing to acknowledge
                if r.status_code != 200:
                    if r.status_code < 500:
                        with stream.lock:
                            stream.unexpected.append(f"/predict {r.status_code}: {r.text[:200]}")
                    continue
                item.prediction_id, item.image = r.json()["prediction_id"], None
                last_prediction_id = item.prediction_id
            try:
                r = item.post(client)
            except httpx.TransportError as exc:  # the server died with the request in flight, or before it
                with stream.lock:
                    stream.unacked[item.key] = (item, type(exc).__name__)
                # One more of the other kind, sent after the kill (on a prediction made before it): refused.
                late = Item(key=f"c{n}-late-{uuid.uuid4().hex[:8]}", label=rng.choice(LABELS),
                            kind="prediction" if item.kind == "image" else "image", image=rng.choice(images),
                            prediction_id=last_prediction_id)
                if late.kind == "image" or last_prediction_id:
                    try:
                        r = late.post(client)
                        with stream.lock:
                            stream.unexpected.append(f"a killed server answered {r.status_code}")
                    except httpx.TransportError as late_exc:
                        with stream.lock:
                            stream.unacked[late.key] = (late, type(late_exc).__name__)
                return  # the server is gone
            with stream.lock:
                if r.status_code == 200 and r.json().get("feedback_id"):
                    if r.json()["duplicate"]:
                        stream.unexpected.append(f"a new key answered as a duplicate: {r.text[:200]}")
                    stream.acked[item.key] = (item, r.json()["feedback_id"])
                else:
                    stream.unacked[item.key] = (item, f"HTTP {r.status_code}")
                    if r.status_code < 500:
                        stream.unexpected.append(f"/feedback {r.status_code}: {r.text[:200]}")


@pytest.fixture(scope="module")
def killed(registry_home):
    """Stream feedback from four clients and kill -9 the server's process group mid-stream: the Stream."""
    home = registry_home
    first = BentoServer(server_env(home), log_path=home.parent / "serve-killed.log").start()
    stream, stop = Stream(), threading.Event()
    threads = [threading.Thread(target=stream_feedback, args=(first.url, n, 100 + n, stream, stop), daemon=True)
               for n in range(CLIENTS)]
    procs: list[psutil.Process] = []
    try:
        for t in threads:
            t.start()
        time.sleep(KILL_AFTER_S)
        wait_until(lambda: len(stream.acked) >= MIN_ACKED_BEFORE_KILL, 120)
        # kill -9 every process of the server at once: its group, and the workers circus started in sessions of
        # their own (killing the group alone leaves them serving: test_killing_the_process_group_leaves_nothing_listening).
        procs = descendants(first.proc.pid)
        os.killpg(first.proc.pid, signal.SIGKILL)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        first.proc.wait(30)
        time.sleep(1.0)  # the clients keep posting to the dead server for a moment: refused, so unacknowledged
        stop.set()
        for t in threads:
            t.join(90)
    finally:
        stop.set()
        first.stop()
        wait_until(lambda: not alive(procs), 10)
        kill_leftovers(procs)
    assert not any(t.is_alive() for t in threads)
    return stream


@pytest.fixture(scope="module")
def server(registry_home, killed):
    """A server restarted on the killed one's home (its feedback store: $INFANTINO_HOME/feedback.db)."""
    with BentoServer(server_env(registry_home), log_path=registry_home.parent / "serve-restarted.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def retried(killed, client):
    """Every unacknowledged item and a sample of acknowledged ones, sent again unchanged: key -> answer."""
    sample = random.Random(0).sample(sorted(killed.acked), min(RETRY_ACKED_SAMPLE, len(killed.acked)))
    answers = {}
    for key in [*sorted(killed.unacked), *sample]:
        item = (killed.acked.get(key) or killed.unacked[key])[0]
        r = item.post(client)
        assert r.status_code == 200, (key, r.status_code, r.text[:300])
        answers[key] = r.json()
    return answers


def stored_by_key(home) -> dict[str, list[tuple[str, str]]]:
    """key -> [(feedback_id, label)] of every stored item with an idempotency key, read from the store itself."""
    url = Settings(home=home).storage.database_url
    assert url.endswith(str((home / "feedback.db").resolve()))
    stores = Stores.open(url)
    try:
        t = stores.db.tables.feedback
        with stores.db.tx() as conn:
            rows = conn.execute(sa.select(t.c.idempotency_key, t.c.id, t.c.label).where(t.c.idempotency_key.is_not(None))).all()
    finally:
        stores.db.close()
    out: dict[str, list[tuple[str, str]]] = {}
    for key, id_, label in rows:
        out.setdefault(key, []).append((id_, label))
    return out


def test_stream_was_killed_mid_flight(killed):
    acked, unacked = killed.acked, killed.unacked
    print(f"\nacknowledged {len(acked)} ({sum(i.kind == 'prediction' for i, _ in acked.values())} by prediction_id), "
          f"unacknowledged {len(unacked)} ({sum(i.kind == 'prediction' for i, _ in unacked.values())} by prediction_id): "
          f"{sorted({why for _, why in unacked.values()})}")
    assert not killed.unexpected, killed.unexpected[:5]
    assert len(acked) >= MIN_ACKED_BEFORE_KILL, "no feedback was acknowledged before the kill"
    assert {i.kind for i, _ in acked.values()} == {"image", "prediction"}
    assert {i.kind for i, _ in unacked.values()} == {"image", "prediction"}, "the kill interrupted no request"
    assert not set(acked) & set(unacked)


def test_retries_of_acknowledged_items_are_duplicates_with_the_same_id(killed, retried):
    for key, (item, feedback_id) in killed.acked.items():
        if key in retried:
            assert retried[key]["duplicate"] is True, (key, retried[key])
            assert retried[key]["feedback_id"] == feedback_id and retried[key]["label"] == item.label


def test_every_acknowledged_item_is_stored_exactly_once(registry_home, killed, retried):
    stored = stored_by_key(registry_home)
    duplicates = {key: rows for key, rows in stored.items() if len(rows) != 1}
    assert not duplicates, duplicates
    for key, (item, feedback_id) in killed.acked.items():
        assert stored.get(key) == [(feedback_id, item.label)], (key, stored.get(key), feedback_id)
    # Each unacknowledged item is stored once now: the one the server committed before it died, or the retry's.
    committed_before_kill = 0
    for key, (item, _) in killed.unacked.items():
        assert stored.get(key) == [(retried[key]["feedback_id"], item.label)], (key, stored.get(key), retried[key])
        committed_before_kill += retried[key]["duplicate"]
    print(f"\nunacknowledged but committed before the kill (retry answered duplicate): {committed_before_kill} "
          f"of {len(killed.unacked)}; stored keys {len(stored)}")
    assert set(stored) == set(killed.acked) | set(killed.unacked)


@pytest.mark.parametrize("kind", ["image", "prediction"])
def test_a_reused_key_with_other_content_is_a_409(registry_home, killed, retried, client, kind):
    key, (item, feedback_id) = next((k, v) for k, v in sorted(killed.acked.items()) if v[0].kind == kind)
    other = next(label for label in LABELS if label != item.label)
    r = item.post(client, label=other)
    assert r.status_code == 409, (r.status_code, r.text[:300])
    body = r.json()
    assert body["error"] == "idempotency_conflict" and feedback_id in body["message"], body
    assert stored_by_key(registry_home)[key] == [(feedback_id, item.label)]  # the first item stands, unchanged
    # ... and the same key with the same content is still its duplicate.
    again = item.post(client).json()
    assert again["duplicate"] is True and again["feedback_id"] == feedback_id
