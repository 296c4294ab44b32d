"""Copy the registry's champions into BentoML's model store, so ``bentoml build`` packs them.

A built Bento (or its container) then serves without reaching the registry; when the registry
is reachable at run time, the service still follows its champion alias.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import bentoml
import mlflow

from registry.store import CHAMPION, ModelRegistry


BUNDLED_ONNX = "backbone.onnx"  # beside the backbone's mlflow_model: what a Bento without torch serves


def bundle_champions(registry: ModelRegistry) -> list[str]:
    """Store champion head + its backbone as ``<registered name>:v<version>``; returns the tags.

    The backbone is stored twice: as its MLflow model (torch, for a GPU image) and as its ONNX
    export (``backbone.onnx``, with the preprocessing in the metadata tags), which is all a
    torch-free Bento needs. A version logged without an ONNX export is exported here (needs torch).
    """
    head = registry.version_info("head", CHAMPION)
    backbone = registry.version_info("backbone", head.tags["backbone_version"])
    tags = []
    for kind, mv in (("backbone", backbone), ("head", head)):
        name = registry.names[kind]
        tag = f"{name}:v{mv.version}"
        try:
            existing = bentoml.models.get(tag)
            if kind == "head" or (Path(existing.path) / BUNDLED_ONNX).exists():
                tags.append(tag)
                continue  # already bundled
            bentoml.models.delete(tag)  # bundled before ONNX exports were: bundle it again
        except bentoml.exceptions.NotFound:
            pass
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=tmp)
            metadata = {"version": str(mv.version), "tags": dict(mv.tags), "tracking_uri": registry.display_uri}
            onnx = _backbone_onnx(registry, str(mv.version)) if kind == "backbone" else None
            with bentoml.models.create(tag, labels={"kind": kind, "task": registry.task}, metadata=metadata) as bm:
                shutil.copytree(local, Path(bm.path) / "mlflow_model")
                if onnx is not None:
                    (Path(bm.path) / BUNDLED_ONNX).write_bytes(onnx)
        tags.append(tag)
    return tags


def _backbone_onnx(registry: ModelRegistry, version: str) -> bytes:
    loaded = registry.load_backbone_onnx(version)
    if loaded is not None:
        return loaded.onnx
    from backbones.runtime import export_onnx

    loaded = registry.load_backbone(version)
    return export_onnx(loaded.model, loaded.preprocessing.input_size)
