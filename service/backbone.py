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
from typing import Callable

import bentoml
import numpy as np

from infantino.images import fit_input, normalise
from infantino.settings import get_settings
from registry.store import LoadedBackbone
from service.models import ChampionFollower
from training.model import embed_images, pick_device

log = logging.getLogger(__name__)
SETTINGS = get_settings()


class ServedBackbone(ChampionFollower):
    """The backbone one task's champion head was trained on (reloaded only when that changes),
    with the function that runs it: torch, or ONNX Runtime (INFANTINO_BACKBONE_RUNTIME)."""

    def __init__(self, task: str, device):
        self.device = device
        self._lock = threading.Lock()
        self.current: tuple[LoadedBackbone, Callable[[np.ndarray], np.ndarray]] | None = None
        self.head_version: str | None = None
        super().__init__(SETTINGS, task)

    def current_head_version(self) -> str | None:
        return self.head_version

    def switch(self, head_version: str | None) -> None:
        wanted = self.source.head_backbone_version(head_version) if head_version else None
        with self._lock:
            if self.current is None or wanted is None or wanted != self.current[0].version:
                loaded = self.source.load_backbone(wanted)
                loaded.model.to(self.device)
                self.current = (loaded, runner(loaded, SETTINGS.backbone_runtime))  # one swap: in-flight batches keep the old
                log.info("%s: serving backbone v%s on %s", self.task, loaded.version, SETTINGS.backbone_runtime)
            self.head_version = head_version


def runner(loaded: LoadedBackbone, runtime: str) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (N, S, S, 3) model inputs -> float32 (N, 64) embeddings, on the chosen runtime.

    "auto" is ONNX Runtime for a model on the CPU (torch if the export or ONNX Runtime fails,
    with a warning), torch for a model on a GPU.
    """
    prep = loaded.preprocessing
    on_cpu = next(loaded.model.parameters()).device.type == "cpu"
    if runtime == "onnxruntime" or (runtime == "auto" and on_cpu):
        try:
            session = onnx_session(loaded.model, prep.input_size)
            return lambda images: session.run(None, {"x": normalise(images, prep)})[0]
        except Exception:
            if runtime == "onnxruntime":
                raise
            log.warning("ONNX Runtime unavailable for backbone v%s; running it with torch", loaded.version, exc_info=True)
    return lambda images: embed_images(loaded.model, images, prep, batch_size=len(images))


def onnx_session(model, input_size: int):
    """Export the torch backbone to ONNX in memory and open an ONNX Runtime CPU session on it."""
    import io

    import torch

    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError("INFANTINO_BACKBONE_RUNTIME=onnxruntime needs ONNX Runtime: pip install onnxruntime onnx") from None
    buf = io.BytesIO()
    example = torch.zeros(1, 3, input_size, input_size)
    # The TorchScript exporter (dynamo=False): the torch.export one needs onnxscript and gains nothing here.
    torch.onnx.export(model, example, buf, input_names=["x"], output_names=["embedding"],
                      dynamic_axes={"x": {0: "n"}, "embedding": {0: "n"}}, dynamo=False)
    options = onnxruntime.SessionOptions()
    if SETTINGS.torch_threads:
        options.intra_op_num_threads = SETTINGS.torch_threads
    return onnxruntime.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])


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
        self.device = pick_device(None)  # a GPU when there is one
        self.tasks = {task: ServedBackbone(task, self.device) for task in SETTINGS.tasks}

    def __is_ready__(self) -> bool:
        return all(t.current is not None for t in self.tasks.values())

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.batch_max_size, max_latency_ms=SETTINGS.batch_max_latency_ms)
    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, 65 per task): each task's 64-d embedding, then its backbone version."""
        blocks = []
        for task, served in self.tasks.items():
            if served.current is None:
                raise bentoml.exceptions.ServiceUnavailable(f"the {task} backbone is not loaded yet")
            backbone, run = served.current
            emb = run(fit_input(images, backbone.preprocessing))
            blocks += [emb, np.full((len(emb), 1), float(backbone.version), dtype=np.float32)]
        return np.concatenate(blocks, axis=1)
