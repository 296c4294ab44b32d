"""The backbone runtimes: ONNX Runtime and OpenVINO must give the embeddings torch gives."""

from __future__ import annotations

import numpy as np
import pytest

from backbones import runtime
from backbones.inference import embed_images, for_inference
from backbones.model import create_backbone
from infantino.images import Preprocessing, normalise


def served_width(model, size: int) -> int:
    """A served row's width: the 64-d embedding and the pooled maps of the last two stages."""
    import torch

    with torch.inference_mode():
        _, stages = model.features.forward_intermediates(torch.zeros(1, 3, size, size), indices=2)
    return 64 + sum(s.shape[1] for s in stages)


@pytest.mark.parametrize("size, grayscale", [(48, True), (40, False)])
def test_onnxruntime_matches_torch(size, grayscale):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    prep = Preprocessing(input_size=size, grayscale=grayscale)
    model = for_inference(create_backbone("test_efficientnet", 3))
    images = np.random.default_rng(0).integers(0, 255, (5, size, size, 3), dtype=np.uint8)
    by_torch = runtime.create_runner(prep, "torch", model=model)(images)
    by_onnx = runtime.create_runner(prep, "onnxruntime", model=model)(images)
    width = served_width(model, size)
    assert by_onnx.shape == by_torch.shape == (5, width) and width > 64  # served rows: the embedding, then the stage features
    np.testing.assert_allclose(by_onnx, by_torch, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(by_torch[:, :64], embed_images(model, images, prep), atol=1e-5)  # what the head reads comes first
    onnx = runtime.export_onnx(model, size)
    assert runtime.create_runner(prep, "onnxruntime", onnx=onnx)(images[:1]).shape == (1, width)  # any batch size, no torch model
    session = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])  # what the runner runs
    assert [i.name for i in session.get_inputs()] == ["x"]
    np.testing.assert_allclose(session.run(None, {"x": normalise(images, prep)})[0], by_torch, atol=1e-4, rtol=1e-3)


def test_openvino_matches_torch_and_serves_threads():
    """OpenVINO, the CPU default (bfloat16 where the CPU has it: close, not equal), on any batch size, from several threads at once."""
    pytest.importorskip("openvino")
    from concurrent.futures import ThreadPoolExecutor

    prep = Preprocessing(input_size=48, grayscale=True)
    model = for_inference(create_backbone("test_efficientnet", 3))
    images = np.random.default_rng(2).integers(0, 255, (6, 48, 48, 3), dtype=np.uint8)
    by_torch = runtime.create_runner(prep, "torch", model=model)(images)
    run = runtime.create_runner(prep, "openvino", onnx=runtime.export_onnx(model, 48))
    by_openvino = run(images)
    assert by_openvino.shape == (6, served_width(model, 48)) and by_openvino.dtype == np.float32
    cosine = (by_openvino * by_torch).sum(1) / np.linalg.norm(by_openvino, axis=1) / np.linalg.norm(by_torch, axis=1)
    assert cosine.min() > 0.99, cosine
    with ThreadPoolExecutor(4) as pool:  # one infer request shared: each caller must get its own images' answer
        answers = list(pool.map(lambda i: run(images[i : i + 1]), [i % 6 for i in range(24)]))
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer[0], run(images[i % 6 : i % 6 + 1])[0], rtol=1e-5, atol=1e-6)


def test_auto_runs_the_export_on_openvino_when_installed_and_onnxruntime_if_it_cannot(monkeypatch, caplog):
    pytest.importorskip("openvino")
    prep = Preprocessing(input_size=48)
    model = for_inference(create_backbone("test_efficientnet", 3))
    onnx = runtime.export_onnx(model, 48)
    assert runtime.runtime_of(runtime.create_runner(prep, "auto", onnx=onnx)) == "openvino"
    assert runtime.runtime_of(runtime.create_runner(prep, "onnxruntime", onnx=onnx)) == "onnxruntime"
    assert runtime.runtime_of(runtime.with_tta(runtime.create_runner(prep, "torch", model=model), "flip")) == "torch"

    def cannot_compile(*_):
        raise RuntimeError("an operation OpenVINO lacks")

    monkeypatch.setattr(runtime, "openvino_runner", cannot_compile)
    assert runtime.runtime_of(runtime.create_runner(prep, "auto", onnx=onnx)) == "onnxruntime"
    assert "running it on ONNX Runtime" in caplog.text
    with pytest.raises(RuntimeError, match="OpenVINO lacks"):  # asked for explicitly: no silent fallback
        runtime.create_runner(prep, "openvino", onnx=onnx)


def test_auto_falls_back_to_torch_when_onnx_fails(monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(runtime, "export_onnx", broken)
    prep = Preprocessing(input_size=48)
    model = for_inference(create_backbone("test_efficientnet", 3))
    images = np.random.default_rng(1).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(runtime.create_runner(prep, "auto", model=model)(images), embed_images(model, images, prep, stage_features=True))
    assert "running the backbone with torch" in caplog.text
    with pytest.raises(RuntimeError, match="no exporter"):  # asked for explicitly: no silent fallback
        runtime.create_runner(prep, "onnxruntime", model=model)


def test_unknown_runtime_is_refused(monkeypatch):
    from pydantic import ValidationError

    from infantino.settings import Settings

    monkeypatch.setenv("INFANTINO_BACKBONE_RUNTIME", "tensorrt")
    with pytest.raises(ValidationError, match="backbone_runtime"):
        Settings()
    with pytest.raises(ValueError, match="runtime"):
        runtime.create_runner(Preprocessing(), "tensorrt", model=create_backbone("test_efficientnet", 3))


def test_test_time_views_and_their_mean():
    """flip: the image and its mirror; flip+shift: 10 views; with_tta averages the runner over them."""
    from backbones.runtime import with_tta
    from backbones.views import augmented_views

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert len(augmented_views(images, "none")) == 1
    flip = augmented_views(images, "flip")
    assert len(flip) == 2 and np.array_equal(flip[1], images[:, :, ::-1])
    views = augmented_views(images, "flip+shift")
    assert len(views) == 10 and all(v.shape == images.shape for v in views)
    with pytest.raises(ValueError, match="none"):
        augmented_views(images, "rotate")

    def run(x):  # a stand-in runner: the mean pixel of each image, as a 1-d "embedding"
        return x.reshape(len(x), -1).mean(1, keepdims=True).astype(np.float32)

    expected = np.mean([run(v) for v in views], axis=0)
    assert np.allclose(with_tta(run, "flip+shift")(images), expected)
    assert with_tta(run, "none") is run
