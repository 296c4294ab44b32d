"""The model that ships inside the project, so a fresh machine serves a real one.

``export_champion`` writes the registry's champion pair to ``registry/default_model/``:
fp16 safetensors weights, the skops head, the replay/validation embeddings and a
``model.json`` with label set, preprocessing, metrics, training time, data fingerprint, the command
that produced it and the machine it trained on. ``register_shipped`` puts them into an (empty) registry as champion;
``shipped_serving_head`` and ``shipped_backbone`` load the same models straight from the files,
which the service serves as version ``SHIPPED_VERSION`` when no registry can be reached.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from heads import trusted_types
from heads.feedback import FeedbackHead
from heads.mlp import MLPHead
from infantino.embeddings import EmbeddingSet
from infantino.images import Preprocessing
from infantino.machine import machine_info
from registry.store import CHAMPION, ModelRegistry

DEFAULT_DIR = Path(__file__).resolve().parent / "default_model"
# The version the shipped files are served as when they do not come from the registry
# (registered versions start at 1, and the wire format needs a number).
SHIPPED_VERSION = "0"


def export_champion(registry: ModelRegistry, out_dir: Path = DEFAULT_DIR, command: str = "", extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    head = registry.load_head(CHAMPION)
    backbone = registry.load_backbone(head.backbone_version)
    replay, validation = registry.load_embeddings(head)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in backbone.model.state_dict().items()}
    save_file(state, str(out_dir / "backbone.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{registry.names['head']}/{head.version}", dst_path=tmp)
        shutil.copy(Path(local) / "model.skops", out_dir / "head.skops")
    np.savez_compressed(out_dir / "embeddings.npz", replay_x=replay.x.astype(np.float16), replay_y=replay.y,
                        val_x=validation.x.astype(np.float16), val_y=validation.y)
    bv = registry.version_info("backbone", backbone.version)
    metrics = registry.run_metrics(bv.run_id) if bv.run_id else {}
    # runs from before the training run noted its machine: the machine exporting it (the same one, usually)
    machine = (registry.run_tags(bv.run_id) if bv.run_id else {}).get("machine")
    meta = {
        "task": registry.task,
        "backbone": backbone.tags.get("backbone_name"),
        "embedding_dim": int(head.model.n_features_in_),
        "classes": head.classes,
        "preprocessing": backbone.preprocessing.to_dict(),
        "data": backbone.tags.get("data"),
        "data_fingerprint": backbone.tags.get("data_fingerprint"),
        "metrics": {k: v for k, v in metrics.items() if k.startswith("val_") or k == "train_seconds"},
        "command": command,
        "machine": json.loads(machine) if machine else {**machine_info(), "noted": "at export"},
        "source": {"backbone_version": backbone.version, "head_version": head.version},
        **(extra or {}),
    }
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def shipped_meta(model_dir: Path = DEFAULT_DIR) -> dict:
    """model.json: label set, preprocessing, metrics, data fingerprint, the commands that trained it."""
    return json.loads((model_dir / "model.json").read_text())


def has_shipped(task: str, model_dir: Path = DEFAULT_DIR) -> bool:
    """Whether a shipped model exists for ``task``."""
    return (model_dir / "model.json").exists() and shipped_meta(model_dir).get("task") == task


def shipped_head(model_dir: Path = DEFAULT_DIR):
    """The shipped head (a heads.Head)."""
    import skops.io

    from sklearn.neural_network import MLPClassifier

    head = skops.io.load(model_dir / "head.skops", trusted=trusted_types())
    if isinstance(head, MLPClassifier):  # a head exported before heads/ existed
        head = MLPHead.from_mlp(head)
    return head


def shipped_backbone(model_dir: Path = DEFAULT_DIR):
    """The shipped backbone network (torch, float32, eval mode), built from its safetensors weights."""
    from safetensors.torch import load_file

    from backbones.model import create_backbone

    meta = shipped_meta(model_dir)
    model = create_backbone(meta["backbone"], len(meta["classes"]), embedding_dim=meta["embedding_dim"],
                            **meta.get("backbone_args", {}))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(model_dir / "backbone.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval()


def shipped_embeddings(model_dir: Path = DEFAULT_DIR) -> tuple[EmbeddingSet, EmbeddingSet]:
    """The replay and validation embeddings shipped with the head."""
    with np.load(model_dir / "embeddings.npz") as npz:
        return (EmbeddingSet(npz["replay_x"].astype(np.float32), npz["replay_y"]),
                EmbeddingSet(npz["val_x"].astype(np.float32), npz["val_y"]))


def shipped_serving_head(model_dir: Path = DEFAULT_DIR, replay: EmbeddingSet | None = None):
    """The shipped head as it is registered and served: with the memory online learning needs."""
    head = shipped_head(model_dir)
    if not isinstance(head, FeedbackHead):  # a bare offline head: give it the memory online learning needs
        head = FeedbackHead.around(head, replay if replay is not None else shipped_embeddings(model_dir)[0])
    return head


def shipped_tags(model_dir: Path = DEFAULT_DIR) -> dict[str, str]:
    """The version tags the shipped pair is registered with."""
    meta = shipped_meta(model_dir)
    return {"data_fingerprint": meta.get("data_fingerprint") or "", "data": meta.get("data") or "",
            "backbone_name": meta["backbone"], "origin": "shipped", "parent_version": "",
            "val_accuracy": f"{meta.get('metrics', {}).get('val_accuracy', float('nan')):.4f}"}


def register_shipped(registry: ModelRegistry, model_dir: Path = DEFAULT_DIR) -> tuple[str, str]:
    """Register the shipped backbone + head as champion; returns their versions.

    Not exclusive by itself: ``infantino bootstrap`` and the service call it through
    ``service.models.register_shipped_once``, which holds a lease in the shared store.
    """
    import torch

    meta = shipped_meta(model_dir)
    prep = Preprocessing.from_dict(meta["preprocessing"])
    model = shipped_backbone(model_dir)
    replay, validation = shipped_embeddings(model_dir)
    head = shipped_serving_head(model_dir, replay)
    tags = shipped_tags(model_dir)
    with registry.start_run("register-shipped-model", tags={"kind": "shipped"}):
        mlflow.log_metrics({k: float(v) for k, v in meta.get("metrics", {}).items()})
        mlflow.log_dict(meta, "model.json")
        with torch.inference_mode():
            bv = registry.log_backbone(model, prep, meta["classes"], tags)
        hv = registry.log_head(head, meta["classes"], bv, tags, replay=replay, validation=validation)
    registry.promote("backbone", bv)
    registry.promote("head", hv)
    return bv, hv
