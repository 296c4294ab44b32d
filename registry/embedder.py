"""Embed stored images in this process with a registered backbone version (torch).

What ``infantino update`` (and tests) give the online updater for re-embedding feedback after a
backbone change; the service gives it its backbone service instead.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np

from infantino.images import open_image, to_model_array
from registry.store import LoadedBackbone, ModelRegistry


def torch_embedder(registry: ModelRegistry) -> Callable[[list[bytes], str], np.ndarray]:
    @lru_cache(maxsize=2)
    def backbone(version: str) -> LoadedBackbone:
        return registry.load_backbone(version)

    def embed(images: list[bytes], backbone_version: str) -> np.ndarray:
        from backbones.inference import embed_images

        loaded = backbone(backbone_version)
        prep = loaded.preprocessing
        x = np.stack([to_model_array(open_image(img, reduce_to=prep.input_size), prep.input_size, prep.grayscale) for img in images])
        return embed_images(loaded.model, x, prep, stage_features=True)  # served rows, as the service stores them

    return embed
