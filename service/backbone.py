"""The backbone service (BentoML's "runner" role): batched image -> embedding inference.

Requests from all API workers meet here and are merged by BentoML's adaptive batching
(max batch size and latency from settings), so the CNN runs on full batches under load.
Inputs are uint8 images already resized by the API (4x smaller to ship than floats). Every
enabled task's backbone embeds each batch; the output holds, per task in settings order, its
64-d embedding and one column with the backbone version that made it, so the API can refuse
to mix a head with embeddings from a backbone it was not trained on.
"""

from __future__ import annotations

import logging
import threading

import bentoml
import numpy as np

from infantino.images import fit_input, normalise
from infantino.settings import get_settings
from registry.store import LoadedBackbone
from service.models import ChampionFollower

log = logging.getLogger(__name__)
SETTINGS = get_settings()


class ServedBackbone(ChampionFollower):
    """The backbone one task's champion head was trained on (reloaded only when that changes)."""

    def __init__(self, task: str, device):
        self.device = device
        self._lock = threading.Lock()
        self.backbone: LoadedBackbone | None = None
        self.head_version: str | None = None
        super().__init__(SETTINGS, task)

    def current_head_version(self) -> str | None:
        return self.head_version

    def switch(self, head_version: str | None) -> None:
        wanted = self.source.head_backbone_version(head_version) if head_version else None
        with self._lock:
            if self.backbone is None or wanted is None or wanted != self.backbone.version:
                loaded = self.source.load_backbone(wanted)
                loaded.model.to(self.device)
                self.backbone = loaded  # one reference swap: in-flight batches keep the old model
                log.info("%s: serving backbone v%s", self.task, loaded.version)
            self.head_version = head_version


# runner_connection: BentoML's client to this service recycles its connection session every
# 100 requests by default and fails the requests still in flight on it (seen at 16 concurrent
# clients); recycle rarely, and the API retries the rest (service/api.py, _embed).
@bentoml.service(
    name="infantino-backbone", workers=1, threads=1, traffic={"timeout": 60},
    runner_connection={"max_requests": 1_000_000, "max_age": 86_400.0},
)
class BackboneService:
    def __init__(self) -> None:
        import torch

        if SETTINGS.torch_threads:
            torch.set_num_threads(SETTINGS.torch_threads)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tasks = {task: ServedBackbone(task, self.device) for task in SETTINGS.tasks}

    def __is_ready__(self) -> bool:
        return all(t.backbone is not None for t in self.tasks.values())

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.batch_max_size, max_latency_ms=SETTINGS.batch_max_latency_ms)
    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, 65 per task): each task's 64-d embedding, then its backbone version."""
        blocks = []
        for task, served in self.tasks.items():
            backbone = served.backbone
            if backbone is None:
                raise bentoml.exceptions.ServiceUnavailable(f"the {task} backbone is not loaded yet")
            x = self.torch.from_numpy(normalise(fit_input(images, backbone.preprocessing), backbone.preprocessing)).to(self.device)
            with self.torch.inference_mode():
                emb = backbone.model(x).float().cpu().numpy()
            blocks += [emb, np.full((len(emb), 1), float(backbone.version), dtype=np.float32)]
        return np.concatenate(blocks, axis=1)
