"""Test-time views of model inputs (test-time augmentation, ``INFANTINO_TTA``): numpy only, shared by
torch inference (backbones/inference.py) and the served runners (backbones/runtime.py)."""

from __future__ import annotations

import numpy as np

TTA_MODES = ("none", "flip", "flip+shift")


def augmented_views(images: np.ndarray, mode: str) -> list[np.ndarray]:
    """Test-time views of uint8 (N, S, S, 3) inputs: the images, their mirror images, and (flip+shift)
    both shifted by 1/16 of the side in four directions, edges replicated."""
    if mode not in TTA_MODES:
        raise ValueError(f"test-time augmentation must be one of {TTA_MODES}; got {mode!r}")
    views = [images]
    if mode in ("flip", "flip+shift"):
        views.append(images[:, :, ::-1])
    if mode == "flip+shift":
        d = max(1, images.shape[1] // 16)
        padded = np.pad(images, ((0, 0), (d, d), (d, d), (0, 0)), mode="edge")
        s = images.shape[1]
        for dy, dx in ((0, 0), (0, 2 * d), (2 * d, 0), (2 * d, 2 * d)):
            shifted = padded[:, dy : dy + s, dx : dx + s]
            views += [shifted, shifted[:, :, ::-1]]
    return views
