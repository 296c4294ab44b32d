"""The backbone service's runtimes: ONNX Runtime must give the embeddings torch gives."""

from __future__ import annotations

import numpy as np
import pytest

from infantino.images import Preprocessing
from registry.store import LoadedBackbone
from training.model import create_backbone, for_inference


@pytest.mark.parametrize("size, grayscale", [(48, True), (40, False)])
def test_onnxruntime_matches_torch(size, grayscale):
    pytest.importorskip("onnxruntime")
    from infantino.images import normalise
    from service.backbone import onnx_session, runner

    prep = Preprocessing(input_size=size, grayscale=grayscale)
    model = for_inference(create_backbone("test_efficientnet", 3))
    loaded = LoadedBackbone(model, "1", prep, ["a", "b", "c"], {})
    images = np.random.default_rng(0).integers(0, 255, (5, size, size, 3), dtype=np.uint8)
    by_torch, by_onnx = runner(loaded, "torch")(images), runner(loaded, "onnxruntime")(images)
    assert by_onnx.shape == by_torch.shape == (5, 64)
    np.testing.assert_allclose(by_onnx, by_torch, atol=1e-4, rtol=1e-3)
    assert runner(loaded, "onnxruntime")(images[:1]).shape == (1, 64)  # any batch size
    session = onnx_session(model, size)  # what the onnxruntime runner runs: a real ONNX Runtime session
    assert [i.name for i in session.get_inputs()] == ["x"] and session.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_allclose(session.run(None, {"x": normalise(images, prep)})[0], by_torch, atol=1e-4, rtol=1e-3)


def test_auto_falls_back_to_torch_when_onnx_fails(monkeypatch, caplog):
    import service.backbone as backbone_service

    def broken(*_):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(backbone_service, "onnx_session", broken)
    prep = Preprocessing(input_size=48)
    model = for_inference(create_backbone("test_efficientnet", 3))
    loaded = LoadedBackbone(model, "7", prep, ["a", "b", "c"], {})
    images = np.random.default_rng(1).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    from training.model import embed_images

    np.testing.assert_array_equal(backbone_service.runner(loaded, "auto")(images), embed_images(model, images, prep))
    assert "running it with torch" in caplog.text
    with pytest.raises(RuntimeError, match="no exporter"):  # asked for explicitly: no silent fallback
        backbone_service.runner(loaded, "onnxruntime")


def test_unknown_runtime_is_refused(monkeypatch):
    from pydantic import ValidationError

    from infantino.settings import Settings

    monkeypatch.setenv("INFANTINO_BACKBONE_RUNTIME", "tensorrt")
    with pytest.raises(ValidationError, match="backbone_runtime"):
        Settings()
