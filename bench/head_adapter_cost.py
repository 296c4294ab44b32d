"""What the feedback head's adapter costs on FER2013 and gains on infants, per model (feedback half only).

    .venv/bin/python -m bench.head_adapter_cost                                   # the shipped model
    .venv/bin/python -m bench.head_adapter_cost registry/candidates/scratch-light-45-cont-14

Why: the service's head updates refit a logistic-regression adapter on the feedback and a replay
sample of the training embeddings (heads/feedback.py), and the gate refuses a candidate that
loses more than a point of FER2013 validation. A backbone whose MLP head a logistic regression on
the replay cannot match starts with that point already spent. For each model folder (the shipped
model's format), on its own embeddings: the MLP head, a logistic regression on the replay alone,
and the adapter after feedback at two weights, scored on FER2013 validation and by 4-fold
cross-validation on the infant feedback half (face crops at the model's framing). Three ways to
keep more of the MLP's FER2013 answers are scored alike (weight 1): the adapter on the MLP's
hidden layer instead of the embedding (its output layer is a logistic regression on it), on the
embedding plus the MLP's log-probabilities (stacked), and with the class-stratified replay
reweighted to the training data's class mix. And with the whole training split as the replay
(each of its embeddings weighted so that together they weigh what the 2,000-item sample does),
at the adapter's C and at C 0.3 (more regularised). The test half is not read.
Results: bench/results/head_adapter_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from backbones.inference import embed_images
from bench.common import DATA, FER_CLASSES, write_result
from bench.online_tuning import feedback_half_embeddings
from infantino.settings import Settings
from registry.shipped import DEFAULT_DIR, register_shipped
from registry.store import CHAMPION, ModelRegistry
from training.data import load_dataset, stratified_split

FEEDBACK_WEIGHTS = (1.0, 5.0)


def measure(model_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as home:
        registry = ModelRegistry(Settings(home=Path(home)))
        register_shipped(registry, model_dir)
        champion = registry.load_head(CHAMPION)
        head, backbone = champion.model, registry.load_backbone(champion.backbone_version)
        fx, fy = feedback_half_embeddings(registry)
        prep = backbone.preprocessing
        fer_train, val = stratified_split(load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES), 0.1, 0)
        vx, vy = embed_images(backbone.model.eval(), val.x, prep), val.y
        tx, ty = embed_images(backbone.model.eval(), fer_train.x, prep), fer_train.y

    def fer(h) -> float:
        return float(np.mean(h.predict(vx) == vy))

    folds = list(StratifiedKFold(4, shuffle=True, random_state=0).split(fx, fy))
    replay_only = LogisticRegression(C=head.C, max_iter=2000).fit(head.replay_x_, head.replay_y_)
    result = {"mlp_head": {"fer2013_val": fer(head.base_),
                           "infant_feedback_half_cv": float(np.mean([np.mean(head.predict(fx[te]) == fy[te]) for _, te in folds]))},
              "logistic_on_replay_alone": {"fer2013_val": fer(replay_only), "replay_items": len(head.replay_y_)}}
    for weight in FEEDBACK_WEIGHTS:
        infant, fer_scores = [], []
        for train, test in folds:
            adapted = copy.deepcopy(head).set_params(feedback_weight=weight).partial_fit(fx[train], fy[train])
            infant.append(np.mean(adapted.predict(fx[test]) == fy[test]))
            fer_scores.append(fer(adapted))
        result[f"adapter_feedback_weight_{weight:g}"] = {"fer2013_val": float(np.mean(fer_scores)), "infant_feedback_half_cv": float(np.mean(infant))}

    mlp = head.base_.mlp_
    prior, replay_share = head._training_prior(), np.bincount(head.replay_y_, minlength=len(head.classes_)) / len(head.replay_y_)
    unit, sample = np.ones(len(head.replay_y_)), (head.replay_x_, head.replay_y_)
    whole = np.full(len(ty), len(head.replay_y_) / len(ty))  # the whole split weighs what the sample does
    # The variants: (features from embeddings, replay embeddings and labels, weight of each replayed item, C).
    variants = {
        "adapter_on_hidden_layer": (lambda x: np.maximum(x @ mlp.coefs_[0] + mlp.intercepts_[0], 0), sample, unit, head.C),
        "adapter_stacked_on_mlp_log_proba": (lambda x: np.hstack([x, np.log(np.clip(head.base_.predict_proba(x), 1e-6, 1))]),
                                             sample, unit, head.C),
        "adapter_replay_at_training_class_mix": (lambda x: x, sample, (prior / replay_share)[head.replay_y_], head.C),
        "adapter_replay_whole_training_split": (lambda x: x, (tx, ty), whole, head.C),
        "adapter_replay_whole_training_split_C_0.3": (lambda x: x, (tx, ty), whole, 0.3),
    }
    for name, (features, (rx, ry), replay_weight, C) in variants.items():
        infant, fer_scores = [], []
        for train, test in folds:
            x, y = np.concatenate([fx[train], rx]), np.concatenate([fy[train], ry])
            adapter = LogisticRegression(C=C, max_iter=3000).fit(
                features(x), y, sample_weight=np.concatenate([np.ones(len(train)), replay_weight]))
            infant.append(np.mean(adapter.predict(features(fx[test])) == fy[test]))
            fer_scores.append(np.mean(adapter.predict(features(vx)) == vy))
        result[name] = {"fer2013_val": float(np.mean(fer_scores)), "infant_feedback_half_cv": float(np.mean(infant))}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, help="model folders besides the shipped one (registry/default_model)")
    args = ap.parse_args()
    results = {}
    for model_dir in [DEFAULT_DIR, *args.models]:
        name = "shipped" if model_dir == DEFAULT_DIR else model_dir.name
        results[name] = measure(model_dir)
        print(name, results[name], flush=True)
    write_result("head_adapter_cost", {"command": "python -m bench.head_adapter_cost " + " ".join(map(str, args.models)), "models": results})


if __name__ == "__main__":
    main()
