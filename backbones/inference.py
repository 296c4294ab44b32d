"""Running a torch backbone: device choice, inference mode, and embedding arrays of images."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from backbones.model import EmbeddingNet
from backbones.views import augmented_views
from infantino import EMBEDDING_DIM
from infantino.images import Preprocessing, normalise


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU (or whatever is asked)."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def for_inference(model: EmbeddingNet) -> EmbeddingNet:
    """Eval mode in channels_last memory format: 1.25x the CPU throughput of the default
    format for resnet18 at 64 px, batch 32 (bench/results/cpu_runtime.json)."""
    return model.eval().to(memory_format=torch.channels_last)


@torch.inference_mode()
def embed_images(
    model: EmbeddingNet, x_uint8: np.ndarray, prep: Preprocessing, batch_size: int = 256,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: str | None = None, tta: str = "none",
    stage_features: bool = False,
) -> np.ndarray:
    """Embed uint8 (N, H, W, 3) images batch by batch; returns float32 numpy (N, 64), or with
    ``stage_features`` the rows the service serves: each embedding followed by its stage features
    (``EmbeddingNet.served_rows``).

    ``transform`` changes each normalised batch first (e.g. the lower-face occlusion of the
    masked-face evaluation); ``tta`` averages each embedding over test-time views
    (backbones.views.TTA_MODES), as the service does with INFANTINO_TTA.
    """
    from tqdm.auto import tqdm

    if tta != "none":
        views = [embed_images(model, np.ascontiguousarray(v), prep, batch_size, transform, progress, stage_features=stage_features)
                 for v in augmented_views(x_uint8, tta)]
        return np.mean(views, axis=0)

    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in tqdm(range(0, len(x_uint8), batch_size), desc=progress, unit="batch", leave=False, disable=progress is None):
        chunk = torch.from_numpy(normalise(x_uint8[start : start + batch_size], prep)).to(device)
        chunk = chunk.contiguous(memory_format=torch.channels_last)  # see for_inference
        if transform is not None:
            chunk = transform(chunk)
        out.append((model.served_rows(chunk) if stage_features else model(chunk)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, EMBEDDING_DIM), np.float32)
