"""How a backbone runs when it serves: torch, or its ONNX export on ONNX Runtime or OpenVINO (no torch needed).

A runner maps uint8 model inputs (N, S, S, 3) to float32 served rows (N, 64 + stage features):
the embedding the head reads, then the stage features a domain's memory reads
(``EmbeddingNet.served_rows``; an export made before those existed serves the embedding alone). On a CPU, ONNX
Runtime runs one image 3x faster than torch and a batch of 32 1.04x faster than torch in
channels_last (bench/results/cpu_runtime.json). OpenVINO (the CPU default when installed, as it
is in the Bento), on a CPU with bfloat16 arithmetic (AVX512-BF16 or AMX), which it then uses by
default, runs the model about 2x faster than ONNX Runtime for 0.04 points of FER2013 accuracy, and
alike in float32 (bench/results/cpu_runtime_openvino.json). On a GPU, torch. A Bento built for CPUs carries the backbone as ONNX only, so this module imports torch
only when asked to use it.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
from typing import Callable

import numpy as np

from backbones.views import augmented_views
from infantino.images import Preprocessing, normalise

log = logging.getLogger(__name__)
Runner = Callable[[np.ndarray], np.ndarray]  # each made here names its runtime: runtime_of(run)
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
EXPORT_RUNTIMES = ("onnxruntime", "openvino")  # the runtimes that run the ONNX export, without torch


def torch_installed() -> bool:
    """Whether torch can be imported here, found without importing it (a Bento built for CPUs has none)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # blocked, or a half-imported module
        return False


def export_onnx(model, input_size: int) -> bytes:
    """The torch backbone's served rows as ONNX bytes, with a dynamic batch dimension (input ``x``, output ``embedding``)."""
    import torch

    class ServedRows(torch.nn.Module):  # what the export computes: EmbeddingNet.served_rows
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.served_rows(x)

    buf = io.BytesIO()
    example = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
    # The TorchScript exporter (dynamo=False): the torch.export one needs onnxscript and gains nothing here.
    torch.onnx.export(ServedRows(model).eval(), example, buf, input_names=["x"], output_names=["embedding"],
                      dynamic_axes={"x": {0: "n"}, "embedding": {0: "n"}}, dynamo=False)
    return buf.getvalue()


def onnx_runner(onnx: bytes, prep: Preprocessing, threads: int = 0) -> Runner:
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError("the onnxruntime backbone runtime needs ONNX Runtime: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # Idle intra-op threads sleep instead of spinning: the model shares this process's cores with
    # the request handling around it (the backbone inline in the API worker), and spinning took
    # their CPU: 16 clients 144 -> 168 img/s with it off, 3 rounds each (README "Serving").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    return _named(lambda images: session.run(None, {"x": normalise(images, prep)})[0], "onnxruntime")


def openvino_runner(onnx: bytes, prep: Preprocessing, threads: int = 0) -> Runner:
    """OpenVINO on the CPU, tuned for latency (one request at a time: the service batches before it).

    OpenVINO picks its inference precision: bfloat16 where the CPU computes in it, else float32.
    """
    try:
        import openvino
    except ImportError:
        raise RuntimeError("the openvino backbone runtime needs OpenVINO: pip install openvino") from None
    core = openvino.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    request = core.compile_model(core.read_model(onnx, b""), "CPU", config).create_infer_request()
    lock = threading.Lock()  # one infer request: callers on several threads take turns

    def run(images: np.ndarray) -> np.ndarray:
        with lock:
            request.infer({0: normalise(images, prep)})
            return request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

    return _named(run, "openvino")


def export_runner(onnx: bytes, prep: Preprocessing, runtime: str = "auto", threads: int = 0) -> Runner:
    """A runner for an ONNX export: the runtime asked for; ``auto``: OpenVINO when it is installed
    (served 22% more images at 16 clients than ONNX Runtime and answered one client 2 ms sooner,
    3 interleaved rounds each, README "Serving"), else, or if it cannot compile the model, ONNX Runtime."""
    if runtime == "openvino":
        return openvino_runner(onnx, prep, threads)
    if runtime == "auto" and importlib.util.find_spec("openvino") is not None:
        try:
            return openvino_runner(onnx, prep, threads)
        except Exception:
            log.warning("OpenVINO cannot run this backbone; running it on ONNX Runtime", exc_info=True)
    return onnx_runner(onnx, prep, threads)


def torch_runner(model, prep: Preprocessing) -> Runner:
    from backbones.inference import embed_images

    return _named(lambda images: embed_images(model, images, prep, batch_size=max(len(images), 1), stage_features=True), "torch")


def create_runner(prep: Preprocessing, runtime: str = "auto", *, model=None, onnx: bytes | None = None, threads: int = 0) -> Runner:
    """A runner for a torch ``model`` and/or its ``onnx`` export.

    ``auto``: the export on ONNX Runtime for a model on the CPU (exported
    here if no ONNX is given; torch if that fails, with a warning), torch for a model on a GPU;
    ``onnxruntime``, ``openvino`` or ``torch`` force one.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}; got {runtime!r}")
    if model is None and onnx is None:
        raise ValueError("give a torch model, its ONNX export, or both")
    on_cpu = model is None or next(model.parameters()).device.type == "cpu"
    if runtime in EXPORT_RUNTIMES or (runtime == "auto" and on_cpu) or model is None:
        try:
            return export_runner(onnx if onnx is not None else export_onnx(model, prep.input_size), prep, runtime, threads)
        except Exception:
            if runtime in EXPORT_RUNTIMES or model is None:
                raise
            log.warning("the ONNX export cannot run here; running the backbone with torch", exc_info=True)
    return torch_runner(model, prep)


def with_tta(run: Runner, mode: str) -> Runner:
    """A runner whose embedding of each image is the mean over its test-time views (one batch for all)."""
    if mode == "none":
        return run

    def tta(images: np.ndarray) -> np.ndarray:
        views = augmented_views(images, mode)
        out = run(np.ascontiguousarray(np.concatenate(views)))
        return out.reshape(len(views), len(images), -1).mean(0)

    return _named(tta, runtime_of(run))


def runtime_of(run: Runner) -> str:
    """The runtime a runner made here runs on: ``torch``, ``onnxruntime`` or ``openvino``."""
    return getattr(run, "runtime", "unknown")


def _named(run: Runner, runtime: str) -> Runner:
    run.runtime = runtime
    return run
