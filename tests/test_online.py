"""Online updates end to end: feedback over HTTP -> partial_fit -> gate -> new version served."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from infantino.settings import Settings
from store import Stores
from registry.store import ModelRegistry
from testkit.faces import faces
from testkit.registry import train_tiny_registry
from testkit.server import PROJECT_ROOT, BentoServer

pytestmark = pytest.mark.slow
TOKEN = "online-test-token"
# One item of the 45 validation faces (2.2 points): the tiny validation set cannot resolve the default
# 1 point. It was 0.05 (two items): a consistent poison that cost two validation items then passed the
# gate, whose only defence against consistent poison is this allowance (cross-fitted feedback agrees with itself).
ALLOWED_DROP = 0.025


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("online") / "home"
    train_tiny_registry(home, per_class=60)
    return home


@pytest.fixture(scope="module")
def server(home):
    env = {"INFANTINO_HOME": str(home), "INFANTINO_API_WORKERS": "2", "INFANTINO_MODEL_POLL_S": "0.5",
           "INFANTINO_UPDATE_MIN_ITEMS": "36", "INFANTINO_UPDATE_INTERVAL_S": "100000", "INFANTINO_ADMIN_TOKEN": TOKEN,
           "INFANTINO_GATE_MAX_VAL_DROP": str(ALLOWED_DROP),
           # the drawn faces are an easy problem: a bolder step than the production default
           "INFANTINO_UPDATE_LEARNING_RATE": "1e-3", "INFANTINO_UPDATE_PASSES": "20", "INFANTINO_UPDATE_REPLAY_RATIO": "1"}
    with BentoServer(env, log_path=home.parent / "serve.log") as srv:
        yield srv


def registry_for(home) -> ModelRegistry:
    return ModelRegistry(Settings(home=home))


def accuracy(client: httpx.Client, items) -> tuple[float, set[str]]:
    r = client.post("/predict_batch", json={"images_base64": [base64.b64encode(b).decode() for b, _ in items]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    return float(np.mean([p["label"] == label for p, (_, label) in zip(preds, items)])), {p["head_version"] for p in preds}


def post_feedback(client, items, labels=None):
    for (img, label), given in zip(items, labels or [lbl for _, lbl in items]):
        r = client.post("/feedback", json={"label": given, "image_base64": base64.b64encode(img).decode()})
        assert r.status_code == 200, r.text


def wait_for_version_after(registry: ModelRegistry, version: int, timeout_s: float = 90) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        newer = [v for v in registry.list_versions("head") if int(v["version"]) > version and v["aliases"]]
        if newer:
            return newer[-1]
        time.sleep(0.3)
    raise AssertionError(f"no head version after v{version} within {timeout_s}s")


def test_shifted_domain_feedback_is_learned(server, home):
    registry = registry_for(home)
    test_set = faces(12, seed=100, shifted=True)  # under-exposed faces: never seen in training
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before, versions = accuracy(client, test_set)
        assert versions == {"1"}
        stream = faces(24, seed=7, shifted=True)
        np.random.default_rng(0).shuffle(stream)  # users correct whatever comes, not class by class
        # Meanwhile, predictions keep flowing: none may fail while models are swapped.
        in_flight: list[int] = []
        stop = threading.Event()

        def keep_predicting():
            with httpx.Client(base_url=server.url, timeout=60) as c:
                while not stop.is_set():
                    in_flight.append(c.post("/predict", json={"image_base64": base64.b64encode(test_set[0][0]).decode()}).status_code)

        hammer = threading.Thread(target=keep_predicting)
        hammer.start()
        post_feedback(client, stream)  # 72 items: two triggers of 36
        # The trigger takes whatever is queued when it fires; leftovers below the threshold
        # are run on demand, as an operator would (POST /admin/update; 409 while one runs).
        deadline = time.time() + 90
        while client.get("/model").json()["queue"]["queued"]:
            assert time.time() < deadline, "the queue was not drained by the updater"
            client.post("/admin/update", json={"force": True}, headers={"Authorization": f"Bearer {TOKEN}"})
            time.sleep(0.3)
        champion = registry.champion_version("head")
        assert int(champion) > 1, [v["tags"].get("gate") for v in registry.list_versions("head")]
        # Every worker follows: poll until all answers name the new champion.
        deadline = time.time() + 10
        while time.time() < deadline:
            after, versions = accuracy(client, test_set)
            if versions == {registry.champion_version("head")}:
                break
            time.sleep(0.5)
        assert versions == {registry.champion_version("head")}
        stop.set()
        hammer.join()
        assert in_flight and set(in_flight) == {200}, sorted(set(in_flight))
        # Rollback: every worker follows the alias back.
        promoted = registry.champion_version("head")
        previous = registry.rollback("head")
        deadline = time.time() + 10
        while accuracy(client, test_set[:3])[1] != {previous} and time.time() < deadline:
            time.sleep(0.3)
        assert accuracy(client, test_set[:3])[1] == {previous}
        registry.promote("head", promoted)
    assert after > before, (before, after)
    # What the gate promised: original validation accuracy fell at most the allowance.
    champion = registry.load_head("champion")
    _, validation = registry.load_embeddings(champion)
    old = registry.load_head("1")
    val_before = np.mean(old.model.predict(validation.x) == validation.y)
    val_after = np.mean(champion.model.predict(validation.x) == validation.y)
    assert val_after >= val_before - ALLOWED_DROP - 1e-9, (val_before, val_after)
    assert champion.tags["origin"] == "online_update" and champion.tags["parent_version"]
    assert int(champion.tags["unproven_promotions"]) <= Settings().online.gate_max_unproven_promotions  # the bound's count travels


@pytest.mark.parametrize("poison", ["systematic", "random"])
def test_poisoned_feedback_is_rejected(server, home, poison):
    registry = registry_for(home)
    champion_before = registry.champion_version("head")
    latest = max(int(v["version"]) for v in registry.list_versions("head"))
    items = faces(12, seed=300 if poison == "systematic" else 301)  # the original domain: 36 items, one trigger
    np.random.default_rng(1).shuffle(items)
    names = ["happy", "sad", "surprise"]
    if poison == "systematic":
        labels = [names[(names.index(lbl) + 1) % 3] for _, lbl in items]
    else:
        labels = list(np.random.default_rng(0).choice(names, len(items)))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        post_feedback(client, items, labels)
    version = wait_for_version_after(registry, latest)
    assert version["aliases"] == ["challenger"], version
    assert version["tags"]["gate_reason"].startswith("rejected")
    assert registry.champion_version("head") == champion_before


def test_killing_the_updater_loses_nothing(home, tmp_path):
    """`infantino update` killed at several points: no feedback lost, no half-promoted version."""
    reg_home = tmp_path / "kill"
    import shutil

    shutil.copytree(home, reg_home, ignore=shutil.ignore_patterns("feedback.db*"))
    registry = registry_for(reg_home)
    head = registry.load_head("champion")
    _, validation = registry.load_embeddings(head)
    queue = Stores.open(Settings(home=reg_home).storage.database_url).feedback
    classes = head.classes
    ids = [queue.add(task="expression", label=classes[int(y)], embedding=x, backbone_version=head.backbone_version)[0]
           for x, y in zip(validation.x[:40], validation.y[:40])]
    # A short lease, so the lease a killed updater leaves behind expires quickly.
    env = {**os.environ, "INFANTINO_HOME": str(reg_home), "INFANTINO_GATE_MAX_VAL_DROP": "1.0", "INFANTINO_LEASE_TTL_S": "2"}
    cmd = [sys.executable, "-m", "cli.main", "update", "--force"]

    def invariants():
        statuses = [queue.get(i, include_image=False).status for i in ids]
        assert len(statuses) == len(ids) and set(statuses) <= {"queued", "used", "held_out"}
        champion = registry.champion_version("head")
        registry.load_head(champion)  # the champion is always a complete, loadable version
        for v in registry.list_versions("head"):
            if v["version"] == champion:
                assert v["tags"].get("label_set")

    for delay in (3.0, 4.5, 5.5, 6.5, 7.5):
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        invariants()
        if queue.depth("expression") == 0:
            break
    # The lease a killed updater held expires; a forced run afterwards finishes the job.
    if queue.depth("expression"):
        time.sleep(2.1)
        out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
    invariants()
    assert queue.depth("expression") == 0
    assert sum(queue.counts("expression").values()) == len(ids)


def test_feedback_naming_a_domain_teaches_that_domains_class_mix(home, tmp_path):
    """The updater hands each item's domain to the head: the new version answers requests naming the
    domain with its class mix (heads/domain.py), and others as the same head taught without domains."""
    import shutil

    from heads import predict_proba
    from online.updater import Updater

    reg_home = tmp_path / "domain"
    shutil.copytree(home, reg_home, ignore=shutil.ignore_patterns("feedback.db*"))
    settings = Settings(home=reg_home, online={"gate_max_val_drop": 1.0, "update_domain_priors": True,  # off by default
                                                 "update_domain_memory": 0})  # on by default; the mix alone here
    registry = ModelRegistry(settings)
    head = registry.load_head("champion")
    _, validation = registry.load_embeddings(head)
    stores = Stores.open(settings.storage.database_url)
    # The ward's mix: mostly the first class.
    pick = np.concatenate([np.flatnonzero(validation.y == 0)[:12], np.flatnonzero(validation.y != 0)[:4]])
    for x, y in zip(validation.x[pick], validation.y[pick]):
        stores.feedback.add(task="expression", label=head.classes[int(y)], embedding=x, backbone_version=head.backbone_version,
                            domain="ward")
    report = Updater(settings.online, registry, stores.feedback, stores.lease).run_once(force=True)
    assert report is not None and report.feedback_items == len(pick)
    taught = registry.load_head(report.head_version).model
    assert list(taught.domain_priors_.ratios_) == ["ward"] and taught.domain_priors_.ratios_["ward"].argmax() == 0
    probe = validation.x[:30]
    plain, ward = predict_proba(taught, probe), predict_proba(taught, probe, "ward")
    assert (ward[:, 1:].sum(1) < plain[:, 1:].sum(1)).all()  # every answer moved toward the first class
    np.testing.assert_allclose(plain, predict_proba(taught, probe, "another-ward"))
    stores.db.close()


@pytest.mark.slow
@pytest.mark.parametrize("champion_proven", [True, False])
def test_rule_c_weighs_every_item_since_the_last_proven_version(tmp_path, champion_proven):
    """The gate's bound on unproven promotions (online/gate.py, rule c) compares a candidate with the
    lineage's last proven version on every item that version was not taught: after an unproven
    promotion the evidence is both batches since the proof, not the newest batch alone."""
    from online.updater import PROVEN_TAG, Updater
    from registry.embedder import torch_embedder

    home = tmp_path / "home"
    registry = train_tiny_registry(home, epochs=3)
    settings = Settings(home=home, gate_max_val_drop=1.0, gate_min_items=6, gate_alpha=1.0, gate_worse_alpha=1e-9,
                        gate_max_unproven_promotions=5)
    stores = Stores.open(settings.storage.database_url)
    embed = torch_embedder(registry)
    updater = Updater(settings.online, registry, stores.feedback, stores.lease, embed=embed)

    def add(seed: int) -> int:
        batch = faces(3, seed=seed)
        for img, label in batch:
            stores.feedback.add(task="expression", label=label, embedding=embed([img], "1")[0], backbone_version="1", image=img)
        return len(batch)

    first_batch = add(seed=1)
    first = updater.run_once(force=True)
    assert first.promoted, first.verdict  # against the root: (b) is the comparison, and v2 is proven
    assert PROVEN_TAG not in registry.version_info("head", first.head_version).tags
    if not champion_proven:  # as if v2's promotion had shown no gain over the root: the root stays the reference
        registry.tag_version("head", first.head_version, {PROVEN_TAG: "1", "unproven_promotions": "1"})
    second_batch = add(seed=2)
    second = updater.run_once(force=True)
    # Against v2 (proven): the items v2 was not taught; against the root: every item, both batches.
    expected = second_batch if champion_proven else first_batch + second_batch
    assert second.metrics["champion_unseen_items"] == expected, second.metrics
    if second.promoted and second.metrics["unproven_promotions"]:
        assert registry.version_info("head", second.head_version).tags[PROVEN_TAG] == ("2" if champion_proven else "1")
