"""The shipped model: export a champion as files, register them elsewhere, same answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from infantino.settings import Settings
from registry.shipped import DEFAULT_DIR, export_champion, register_shipped
from registry.store import ModelRegistry
from testkit.faces import faces
from testkit.registry import train_tiny_registry
from backbones.inference import embed_images

pytestmark = pytest.mark.slow


def predict(registry: ModelRegistry, images):
    from infantino.images import open_image, to_model_array

    head = registry.load_head("champion")
    backbone = registry.load_backbone(head.backbone_version)
    prep = backbone.preprocessing
    x = np.stack([to_model_array(open_image(b), prep.input_size, prep.grayscale) for b in images])
    return head.model.predict_proba(embed_images(backbone.model, x, prep))


def test_export_then_register_gives_the_same_model(tmp_path):
    source = train_tiny_registry(tmp_path / "source")
    out = export_champion(source, tmp_path / "shipped", command="pytest")
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["happy", "sad", "surprise"] and meta["command"] == "pytest"
    assert meta["preprocessing"]["input_size"] == 48 and "val_accuracy" in meta["metrics"]
    assert meta["machine"]["cpu_count"] == os.cpu_count() and "noted" not in meta["machine"]  # noted by the training run
    target = ModelRegistry(Settings(home=tmp_path / "target"))
    bv, hv = register_shipped(target, out)
    assert target.champion_version("head") == hv and target.champion_version("backbone") == bv
    assert target.version_info("head", hv).tags["origin"] == "shipped"
    images = [b for b, _ in faces(3, seed=3)]
    # fp16 weights on disk: the same answers up to half-precision rounding.
    np.testing.assert_allclose(predict(target, images), predict(source, images), atol=2e-2)
    replay, validation = target.load_embeddings(target.load_head("champion"))
    assert len(validation.y) and len(replay.y)


@pytest.mark.skipif(not (DEFAULT_DIR / "model.json").exists(), reason="no shipped model in this checkout")
def test_bootstrap_registers_the_shipped_fer_model_once(tmp_path):
    env = {"INFANTINO_HOME": str(tmp_path / "home"), "PATH": ""}
    cmd = [sys.executable, "-m", "cli.main", "bootstrap"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "registered the shipped model" in first.stdout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert "already has a champion" in again.stdout
    registry = ModelRegistry(Settings(home=tmp_path / "home"))
    head = registry.load_head("champion")
    assert head.classes == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    probs = predict(registry, [b for b, _ in faces(1, seed=0)])
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1)
