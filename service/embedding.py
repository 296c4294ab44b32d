"""Images -> embeddings wherever the backbone runs: in the backbone service, or inline in each API worker.

``INFANTINO_BACKBONE_PLACEMENT`` says where (:func:`placement`). Both places load a backbone
version the same way (:func:`load_backbone`: its ONNX export on a CPU, else torch) and embed a
batch the same way (:func:`embed_batch`). The backbone service follows the champion itself
(``service.backbone``); inline, the API worker loads the backbone its served head names before
it serves that head (:class:`InlineBackbones`), and a :class:`MicroBatcher` lets the requests
that arrive while the model is busy share its next call, as the service's adaptive batching does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from backbones.runtime import (
    EXPORT_RUNTIMES,
    Runner,
    create_runner,
    runtime_of,
    torch_installed,
    with_tta,
)
from infantino.images import fit_input
from infantino.settings import Settings
from registry.store import LoadedBackbone
from service.models import ModelSource

log = logging.getLogger(__name__)
PLACEMENTS = ("auto", "inline", "service")


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


def placement(settings: Settings) -> str:
    """``inline`` or ``service``: ``auto`` is inline on a CPU (the ONNX export, no hop), the service
    when a GPU may be present or torch is asked for (one process owns the device and batches for all workers)."""
    chosen = settings.serving.backbone_placement
    if chosen != "auto":
        return chosen
    runtime = settings.models.backbone_runtime
    return "service" if runtime == "torch" or gpu_may_be_present() else "inline"


def load_backbone(source: ModelSource, version: str | None, device, settings: Settings) -> tuple[LoadedBackbone, Runner]:
    """A backbone version (None: the champion's) and its runner (INFANTINO_BACKBONE_RUNTIME, with
    INFANTINO_TTA): from its ONNX export, without torch, when OpenVINO or ONNX Runtime runs it (on a
    CPU, or asked for); else, or when the version has no export, the torch model."""
    runtime, threads = settings.models.backbone_runtime, settings.serving.torch_threads
    if runtime in EXPORT_RUNTIMES or (runtime == "auto" and str(device) == "cpu"):
        loaded = source.load_backbone_onnx(version)
        if loaded is not None:
            run = create_runner(loaded.preprocessing, runtime, onnx=loaded.onnx, threads=threads)
            return loaded, with_tta(run, settings.models.tta)
    import torch

    from backbones.inference import for_inference

    if threads:
        torch.set_num_threads(threads)
    loaded = source.load_backbone(version)
    loaded.model = for_inference(loaded.model.to(device))
    run = create_runner(loaded.preprocessing, runtime, model=loaded.model, threads=threads)
    return loaded, with_tta(run, settings.models.tta)


def describe(task: str, backbone: tuple[LoadedBackbone, Runner], device) -> str:
    loaded, run = backbone
    return f"{task}: serving backbone v{loaded.version} on {runtime_of(run)} ({'its ONNX export' if loaded.model is None else device})"


def embed_batch(backbone: tuple[LoadedBackbone, Runner], images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, C) images (the shared input) -> float32 (N, 64), by one backbone, in its own input."""
    loaded, run = backbone
    return run(fit_input(images, loaded.preprocessing))


