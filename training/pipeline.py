"""From a data path to registered, promoted models: the whole offline flow in one function.

load -> stratified split -> train backbone -> embed -> fit head -> evaluate -> register
(both models, with metrics, confusion matrix, tags) -> promote to champion.

Under torchrun (``torchrun --nproc_per_node N infantino train ...``) every process runs this:
they train one model together (training/distributed.py), each embeds its slice of the training
and validation images, and rank 0 alone fits the head, evaluates, logs to MLflow and registers,
so the result is one registered pair, as from the single-process command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import mlflow
import numpy as np

from infantino import FER_CLASSES
from registry.store import ModelRegistry
from backbones.inference import embed_images
from backbones.model import BackboneError
from heads import Head, create_head
from heads.domain import class_shares
from heads.feedback import FeedbackHead
from heads.mlp import MLPHead
from infantino.embeddings import EmbeddingSet
from infantino.machine import machine_info
from training.adapt import classifier_proba
from training.augment import occlude_lower_face
from training.data import LabelledImages, load_dataset, stratified_split
from training import distributed
from training.evaluate import classification_metrics, save_confusion_matrix
from training.trainer import TrainConfig, train_backbone

log = logging.getLogger(__name__)
REPLAY_SAMPLE = 4000
# The head's offline fit stops when this share of the training embeddings (never the validation
# split) stops improving: fitted to convergence on faces the backbone has learned, it was
# overconfident and 1 point less accurate on FER2013 validation (heads/mlp.py).
HEAD_HOLDOUT = 0.1


@dataclass
class TrainResult:
    backbone_version: str
    head_version: str
    metrics: dict[str, float]
    run_id: str
    skipped: int


def evaluate_pair(backbone, head, data: LabelledImages, prep, classes: list[str], prefix: str = "val_",
                  tta: str = "none") -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of backbone+head on ``data``, on clear and on lower-face-occluded images (``tta``: test-time views)."""
    emb = embed_images(backbone, data.x, prep, progress="embedding (evaluation)", tta=tta)
    occluded = embed_images(backbone, data.x, prep, transform=occlude_lower_face, tta=tta)
    metrics, probs = score_pair(head, emb, occluded, data.y, classes, prefix)
    return metrics, probs, emb


def score_pair(head, emb: np.ndarray, occluded_emb: np.ndarray, y: np.ndarray, classes: list[str],
               prefix: str = "val_") -> tuple[dict, np.ndarray]:
    """evaluate_pair's metrics from embeddings already made (of the clear and the occluded images)."""
    probs = head.predict_proba(emb)
    metrics = classification_metrics(probs, y, classes, prefix)
    occluded = head.predict_proba(occluded_emb)
    metrics[f"{prefix}occluded_accuracy"] = float(np.mean(occluded.argmax(1) == y))
    return metrics, probs


def teacher_probabilities(registry: ModelRegistry, versions_or_aliases: str | None, cfg: TrainConfig, train: LabelledImages,
                          tta: str, say=print) -> np.ndarray:
    """The teacher's answer for each training image: a registered backbone's training classifier
    on its embedding averaged over the ``tta`` views (as the service's INFANTINO_TTA), or, for a
    comma-separated list of backbones, the mean of their answers (an ensemble of checkpoints).
    Test-time views and ensembles make the teacher better than one network alone (bench/tta.py) at
    many passes an image; distillation asks one pass to learn their answer."""
    names = [name.strip() for name in (versions_or_aliases or "").split(",") if name.strip()]
    if not names:
        raise BackboneError(f"distill_weight {cfg.distill_weight} needs a teacher: name a registered backbone (--distill-from)")
    answers = []
    for name in names:
        teacher = registry.load_backbone(name)
        if teacher.preprocessing.input_size != cfg.image_size or teacher.preprocessing.grayscale != cfg.grayscale:
            raise BackboneError(f"--distill-from {name}: that backbone reads {teacher.preprocessing}; this run's images are "
                                f"{cfg.preprocessing}. Use the same --image-size and colour mode.")
        say(f"teacher: {registry.names['backbone']} v{teacher.version} ({name}), {tta} views of {len(train)} images", flush=True)
        # Under torchrun each process runs the teacher on its share of the images (all rows everywhere).
        emb = distributed.embed_sharded(teacher.model, train.x, teacher.preprocessing, progress="teacher", tta=tta)
        answers.append(classifier_proba(teacher.model, emb))
    return np.mean(answers, axis=0)


def _initial_backbone(registry: ModelRegistry, version_or_alias: str, cfg: TrainConfig, say=print):
    loaded = registry.load_backbone(version_or_alias)
    if loaded.preprocessing != cfg.preprocessing or loaded.tags.get("backbone_name") not in (None, cfg.backbone):
        raise BackboneError(
            f"--init-from {version_or_alias}: that backbone is {loaded.tags.get('backbone_name')} with {loaded.preprocessing}; "
            f"this run asks for {cfg.backbone} with {cfg.preprocessing}. Use the same --backbone, --image-size and colour mode."
        )
    say(f"starting from {registry.names['backbone']} v{loaded.version} ({version_or_alias})", flush=True)
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
    distill_from: str | None = None,
    distill_tta: str = "flip+shift",
) -> TrainResult:
    """``init_from`` (a backbone version or alias, e.g. ``champion``) continues training a registered
    backbone under a fresh schedule instead of starting from scratch or from timm's weights.
    ``distill_from`` (with ``cfg.distill_weight``) names the registered backbone whose training
    classifier, on its ``distill_tta`` views of each training image, is the teacher (``teacher_probabilities``).

    Under torchrun every process calls this with its own ``registry`` object (only rank 0 uses it
    to write) and every process gets rank 0's result back.
    """
    with distributed.session(cfg.device) as d:
        return _train_and_register(d, data_path, cfg, registry, classes, limit, out_dir, resume, promote, crop_faces, init_from,
                                   distill_from, distill_tta)


