"""Copy the registry's champions into BentoML's model store, so ``bentoml build`` packs them, and back.

A built Bento (or its container) then serves without reaching the registry; when the registry
is reachable at run time, the service still follows its champion alias. A torch-free Bento
whose registry is empty (a container on a fresh volume) registers its bundled pair there
(``register_bundled``), so feedback can update it online as anywhere else.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import bentoml
import mlflow

from infantino.embeddings import EmbeddingSet
from registry.store import CHAMPION, EMBEDDINGS_DIR, ONNX_TAG, REPLAY_FILE, VALIDATION_FILE, ModelRegistry, RegistryError

BUNDLED_ONNX = "backbone.onnx"  # beside the backbone's mlflow_model: what a Bento without torch serves
BUNDLED_EMBEDDINGS = EMBEDDINGS_DIR  # beside the head's mlflow_model: its replay and validation embeddings


def bundle_champions(registry: ModelRegistry) -> list[str]:
    """Store champion head + its backbone as ``<registered name>:v<version>``; returns the tags.

    The backbone is stored twice: as its MLflow model (torch, for a GPU image) and as its ONNX
    export (``backbone.onnx``, with the preprocessing in the metadata tags), which is all a
    torch-free Bento needs. A version logged without an ONNX export is exported here (needs torch).
    The head is stored with its replay and validation embeddings, which online updates need.
    """
    head = registry.version_info("head", CHAMPION)
    backbone = registry.version_info("backbone", head.tags["backbone_version"])
    tags = []
    for kind, mv in (("backbone", backbone), ("head", head)):
        name = registry.names[kind]
        tag = f"{name}:v{mv.version}"
        try:
            existing = bentoml.models.get(tag)
            if (Path(existing.path) / (BUNDLED_EMBEDDINGS if kind == "head" else BUNDLED_ONNX)).exists():
                tags.append(tag)
                continue  # already bundled
            bentoml.models.delete(tag)  # bundled before ONNX exports (embeddings) were: bundle it again
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
                if kind == "head":
                    replay, validation = registry.load_embeddings(registry.load_head(mv.version))
                    (Path(bm.path) / BUNDLED_EMBEDDINGS).mkdir()
                    replay.save(Path(bm.path) / BUNDLED_EMBEDDINGS / REPLAY_FILE)
                    validation.save(Path(bm.path) / BUNDLED_EMBEDDINGS / VALIDATION_FILE)
        tags.append(tag)
    return tags


def bundled_pair(names: dict[str, str]):
    """The bundled (backbone, head) BentoML models of these registered names, or None when this
    process has no complete pair (ONNX export and embeddings included) to register."""
    try:
        backbone, head = (bentoml.models.get(f"{names[kind]}:latest") for kind in ("backbone", "head"))
    except bentoml.exceptions.NotFound:
        return None
    if not (Path(backbone.path) / BUNDLED_ONNX).exists() or not (Path(head.path) / BUNDLED_EMBEDDINGS).exists():
        return None
    if head.info.metadata["tags"].get("backbone_version") != backbone.info.metadata["version"]:
        return None  # not a pair
    return backbone, head


def register_bundled(registry: ModelRegistry) -> tuple[str, str]:
    """Register the bundled champion pair in ``registry`` as champion; returns the new (backbone, head)
    versions. The saved MLflow models, the ONNX export and the embeddings are logged as they are:
    no torch needed, which is why a torch-free Bento can start its registry this way."""
    pair = bundled_pair(registry.names)
    if pair is None:
        raise RegistryError(f"no complete bundled pair of {registry.names['backbone']} and {registry.names['head']} "
                            "(run `infantino bundle` with this version of InfantinO, then `bentoml build`)")
    backbone, head = pair
    b_meta, h_meta = backbone.info.metadata, head.info.metadata
    folder = Path(head.path) / BUNDLED_EMBEDDINGS
    with registry.start_run("register-bundled-model", tags={"kind": "bundled", "bundled_from": b_meta.get("tracking_uri", "")}):
        tags = {k: v for k, v in b_meta["tags"].items() if k != ONNX_TAG}  # that path was in the bundling registry's run
        bv = registry.register_saved("backbone", Path(backbone.path) / "mlflow_model", {**tags, "bundled_version": b_meta["version"]})
        registry.tag_version("backbone", bv, {ONNX_TAG: registry.log_onnx((Path(backbone.path) / BUNDLED_ONNX).read_bytes(), bv)})
        run_id = registry.log_embeddings(EmbeddingSet.load(folder / REPLAY_FILE), EmbeddingSet.load(folder / VALIDATION_FILE))
        hv = registry.register_saved("head", Path(head.path) / "mlflow_model",
                                     {**h_meta["tags"], "bundled_version": h_meta["version"], "backbone_version": bv,
                                      "embeddings_run_id": run_id})
    registry.promote("backbone", bv)
    registry.promote("head", hv)
    return bv, hv


def _backbone_onnx(registry: ModelRegistry, version: str) -> bytes:
    loaded = registry.load_backbone_onnx(version)
    if loaded is not None:
        return loaded.onnx
    from backbones.runtime import export_onnx

    loaded = registry.load_backbone(version)
    return export_onnx(loaded.model, loaded.preprocessing.input_size)
