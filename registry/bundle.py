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


def bundle_champions(registry: ModelRegistry) -> list[str]:
    """Store champion head + its backbone as ``<registered name>:v<version>``; returns the tags."""
    head = registry.version_info("head", CHAMPION)
    backbone = registry.version_info("backbone", head.tags["backbone_version"])
    tags = []
    for kind, mv in (("backbone", backbone), ("head", head)):
        name = registry.names[kind]
        tag = f"{name}:v{mv.version}"
        try:
            bentoml.models.get(tag)
            tags.append(tag)
            continue  # already bundled
        except bentoml.exceptions.NotFound:
            pass
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=tmp)
            metadata = {"version": str(mv.version), "tags": dict(mv.tags), "tracking_uri": registry.display_uri}
            with bentoml.models.create(tag, labels={"kind": kind, "task": registry.task}, metadata=metadata) as bm:
                shutil.copytree(local, Path(bm.path) / "mlflow_model")
        tags.append(tag)
    return tags
