"""The backbone service (BentoML's "runner" role): batched image -> embedding inference,
with INFANTINO_BACKBONE_PLACEMENT=service (see service.embedding for both placements).

Requests from all API workers meet here and are merged by BentoML's adaptive batching
(max batch size and latency from settings), so the CNN runs on full batches under load.
Inputs are uint8 images already resized by the API (4x smaller to ship than floats). Every
enabled task's backbone embeds each batch; ``pack_embeddings`` and ``unpack_embeddings`` are
the one definition of the answer's layout, which carries, per task, the backbone version that
made each embedding, so the API can refuse to mix a head with embeddings from a backbone it
was not trained on.
"""

from __future__ import annotations

import logging
import threading

import bentoml
import numpy as np

from backbones.runtime import Runner
from infantino import EMBEDDING_DIM
from infantino.settings import get_settings
from registry.store import LoadedBackbone
from service.embedding import describe, embed_batch, load_backbone, serving_device
from service.heap import freeze_long_lived
from service.models import ChampionFollower

log = logging.getLogger(__name__)
SETTINGS = get_settings()


# ---- the wire format: per task, in settings order, [row width, backbone version, the row's columns] ----
# A row is the embedding followed by the stage features (backbones/runtime.py); its width depends on
# the backbone, so each block says its own.
def pack_embeddings(blocks: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """[(float32 (N, W) served rows, backbone version), one per task] -> float32 (N, sum of 2 + W)."""
    columns = []
    for rows, version in blocks:
        n, width = rows.shape
        columns += [np.full((n, 1), float(width), np.float32), np.full((n, 1), float(version), np.float32),
                    rows.astype(np.float32, copy=False)]
    return np.concatenate(columns, axis=1)


def unpack_embeddings(packed: np.ndarray, tasks: list[str]) -> dict[str, tuple[np.ndarray, set[str]]]:
    """The inverse: per task, its (N, W) rows and the backbone version(s) that made them."""
    out, start = {}, 0
    for task in tasks:
        width = int(packed[0, start]) if len(packed) else EMBEDDING_DIM
        out[task] = (packed[:, start + 2 : start + 2 + width], {str(int(v)) for v in packed[:, start + 1]})
        start += 2 + width
    return out


class ServedBackbone(ChampionFollower):
    """The backbone one task's champion head was trained on (reloaded only when that changes),
    with the runner that executes it (INFANTINO_BACKBONE_RUNTIME)."""

    def __init__(self, task: str, device):
        self.device = device
        self._lock = threading.Lock()
        self.current: tuple[LoadedBackbone, Runner] | None = None
        self.head_version: str | None = None
        super().__init__(SETTINGS, task)

    def current_head_version(self) -> str | None:
        return self.head_version

    def switch(self, head_version: str | None) -> None:
        wanted = self.source.head_backbone_version(head_version) if head_version else None
        with self._lock:
            if self.current is None or wanted is None or wanted != self.current[0].version:
                self.current = load_backbone(self.source, wanted, self.device, SETTINGS)  # one swap: in-flight batches keep the old
                log.info(describe(self.task, self.current, self.device))
            self.head_version = head_version


# runner_connection: BentoML's client to this service recycles its connection session every
# 100 requests by default and fails the requests still in flight on it (seen at 16 concurrent
# clients); recycle rarely, and the API retries the rest (service/api.py, embed).
@bentoml.service(
    name="infantino-backbone", workers=1, threads=1, traffic={"timeout": 60},
    runner_connection={"max_requests": 1_000_000, "max_age": 86_400.0},
)
class BackboneService:
    def __init__(self) -> None:
        self.device = serving_device(SETTINGS.models.backbone_runtime)
        self.tasks = {task: ServedBackbone(task, self.device).start() for task in SETTINGS.models.tasks}
        freeze_long_lived()  # as the API worker (service/heap.py)

    def __is_ready__(self) -> bool:
        return all(t.current is not None for t in self.tasks.values())

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        for served in self.tasks.values():
            served.stop()

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.serving.batch_max_size,
                 max_latency_ms=SETTINGS.serving.batch_max_latency_ms)
    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> the packed embeddings of every task (see pack_embeddings)."""
        blocks = []
        for task, served in self.tasks.items():
            current = served.current
            if current is None:
                raise bentoml.exceptions.ServiceUnavailable(f"the {task} backbone is not loaded yet")
            blocks.append((embed_batch(current, images), current[0].version))
        return pack_embeddings(blocks)
