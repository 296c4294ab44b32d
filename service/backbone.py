"""The backbone service (BentoML's "runner" role): batched image -> embedding inference.

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
import os
import threading

import bentoml
import numpy as np

from backbones.runtime import Runner, create_runner, torch_installed, with_tta
from infantino import EMBEDDING_DIM
from infantino.images import fit_input
from infantino.settings import get_settings
from registry.store import LoadedBackbone
from service.models import ChampionFollower

log = logging.getLogger(__name__)
SETTINGS = get_settings()


# ---- the wire format: per task, in settings order, 64 embedding columns then the backbone version ----
def pack_embeddings(blocks: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """[(float32 (N, 64), backbone version), one per task] -> float32 (N, 65 per task)."""
    columns = []
    for emb, version in blocks:
        columns += [emb.astype(np.float32, copy=False), np.full((len(emb), 1), float(version), dtype=np.float32)]
    return np.concatenate(columns, axis=1)


def unpack_embeddings(packed: np.ndarray, tasks: list[str]) -> dict[str, tuple[np.ndarray, set[str]]]:
    """The inverse: per task, its (N, 64) embeddings and the backbone version(s) that made them."""
    width = EMBEDDING_DIM + 1
    out = {}
    for i, task in enumerate(tasks):
        block = packed[:, i * width : (i + 1) * width]
        out[task] = (block[:, :-1], {str(int(v)) for v in block[:, -1]})
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
                loaded, run = self.load(wanted)
                self.current = (loaded, with_tta(run, SETTINGS.models.tta))  # one swap: in-flight batches keep the old
                log.info("%s: serving backbone v%s on %s (%s)", self.task, loaded.version, SETTINGS.models.backbone_runtime,
                         "ONNX" if loaded.model is None else f"torch, {self.device}")
            self.head_version = head_version

    def load(self, version: str | None) -> tuple[LoadedBackbone, Runner]:
        """The backbone and its runner: from its ONNX export, without torch, when ONNX Runtime runs it
        (on a CPU, or asked for); else, or when the version has no export, the torch model."""
        runtime, threads = SETTINGS.models.backbone_runtime, SETTINGS.serving.torch_threads
        if runtime == "onnxruntime" or (runtime == "auto" and str(self.device) == "cpu"):
            loaded = self.source.load_backbone_onnx(version)
            if loaded is not None:
                return loaded, create_runner(loaded.preprocessing, runtime, onnx=loaded.onnx, threads=threads)
        import torch

        from backbones.inference import for_inference

        if threads:
            torch.set_num_threads(threads)
        loaded = self.source.load_backbone(version)
        loaded.model = for_inference(loaded.model.to(self.device))
        return loaded, create_runner(loaded.preprocessing, runtime, model=loaded.model, threads=threads)


def serving_device(runtime: str):
    """Where the backbone runs: ``"cpu"`` without importing torch, unless torch is asked for or a
    GPU may be present (then torch picks: a GPU when there is one). A Bento built without torch
    (bentofile.yaml) serves the CPU path only."""
    if runtime != "torch" and not gpu_may_be_present():
        return "cpu"
    from backbones.inference import pick_device

    return pick_device(None)


def gpu_may_be_present() -> bool:
    """torch is installed and the machine has a CUDA or ROCm device node (no torch import)."""
    if not torch_installed():
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


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
            if served.current is None:
                raise bentoml.exceptions.ServiceUnavailable(f"the {task} backbone is not loaded yet")
            backbone, run = served.current
            blocks.append((run(fit_input(images, backbone.preprocessing)), backbone.version))
        return pack_embeddings(blocks)
