"""Deploying the way BentoML users do: plain `bentoml serve` on a fresh state serves the shipped model.

No `infantino bootstrap` first: the service registers the shipped model itself, once, even
though its API workers and its backbone worker all start on the same empty registry.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from infantino import FER_CLASSES
from infantino.settings import Settings
from registry.shipped import DEFAULT_DIR, SHIPPED_VERSION
from registry.store import ModelRegistry, RegistryError
from testkit.faces import draw_face, png_bytes
from testkit.server import BentoServer, free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DEFAULT_DIR / "model.json").exists(), reason="no shipped model in this checkout")]


def test_plain_bentoml_serve_on_a_fresh_home_registers_the_shipped_model_once(tmp_path):
    home = tmp_path / "home"  # does not exist yet: nothing set up
    env = {"INFANTINO_HOME": str(home), "INFANTINO_API_WORKERS": "2", "INFANTINO_MODEL_POLL_S": "0.5"}
    started = time.monotonic()
    # target ".": what `bentoml serve` with no argument serves (bentofile.yaml's service), from the project root.
    srv = BentoServer(env, log_path=tmp_path / "serve.log", target=".")
    try:
        srv.start(timeout_s=420)
        ready_s = time.monotonic() - started
        answers = []
        for _ in range(4):  # several requests, so both API workers are likely to answer
            r = httpx.post(f"{srv.url}/predict", files={"image": ("face.png", png_bytes(draw_face(0, size=96)), "image/png")},
                           timeout=120)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    finally:
        srv.stop()
    for p in answers:
        assert list(p["probabilities"]) == list(FER_CLASSES) and p["label"] in FER_CLASSES
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
        assert p["head_version"] == "1" and p["backbone_version"] == "1"  # served from the registry, not the files
    registry = ModelRegistry(Settings(home=home))
    heads, backbones = registry.list_versions("head"), registry.list_versions("backbone")
    assert [h["version"] for h in heads] == ["1"] and [b["version"] for b in backbones] == ["1"], (heads, backbones)
    assert heads[0]["aliases"] == ["champion"] and heads[0]["tags"]["origin"] == "shipped"
    print(f"fresh home -> ready in {ready_s:.0f} s")


def test_an_unreachable_registry_serves_the_shipped_files(tmp_path, monkeypatch):
    """An outage at start: no crash, no endless not-ready; the package's model answers as v0."""
    from infantino.images import to_model_array
    from service.models import ChampionFollower, ModelSource
    from backbones.inference import embed_images

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(ModelSource, "_bundled", lambda self, kind: (_ for _ in ()).throw(RegistryError("no Bento here")))
    settings = Settings(home=tmp_path / "home", tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there

    class Follower(ChampionFollower):
        head = None

        def switch(self, head_version):
            self.head = self.source.load_head(head_version)

        def current_head_version(self):
            return self.head.version if self.head else None

    follower = Follower(settings, "expression")  # registering fails (logged), serving does not
    assert follower.head.version == SHIPPED_VERSION and follower.head.classes == list(FER_CLASSES)
    assert follower.watcher.check_now() is False  # still unreachable: keeps what it serves
    backbone = follower.source.load_backbone()
    assert backbone.version == SHIPPED_VERSION == follower.head.backbone_version
    prep = follower.source.backbone_preprocessing(follower.head.backbone_version)
    assert prep == backbone.preprocessing
    x = np.stack([to_model_array(draw_face(i, size=96), prep.input_size, prep.grayscale) for i in range(3)])
    probs = follower.head.model.predict_proba(embed_images(backbone.model, x, prep))
    assert probs.shape == (3, len(FER_CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    follower.stop()


def test_processes_opening_a_fresh_embedded_registry_together_all_succeed(tmp_path):
    """The API and backbone workers of a fresh server open the SQLite registry at once: MLflow
    migrates a new database on first use, and without the lock one of them failed."""
    import subprocess
    import sys

    from testkit.server import PROJECT_ROOT

    code = ("from infantino.settings import Settings; from registry.store import ModelRegistry; "
            "r = ModelRegistry(Settings()); print(r.champion_version('head'))")
    env = {**__import__("os").environ, "INFANTINO_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == "None"  # an empty registry, opened without error