class InlineBackbones:
    """Every task's backbone inside this API worker, by version: the served head's, loaded before
    that head is served (:meth:`prepare`), and the one before it (requests that took their
    snapshot before the swap finish on it); another version (an updater's) is loaded when asked."""

    KEEP = 2  # versions per task kept loaded: the served one and the previous one

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = serving_device(settings.models.backbone_runtime)
        self._sources: dict[str, ModelSource] = {}
        # Replaced whole, never changed in place: the model thread reads it without a lock while another thread loads.
        self._loaded: dict[str, dict[str, tuple[LoadedBackbone, Runner]]] = {}
        self._fallback: dict[str, str] = {}  # per task, the version loaded as the fallback (asked for as None)
        self._lock = threading.Lock()  # one load at a time

    def prepare(self, task: str, source: ModelSource, version: str, fallback: bool = False) -> None:
        """Load ``task``'s backbone ``version`` (if it is not loaded) and keep it, with the previous one.
        ``fallback``: the head came from the Bento's bundle or the shipped files (the registry had
        no champion), and so does its backbone (see service.models.ModelSource)."""
        self._sources[task] = source
        if fallback:
            self._fallback[task] = version
        self.get(task, version)
        with self._lock:
            versions = dict(self._loaded[task])
            versions[version] = versions.pop(version)  # most recent last
            while len(versions) > self.KEEP:
                versions.pop(next(iter(versions)))
            self._loaded = {**self._loaded, task: versions}

    def get(self, task: str, version: str) -> tuple[LoadedBackbone, Runner]:
        found = self._loaded.get(task, {}).get(version)
        if found is not None:
            return found
        with self._lock:
            found = self._loaded.get(task, {}).get(version)
            if found is not None:
                return found
            asked = None if self._fallback.get(task) == version else version
            loaded = load_backbone(self._sources[task], asked, self.device, self.settings)
            if loaded[0].version != version:
                raise RuntimeError(f"asked for {task} backbone v{version}, loaded v{loaded[0].version}")
            self._loaded = {**self._loaded, task: {**self._loaded.get(task, {}), version: loaded}}
            log.info(describe(task, loaded, self.device) + " (inline)")
            return loaded

    def embed(self, wanted: dict[str, str], images: np.ndarray) -> dict[str, np.ndarray]:
        """Per task, the embeddings of ``images`` by the backbone version ``wanted`` names."""
        return {task: embed_batch(self.get(task, version), images) for task, version in wanted.items()}


class MicroBatcher:
    """Concurrent requests of one API worker share one model call.

    ``await batcher(key, images)`` queues the images; one model thread takes everything queued
    under one key (up to ``max_size`` images) whenever it is free, so requests that arrive
    while it runs join the next call. ``wait_s`` lets a free model wait that long for more
    requests first (0: start at once). ``run(key, images)`` must return one row per image.
    """

    def __init__(self, run: Callable[[tuple, np.ndarray], dict[str, np.ndarray]], max_size: int, wait_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None):
        self.run, self.max_size, self.wait_s, self.on_batch = run, max_size, wait_s, on_batch
        self._pending: list[tuple[tuple, np.ndarray, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inline-backbone")

    async def __call__(self, key: tuple, images: np.ndarray) -> dict[str, np.ndarray]:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        self._pending.append((key, images, future))
        self._wake.set()
        return await future

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> tuple[tuple, list[tuple[np.ndarray, asyncio.Future]]]:
        """The oldest request's key, and the queued requests under it, up to max_size images (at least one request)."""
        key = self._pending[0][0]
        taken, rest, n = [], [], 0
        for item in self._pending:
            if item[0] == key and (not taken or n + len(item[1]) <= self.max_size):
                taken.append((item[1], item[2]))
                n += len(item[1])
            else:
                rest.append(item)
        self._pending = rest
        return key, taken

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.wait_s and self._pending and sum(len(i[1]) for i in self._pending) < self.max_size:
                await asyncio.sleep(self.wait_s)
            while self._pending:
                key, taken = self._take()
                taken = [(images, fut) for images, fut in taken if not fut.done()]  # a cancelled request is not computed
                if not taken:
                    continue
                images = taken[0][0] if len(taken) == 1 else np.concatenate([t[0] for t in taken])
                try:
                    out = await loop.run_in_executor(self._executor, self.run, key, images)
                except Exception as exc:  # every request of the batch answers with the error
                    for _, fut in taken:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                if self.on_batch is not None:
                    self.on_batch(len(images))
                start = 0
                for part, fut in taken:
                    end = start + len(part)
                    if not fut.done():
                        fut.set_result({task: emb[start:end] for task, emb in out.items()})
                    start = end
