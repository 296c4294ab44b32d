"""What could a head-level adapter gain on infants? Measured on the feedback half only.

    .venv/bin/python -m bench.adapter_variants        # ~5 minutes on 2 CPU cores

The feedback head (heads/feedback.py) refits a logistic-regression adapter on all feedback
(weighted) and a replay sample of the training embeddings. This bench asks whether any simple
variant of that adapter would do better, before the gate is involved: for each variant,
4-fold cross-validation on the infant feedback half (the adapter fitted on three folds,
scored on the fourth, against the shipped head on the same fold), and the FER2013 validation
accuracy of the adapter fitted on the whole feedback half (the gate allows a 1-point drop).
Variants: features (the 64-d embedding; the base MLP's log-probabilities appended; the
log-probabilities alone), feedback weight, replay size. The test half is not read.
Results: bench/results/adapter_variants.json.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from bench.common import bootstrap_home, write_result
from bench.online_tuning import feedback_half_embeddings
from infantino.settings import Settings
from registry.store import CHAMPION, ModelRegistry

VARIANTS = [  # (features, feedback weight, replay size)
    ("embedding", 5.0, 2000), ("embedding", 5.0, 4000), ("embedding", 1.0, 2000),
    ("embedding+base_logp", 3.0, 2000), ("embedding+base_logp", 5.0, 2000), ("embedding+base_logp", 5.0, 4000),
    ("base_logp", 5.0, 2000),
]


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="adapter-variants-")) / "home"
    bootstrap_home(home).check_returncode()
    registry = ModelRegistry(Settings(home=home))
    shipped = registry.load_head(CHAMPION)
    replay, validation = registry.load_embeddings(shipped)
    base = getattr(shipped.model, "base_", shipped.model)  # the offline-trained MLP
    emb, y = feedback_half_embeddings(registry)

    def features(x: np.ndarray, kind: str) -> np.ndarray:
        logp = np.log(np.maximum(base.predict_proba(x), 1e-6))
        return {"embedding": x, "embedding+base_logp": np.hstack([x, logp]), "base_logp": logp}[kind]

    def fit(x: np.ndarray, t: np.ndarray, kind: str, weight: float, replay_size: int) -> LogisticRegression:
        pick = np.random.default_rng(0).permutation(len(replay.y))[:replay_size]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(max_iter=3000).fit(
                np.vstack([features(x, kind), features(replay.x[pick], kind)]), np.concatenate([t, replay.y[pick]]),
                sample_weight=np.concatenate([np.full(len(t), weight), np.ones(len(pick))]))

    base_val = float(np.mean(base.predict(validation.x) == validation.y))
    folds = list(StratifiedKFold(4, shuffle=True, random_state=0).split(emb, y))
    as_is = float(np.mean([np.mean(base.predict(emb[held]) == y[held]) for _, held in folds]))
    rows = []
    for kind, weight, replay_size in VARIANTS:
        cv = float(np.mean([np.mean(fit(emb[tr], y[tr], kind, weight, replay_size).predict(features(emb[held], kind)) == y[held])
                            for tr, held in folds]))
        whole = fit(emb, y, kind, weight, replay_size)
        val = float(np.mean(whole.predict(features(validation.x, kind)) == validation.y))
        rows.append({"features": kind, "feedback_weight": weight, "replay_size": replay_size, "cv_accuracy": cv,
                     "cv_gain_points": 100 * (cv - as_is), "fer2013_val_accuracy": val, "fer2013_change_points": 100 * (val - base_val)})
        print(f"{kind:>20} w={weight:<4g} replay={replay_size:5d}: CV {cv:.3f} ({rows[-1]['cv_gain_points']:+.1f} pts), "
              f"FER2013 val {val:.4f} ({rows[-1]['fer2013_change_points']:+.2f})", flush=True)
    print(write_result("adapter_variants", {
        "command": "python -m bench.adapter_variants", "data": "feedback half of the infant photos (4 stratified folds)",
        "as_is_cv_accuracy": as_is, "as_is_fer2013_val_accuracy": base_val, "rows": rows}))


if __name__ == "__main__":
    main()