def fit_head(embeddings: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0, classifier=None) -> Head:
    """The head a training run registers, on its backbone's training embeddings (bench/recipes.py scores recipes with it).

    With ``classifier`` (the backbone's training classifier, a torch Linear): the MLP answers as that
    classifier does (MLPHead.from_linear: calibrated where a refit is overconfident, bench/head_init.py);
    without: an MLP fitted on the embeddings, stopped early on a held-out tenth of them.
    """
    if classifier is None:
        base = create_head("mlp", random_state=seed, validation_fraction=HEAD_HOLDOUT)
        return create_head(random_state=seed, base=base).fit(embeddings, y, classes=np.arange(n_classes))
    base = MLPHead.from_linear(classifier.weight.detach().cpu().numpy(), classifier.bias.detach().cpu().numpy(), random_state=seed)
    shares = class_shares(np.asarray(y), n_classes)  # as FeedbackHead.fit keeps them
    return FeedbackHead.around(base, EmbeddingSet(embeddings, y), random_state=seed, training_prior=tuple(float(p) for p in shares))


def _train_and_register(d: distributed.Dist, data_path, cfg: TrainConfig, registry: ModelRegistry, classes, limit, out_dir,
                        resume: bool, promote: bool, crop_faces, init_from, distill_from=None, distill_tta="flip+shift") -> TrainResult:
    started = time.time()
    if cfg.head not in ("refit", "classifier"):
        raise ValueError(f"head must be refit or classifier, got {cfg.head!r}")
    say = print if d.is_main else (lambda *a, **k: None)
    if d.enabled and d.is_main:
        say(f"distributed training: {d.world_size} processes ({'nccl' if distributed.device_for(cfg.device, d).type == 'cuda' else 'gloo'})", flush=True)
    initial = _initial_backbone(registry, init_from, cfg, say) if init_from else None
    data = load_dataset(data_path, cfg.image_size, cfg.grayscale, classes, limit=limit, seed=cfg.seed, crop_faces=crop_faces,
                        face_margin=cfg.face_margin)
    say(f"loaded {len(data)} images in {len(data.classes)} classes from {data_path} "
        f"(counts {dict(zip(data.classes, data.class_counts().tolist()))}; skipped {data.skipped} unreadable)", flush=True)
    train, val = stratified_split(data, cfg.val_fraction, cfg.seed)
    teacher_proba = teacher_probabilities(registry, distill_from, cfg, train, distill_tta, say) if cfg.distill_weight else None
    out_dir = Path(out_dir or registry.settings.storage.home / "runs" / f"{registry.task}-{cfg.backbone}")
    if d.is_main:
        parent_backbone, parent_head = registry.champion_version("backbone"), registry.champion_version("head")

    # Rank 0 runs the MLflow run and registers; the other processes train and embed with it.
    # The machine goes with the run, so the shipped model's model.json can name where it trained.
    tags = {"kind": "train", "machine": json.dumps(machine_info())}
    with registry.start_run(f"train-{cfg.backbone}", tags=tags) if d.is_main else contextlib.nullcontext() as run:
        if d.is_main:
            mlflow.log_params({**cfg.to_params(), "data": str(data_path), "limit": limit, "n_train": len(train), "n_val": len(val),
                               "crop_faces": crop_faces or "none", "init_from": init_from or "none",
                               "distill_from": distill_from or "none", "distill_tta": distill_tta if distill_from else "none", **({"world_size": d.world_size} if d.enabled else {})})
            mlflow.log_metric("skipped_images", data.skipped)
        backbone = train_backbone(
            cfg, train, val, out_dir, resume=resume, initial=initial, teacher_proba=teacher_proba,
            on_epoch=(lambda epoch, m: mlflow.log_metrics({f"epoch_{k}": v for k, v in m.items()}, step=epoch)) if d.is_main else None,
        )
        prep = cfg.preprocessing
        # Each process embeds its slice (all of it when alone); every process gets every row.
        train_emb = distributed.embed_sharded(backbone, train.x, prep, progress="embedding (train)")
        val_emb = distributed.embed_sharded(backbone, val.x, prep, progress="embedding (evaluation)")
        val_occluded = distributed.embed_sharded(backbone, val.x, prep, transform=occlude_lower_face)
        if not d.is_main:
            return TrainResult(**distributed.broadcast_object(None))
        head = fit_head(train_emb, train.y, len(data.classes), cfg.seed, backbone.classifier if cfg.head == "classifier" else None)
        metrics, probs = score_pair(head, val_emb, val_occluded, val.y, data.classes)
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
    return TrainResult(**distributed.broadcast_object(asdict(TrainResult(bv, hv, metrics, run.info.run_id, data.skipped))))
