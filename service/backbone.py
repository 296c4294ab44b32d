"""The backbone service (BentoML's "runner" role): batched image -> embedding inference.

Requests from all API workers meet here and are merged by BentoML's adaptive batching
(max batch size and latency from settings), so the CNN runs on full batches under load.
Inputs are uint8 images already resized by the API (4x smaller to ship than floats); the
output carries one extra column, the backbone version that made each row, so the API can
refuse to mix a head with embeddings from a backbone it was not trained on.
"""

from __future__ import annotations

import logging
import threading

import bentoml
import numpy as np

from infantino.images import normalise
from infantino.settings import get_settings
from service.models import ChampionWatcher, ModelSource

log = logging.getLogger(__name__)
SETTINGS = get_settings()


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
        self.source = ModelSource(SETTINGS)
        self._lock = threading.Lock()
        self.backbone = None
        self.head_version: str | None = None
        try:
            self._switch(self.source.champion_head_version())
        except Exception:
            log.exception("no backbone loaded yet; readiness stays false until the registry has a champion")
        self.watcher = ChampionWatcher(self.source, lambda: self.head_version, self._switch, SETTINGS.model_poll_s).start()

    def _switch(self, head_version: str | None) -> None:
        """Serve the backbone that ``head_version`` was trained on (loading only if it differs)."""
        wanted = self.source.head_backbone_version(head_version) if head_version else None
        with self._lock:
            if self.backbone is None or wanted is None or wanted != self.backbone.version:
                loaded = self.source.load_backbone(wanted)
                loaded.model.to(self.device)
                self.backbone = loaded  # one reference swap: in-flight batches keep the old model
                log.info("serving backbone v%s", loaded.version)
            self.head_version = head_version

    def __is_ready__(self) -> bool:
        return self.backbone is not None

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.batch_max_size, max_latency_ms=SETTINGS.batch_max_latency_ms)
    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, 65): 64-d embeddings, then the backbone version."""
        backbone = self.backbone
        if backbone is None:
            raise bentoml.exceptions.ServiceUnavailable("backbone not loaded yet")
        x = self.torch.from_numpy(normalise(images, backbone.preprocessing)).to(self.device)
        with self.torch.inference_mode():
            emb = backbone.model(x).float().cpu().numpy()
        version = np.full((len(emb), 1), float(backbone.version), dtype=np.float32)
        return np.concatenate([emb, version], axis=1)
