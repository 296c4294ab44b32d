"""Backbone adaptation: the champion's features fine-tuned from stored feedback images, gated, registered.

The online updater (online/updater.py) teaches the head on a fixed embedding; on a new domain
that barely moves accuracy, because the features do not separate the new domain's classes
(bench/feature_adaptation.py: the head alone -0.9 to +0.9 points on the infant feedback half,
the whole backbone fine-tuned gently +5.1 to +6.0, training/adapt.py). This job adapts the features:

stored feedback images and labels + a replay sample of the model's training data -> a fine-tune
-> its weights interpolated toward the champion's as far as one half of the training data's
validation split allows with confidence -> cross-fitted fine-tunes interpolated alike (each fold's items scored
by a model fine-tuned on the other folds) -> the online gate (online/gate.py: against the
lineage's offline-trained head on the same items, and on the other validation half) -> a new backbone version and a head version (the
fine-tuned classifier, as the feedback head's base) registered with lineage tags and the
verdict -> champion if the gate passed, else challenger.

Every worker follows the champion head and its backbone live; the updater re-embeds stored
feedback for the new backbone at its next run. ``infantino rollback`` restores the previous head
and with it the previous backbone (registry/store.py). Run it with ``infantino adapt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np

from backbones.inference import embed_images
from heads import configure_online, domain_memory
from heads.domain import DomainPriors, class_shares
from heads.feedback import memory_input
from infantino import EMBEDDING_DIM
from infantino.embeddings import EmbeddingSet
from infantino.images import open_image, to_model_array
from infantino.settings import OnlineSettings
from online.gate import evaluate_gate
from online.updater import crossfit_taught, fold_of
from registry.store import CHALLENGER, CHAMPION, ModelRegistry
from store import FeedbackStore
from training.adapt import (
    AdaptConfig,
    classifier_proba,
    fine_tune,
    interpolate,
    proba,
)
from training.data import LabelledImages, stratified_split
from training.pipeline import REPLAY_SAMPLE, fit_head

log = logging.getLogger(__name__)
ORIGIN = "feedback_adaptation"


class AdaptationError(RuntimeError):
    """The adaptation cannot run as asked (too little feedback with images, wrong data...)."""


class NothingNew(AdaptationError):
    """The champion or challenger was already adapted from exactly the stored feedback."""


@dataclass
class AdaptationReport:
    task: str
    head_version: str
    backbone_version: str
    parent_version: str
    parent_backbone_version: str
    promoted: bool
    verdict: str
    feedback_items: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    gate_codes: list[str] = field(default_factory=list)
    interpolation_weight: float | None = None  # the weight served: interpolate(original, fine-tune, w)

    def to_dict(self) -> dict:
        return asdict(self)


def adapt_from_feedback(registry: ModelRegistry, feedback: FeedbackStore, settings: OnlineSettings, training_data: LabelledImages,
                        cfg: AdaptConfig | None = None, val_fraction: float = 0.1, seed: int = 0, force: bool = False,
                        say=print) -> AdaptationReport:
    """Fine-tune the champion's backbone on all stored feedback with images; gate; register; promote.

    ``training_data``: the data the champion was trained on (its training split is replayed, its
    validation split is the gate's old-domain check), at the backbone's input size and colour mode.
    Raises ``NothingNew`` if the champion or challenger came from exactly these feedback items
    (unless ``force``): a scheduled run with nothing new returns at once.
    """
    started = time.time()
    cfg = cfg or AdaptConfig()
    champion = registry.load_head(CHAMPION)
    classes = champion.classes
    if list(training_data.classes) != list(classes):
        raise AdaptationError(f"the training data's classes {training_data.classes} are not the model's {classes}")
    backbone = registry.load_backbone(champion.backbone_version)
    prep = backbone.preprocessing
    items = [i for i in feedback.items(registry.task) if i.image and i.label in classes]
    if len(items) < settings.gate_min_items:
        raise AdaptationError(f"backbone adaptation needs at least {settings.gate_min_items} feedback items with images "
                              f"(gate_min_items); {len(items)} stored")
    fingerprint = hashlib.sha256("\n".join(sorted(i.id for i in items)).encode()).hexdigest()[:16]
    if not force:
        for alias in (CHAMPION, CHALLENGER):  # a scheduled job must not redo the same work every run
            version = registry.champion_version("head", alias)
            info = registry.version_info("head", version) if version else None
            if info is not None and info.tags.get("feedback_fingerprint") == fingerprint:
                raise NothingNew(f"head v{version} ({alias}) was already adapted from these {len(items)} feedback items; "
                                 "nothing new to learn (force to redo)")
    domains = [i.domain for i in items]  # as each item's client named it (heads/domain.py)
    x = np.stack([to_model_array(open_image(i.image, reduce_to=prep.input_size), prep.input_size, prep.grayscale) for i in items])
    y = np.array([classes.index(i.label) for i in items], np.int64)
    train, val = stratified_split(training_data, val_fraction, seed)
    # The interpolation weight is chosen on one half of the validation split, the gate judges on the
    # other: a check that chose the setting would overstate how safe it is.
    choose_val, gate_val = stratified_split(val, 0.5, seed)
    replay = train.subset(np.random.default_rng(seed).permutation(len(train))[: cfg.replay_size])

    # The reference: the lineage's offline-trained head on the champion's backbone, as the updater's gate.
    root_version = champion.tags.get("lineage_root") or champion.version
    root = registry.load_head(root_version).model
    original = backbone.model
    original_embeddings = EmbeddingSet(embed_images(original, x, prep, stage_features=True), y)  # served rows, as the champion reads them
    root_proba = root.predict_proba(original_embeddings.x)

    def val_right(model, data: LabelledImages, head=None) -> np.ndarray:
        """Which of ``data``'s faces the model gets right (its training classifier unless ``head``)."""
        emb = embed_images(model, data.x, prep)
        return (head.predict(emb) if head is not None else classifier_proba(model, emb).argmax(1)) == data.y

    say(f"fine-tuning {cfg.part} on all {len(items)} feedback images + {len(replay)} replayed", flush=True)
    tuned_fully = fine_tune(original, x, y, replay.x, replay.y, prep, cfg)
    weight = choose_interpolation(original, tuned_fully, cfg, val_right(original, choose_val, root),
                                  settings.gate_max_val_drop, lambda m: val_right(m, choose_val), say)
    tuned = interpolate(original, tuned_fully, weight)

    # The served head learns each named domain's class mix from the feedback (heads/domain.py); so
    # does each fold's model, from its folds only. Class shares of the training data: its split.
    training_prior = class_shares(train.y, len(classes))
    folds = np.array([fold_of(i.id, settings.gate_folds) for i in items])
    named = np.array(domains, dtype=object)
    crossfit = np.zeros((len(items), len(classes)))
    for k in np.unique(folds):
        rest = folds != k
        say(f"cross-fit fold {k + 1}/{settings.gate_folds}: fine-tuning on {int(rest.sum())} feedback images", flush=True)
        fold_model = interpolate(original, fine_tune(original, x[rest], y[rest], replay.x, replay.y, prep, cfg), weight)
        crossfit[~rest] = proba(fold_model, x[~rest], prep)
        if settings.update_domain_priors:
            crossfit[~rest] = DomainPriors(training_prior).fit(y[rest], list(named[rest])).adjust(crossfit[~rest], list(named[~rest]))
        if settings.update_domain_memory:  # as the served head answers: the fold's own feedback remembered
            fold_in = memory_input(embed_images(fold_model, x, prep, stage_features=True), EMBEDDING_DIM, settings.update_domain_memory_features)
            crossfit[~rest] = domain_memory(settings).fit(fold_in[rest], y[rest], list(named[rest])).blend(crossfit[~rest], fold_in[~rest], list(named[~rest]))
    # A champion that learned these items online (its domain classifier, heads/domain.py) must not be
    # replaced by a pair that answers them worse: its own learning, cross-fitted alike, is the bar too.
    champion_proba = (crossfit_taught(root, original_embeddings, domains, [i.id for i in items], settings, training_prior)
                      if champion.version != root_version else None)
    s = settings
    verdict = evaluate_gate(float(val_right(original, gate_val, root).mean()), float(val_right(tuned, gate_val).mean()), candidate_proba=crossfit,
                            root_proba=root_proba, labels=y, max_val_drop=s.gate_max_val_drop, alpha=s.gate_alpha,
                            min_items=s.gate_min_items, worse_alpha=s.gate_worse_alpha, champion_proba=champion_proba)
    say(f"gate: {verdict.summary}", flush=True)
    val_emb = embed_images(tuned, val.x, prep)
    val_candidate = float(np.mean(classifier_proba(tuned, val_emb).argmax(1) == val.y))  # the whole split, as training reports it

    tags = {"origin": ORIGIN, "parent_version": champion.version, "parent_backbone_version": champion.backbone_version,
            "gate": verdict.summary[:4000], "feedback_items": str(len(items)), "val_accuracy": f"{val_candidate:.4f}",
            "interpolation_weight": f"{weight:g}", "feedback_fingerprint": fingerprint,
            "feedback_accuracy_crossfit": f"{verdict.metrics['feedback_accuracy_candidate']:.4f}",
            **{k: backbone.tags[k] for k in ("backbone_name", "data", "data_fingerprint") if k in backbone.tags}}
    if not verdict.passed:
        tags["gate_reason"] = verdict.summary[:4000]
    kept = train.subset(np.random.default_rng(seed).permutation(len(train))[:REPLAY_SAMPLE])  # as training keeps
    replay_set = EmbeddingSet(embed_images(tuned, kept.x, prep), kept.y)
    # The head answers as the fine-tuned training classifier, as a `--head classifier` training run's
    # does. The backbone learned the feedback itself; the head learns only each named domain's mix
    # and memory (if on), the memory in the adapted embedding.
    head = configure_online(fit_head(replay_set.x, replay_set.y, len(classes), seed, classifier=tuned.classifier),
                            settings).learn_domains(y, domains, embed_images(tuned, x, prep, stage_features=True) if settings.update_domain_memory else None)
    with registry.start_run(f"backbone-adaptation-from-v{champion.backbone_version}", tags={"kind": ORIGIN}):
        mlflow.log_params({**cfg.to_params(), "interpolation_weight": weight, "parent_version": champion.version, "feedback_items": len(items),
                           "parent_backbone_version": champion.backbone_version})
        mlflow.log_metrics({k: v for k, v in verdict.metrics.items() if np.isfinite(v)})
        with tempfile.TemporaryDirectory() as tmp:
            lineage = {"parent_version": champion.version, "parent_backbone_version": champion.backbone_version,
                       "taught": [i.id for i in items], "verdict": verdict.summary, "config": asdict(cfg),
                       "interpolation_weight": weight}
            (Path(tmp) / "lineage.json").write_text(json.dumps(lineage))
            mlflow.log_artifact(str(Path(tmp) / "lineage.json"))
        backbone_version = registry.log_backbone(tuned, prep, classes, tags)
        head_version = registry.log_head(head, classes, backbone_version, tags, replay=replay_set,
                                         validation=EmbeddingSet(val_emb, val.y))
    registry.promote("head", head_version, CHAMPION if verdict.passed else CHALLENGER)
    report = AdaptationReport(registry.task, head_version, backbone_version, champion.version, champion.backbone_version,
                              verdict.passed, verdict.summary, len(items), time.time() - started, verdict.metrics,
                              list(verdict.codes), interpolation_weight=weight)
    log.info("backbone adaptation: %s", report)
    return report


def choose_interpolation(original, tuned, cfg: AdaptConfig, reference_right: np.ndarray, allowed_drop: float,
                         right_of, say=print) -> float:
    """The weight of ``cfg.interpolation_grid`` to serve (``interpolate(original, tuned, w)``):
    ``safe_weight`` on the faces ``right_of(model)`` gets right against ``reference_right``."""
    right = {w: np.asarray(right_of(interpolate(original, tuned, w)), bool) for w in cfg.interpolation_grid}
    for w in sorted(right, reverse=True):
        drop, error = drop_and_error(reference_right, right[w])
        say(f"interpolation {w:g}: old-domain validation {right[w].mean():.4f} (reference {np.mean(reference_right):.4f}; "
            f"drop {drop:+.4f} +- {error:.4f}; allowed {allowed_drop:.4f} at z={cfg.choice_z:g})", flush=True)
    return safe_weight(right, reference_right, allowed_drop, cfg.choice_z)


def safe_weight(right: dict[float, np.ndarray], reference_right: np.ndarray, allowed_drop: float, z: float) -> float:
    """The largest weight whose old-domain drop (``reference_right`` against ``right[w]``, which
    faces each gets right) is within ``allowed_drop`` with one-sided confidence: drop + z x its
    standard error. The smallest weight if none is (the gate then has the last word). Most
    adaptation for an old-domain cost the gate, judging other faces, will most likely accept."""
    for w in sorted(right, reverse=True):
        drop, error = drop_and_error(reference_right, right[w])
        if drop + z * error <= allowed_drop:
            return w
    return min(right)


def drop_and_error(reference_right: np.ndarray, candidate_right: np.ndarray) -> tuple[float, float]:
    """Accuracy lost from reference to candidate on the same faces, and its standard error (paired:
    only the faces they disagree on vary)."""
    change = np.asarray(candidate_right, float) - np.asarray(reference_right, float)
    error = float(change.std(ddof=1) / np.sqrt(len(change))) if len(change) > 1 else float("inf")
    return float(-change.mean()), error
