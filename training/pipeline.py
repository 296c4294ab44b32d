"""From a data path to registered, promoted models: the whole offline flow in one function.

load -> stratified split -> train backbone -> embed -> fit head -> evaluate -> register
(both models, with metrics, confusion matrix, tags) -> promote to champion.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlflow
import numpy as np

from infantino import FER_CLASSES
from registry.store import ModelRegistry
from backbones.inference import embed_images
from backbones.model import BackboneError
from heads import create_head
from infantino.embeddings import EmbeddingSet
from training.augment import occlude_lower_face
from training.data import LabelledImages, load_dataset, stratified_split
from training.evaluate import classification_metrics, save_confusion_matrix
from training.trainer import TrainConfig, train_backbone

log = logging.getLogger(__name__)
REPLAY_SAMPLE = 4000


@dataclass
class TrainResult:
    backbone_version: str
    head_version: str
    metrics: dict[str, float]
    run_id: str
    skipped: int


def evaluate_pair(backbone, head, data: LabelledImages, prep, classes: list[str], prefix: str = "val_") -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of backbone+head on ``data``, on clear and on lower-face-occluded images."""
    emb = embed_images(backbone, data.x, prep, progress="embedding (evaluation)")
    probs = head.predict_proba(emb)
    metrics = classification_metrics(probs, data.y, classes, prefix)
    occluded = head.predict_proba(embed_images(backbone, data.x, prep, transform=occlude_lower_face))
    metrics[f"{prefix}occluded_accuracy"] = float(np.mean(occluded.argmax(1) == data.y))
    return metrics, probs, emb


def _initial_backbone(registry: ModelRegistry, version_or_alias: str, cfg: TrainConfig):
    loaded = registry.load_backbone(version_or_alias)
    if loaded.preprocessing != cfg.preprocessing or loaded.tags.get("backbone_name") not in (None, cfg.backbone):
        raise BackboneError(
            f"--init-from {version_or_alias}: that backbone is {loaded.tags.get('backbone_name')} with {loaded.preprocessing}; "
            f"this run asks for {cfg.backbone} with {cfg.preprocessing}. Use the same --backbone, --image-size and colour mode."
        )
    print(f"starting from {registry.names['backbone']} v{loaded.version} ({version_or_alias})", flush=True)
    return loaded.model.train()


def train_and_register(
    data_path: str | Path,
    cfg: TrainConfig,
    registry: ModelRegistry,
    classes: Sequence[str] | None = FER_CLASSES,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    promote: bool = True,
    crop_faces: str | None = None,
    init_from: str | None = None,
) -> TrainResult:
    """``init_from`` (a backbone version or alias, e.g. ``champion``) continues training a registered
    backbone under a fresh schedule instead of starting from scratch or from timm's weights."""
    started = time.time()
    initial = _initial_backbone(registry, init_from, cfg) if init_from else None
    data = load_dataset(data_path, cfg.image_size, cfg.grayscale, classes, limit=limit, seed=cfg.seed, crop_faces=crop_faces,
                        face_margin=cfg.face_margin)
    print(f"loaded {len(data)} images in {len(data.classes)} classes from {data_path} "
          f"(counts {dict(zip(data.classes, data.class_counts().tolist()))}; skipped {data.skipped} unreadable)", flush=True)
    train, val = stratified_split(data, cfg.val_fraction, cfg.seed)
    out_dir = Path(out_dir or registry.settings.storage.home / "runs" / f"{registry.task}-{cfg.backbone}")
    parent_backbone, parent_head = registry.champion_version("backbone"), registry.champion_version("head")

    with registry.start_run(f"train-{cfg.backbone}", tags={"kind": "train"}) as run:
        mlflow.log_params({**cfg.to_params(), "data": str(data_path), "limit": limit, "n_train": len(train), "n_val": len(val),
                           "crop_faces": crop_faces or "none"})
        mlflow.log_metric("skipped_images", data.skipped)
        backbone = train_backbone(
            cfg, train, val, out_dir, resume=resume, initial=initial,
            on_epoch=lambda epoch, m: mlflow.log_metrics({f"epoch_{k}": v for k, v in m.items()}, step=epoch),
        )
        prep = cfg.preprocessing
        train_emb = embed_images(backbone, train.x, prep, progress="embedding (train)")
        head = create_head("mlp", random_state=cfg.seed).fit(train_emb, train.y, classes=np.arange(len(data.classes)))
        metrics, probs, val_emb = evaluate_pair(backbone, head, val, prep, data.classes)
        metrics["train_seconds"] = time.time() - started
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            png = save_confusion_matrix(probs, val.y, data.classes, Path(tmp) / "confusion_matrix.png")
            mlflow.log_artifact(str(png))
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, indent=2))
            mlflow.log_artifact(str(Path(tmp) / "metrics.json"))
        tags = {
            "data_fingerprint": data.fingerprint(), "data": str(data_path), "backbone_name": cfg.backbone,
            "val_accuracy": f"{metrics['val_accuracy']:.4f}", "val_macro_f1": f"{metrics['val_macro_f1']:.4f}",
        }
        bv = registry.log_backbone(backbone, prep, data.classes, {**tags, "parent_version": parent_backbone or ""})
        hv = registry.log_head(
            head, data.classes, bv, {**tags, "parent_version": parent_head or "", "origin": "train"},
            replay=EmbeddingSet(train_emb, train.y).sample(REPLAY_SAMPLE, cfg.seed), validation=EmbeddingSet(val_emb, val.y),
        )
        if promote:
            registry.promote("backbone", bv)
            registry.promote("head", hv)
    print(f"registered {registry.names['backbone']} v{bv} and {registry.names['head']} v{hv}"
          f"{' as champion' if promote else ''}: val_accuracy={metrics['val_accuracy']:.4f} "
          f"macro_f1={metrics['val_macro_f1']:.4f} ece={metrics['val_ece']:.4f} occluded={metrics['val_occluded_accuracy']:.4f}", flush=True)
    return TrainResult(bv, hv, metrics, run.info.run_id, data.skipped)
