"""A new backbone champion: stored feedback follows it, re-embedded from its images."""

from __future__ import annotations

import numpy as np
import pytest

from infantino.images import open_image, to_model_array
from infantino.settings import Settings
from online.updater import Updater
from registry.embedder import torch_embedder
from store import Stores
from testkit.faces import faces
from testkit.registry import train_tiny_registry
from backbones.inference import embed_images

pytestmark = pytest.mark.slow


def test_feedback_is_reembedded_when_the_backbone_changes(tmp_path):
    home = tmp_path / "home"
    registry = train_tiny_registry(home, epochs=3)
    settings = Settings(home=home, gate_max_val_drop=1.0)
    stores = Stores.open(settings.storage.database_url)
    queue = stores.feedback
    old = registry.load_backbone("1")
    items = faces(2, seed=9)
    for img, label in items:
        x = to_model_array(open_image(img), old.preprocessing.input_size, old.preprocessing.grayscale)[None]
        queue.add(task="expression", label=label, embedding=embed_images(old.model, x, old.preprocessing)[0],
                  backbone_version="1", image=img)
    queue.add(task="expression", label="happy", embedding=np.zeros(64, np.float32), backbone_version="1", image=None)

    train_tiny_registry(home, epochs=3)  # a new backbone (v2) and head become champion
    assert registry.champion_version("backbone") == "2"
    report = Updater(settings.online, registry, queue, stores.lease, embed=torch_embedder(registry)).run_once(force=True)

    new = registry.load_backbone("2")
    stored = {i.id: i for i in queue.items("expression")}
    with_image = [i for i in stored.values() if i.image]
    assert len(with_image) == len(items) and all(i.backbone_version == "2" for i in with_image)
    for item in with_image:
        x = to_model_array(open_image(item.image), new.preprocessing.input_size, new.preprocessing.grayscale)[None]
        np.testing.assert_allclose(item.embedding, embed_images(new.model, x, new.preprocessing, stage_features=True)[0], atol=1e-5)  # served rows
    # The item without an image stays on the old backbone and is left out of the update.
    assert [i.backbone_version for i in stored.values() if not i.image] == ["1"]
    assert report.left_out_items == 1 and report.new_items == report.feedback_items == len(items)
