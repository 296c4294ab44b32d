"""What should a domain's memory read, and how strongly should it speak? Measured on the feedback half only.

    .venv/bin/python -m bench.domain_memory_features        # ~3 min on 2 CPU cores

The domain memory (heads/domain.py) is the part of the online loop that learns a new domain: a
logistic regression fitted on the domain's own feedback, blended into the head's answer for
requests naming the domain. It can read the 64-d embedding the head reads, or the backbone's
*stage features* (its pooled last two stages, served after the embedding: backbones/model.py),
which the embedding's projection, trained for FER2013, has not narrowed.

Each photo of the infant feedback half is framed as the service frames it (the default detector's
largest face, the shipped model's margin) and embedded into served rows by the shipped backbone.
For each reading (features x C x weight; chosen: the best mean of the two stages below) the service's own learner, the feedback head at the
deployment's other defaults, is taught three folds and scored on the fourth, over 5 seeds of the
4-fold split; also taught only 48 of those items (the start of a stream). The head without memory
is taught once per fold and the memory blended in by ``DomainMemory.blend``, which is what
``FeedbackHead.predict_proba`` does (checked against the whole head for the chosen reading).
The test half is never read. Writes bench/results/domain_memory_features.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json

import numpy as np
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from backbones.inference import embed_images
from bench.common import DOMAIN, RESULTS, write_result
from bench.face_framing import detected_feedback_half, framed
from heads import configure_online, predict_proba, teach
from heads.domain import DomainMemory
from heads.feedback import memory_input
from infantino import EMBEDDING_DIM
from infantino.images import Preprocessing
from infantino.settings import OnlineSettings
from registry.shipped import shipped_backbone, shipped_head, shipped_meta

FEATURES = ("embedding", "stages")
CS = (0.003, 0.01, 0.03, 0.1, 1.0)
WEIGHTS = (0.5, 0.7, 0.85, 1.0)
SEEDS, EARLY_ITEMS = 5, 48


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the committed results")
    if ap.parse_args().plot_only:
        return plot(json.loads((RESULTS / "domain_memory_features.json").read_text()))
    images, faces, y, detector = detected_feedback_half()
    meta = shipped_meta()
    prep = Preprocessing.from_dict(meta["preprocessing"])
    x = framed(images, faces, prep)
    rows = embed_images(shipped_backbone(), x, prep, stage_features=True)
    root, defaults = shipped_head(), OnlineSettings()
    no_memory = configure_online(copy.deepcopy(root), defaults).set_params(domain_memory=0.0)
    as_is = root.predict_proba(rows)
    right = {}  # (features, C, weight, stage) -> items right, summed over seeds
    readings = list(itertools.product(FEATURES, CS, WEIGHTS))
    for seed in tqdm(range(SEEDS), desc="fold seeds"):
        rng = np.random.default_rng(seed)
        for taught, held in StratifiedKFold(4, shuffle=True, random_state=seed).split(rows, y):
            for stage, items in (("all", taught), ("early", rng.choice(taught, EARLY_ITEMS, replace=False))):
                head = teach(copy.deepcopy(no_memory), rows[items], y[items], DOMAIN)
                base = predict_proba(head, rows[held], DOMAIN)
                for features, C, weight in readings:
                    read = memory_input(rows, EMBEDDING_DIM, features)
                    memory = DomainMemory(weight=weight, kind=defaults.update_domain_memory_kind, C=C).fit(read[items], y[items], DOMAIN)
                    key = (features, C, weight, stage)
                    right.setdefault(key, np.zeros(SEEDS, int))[seed] += int(np.sum(memory.blend(base, read[held], DOMAIN).argmax(1) == y[held]))
    table = [{"features": f, "C": C, "weight": w, "after_feedback": float(right[(f, C, w, "all")].mean() / len(y)),
              f"after_{EARLY_ITEMS}_items": float(right[(f, C, w, "early")].mean() / len(y)),
              "after_feedback_seed0": float(right[(f, C, w, "all")][0] / len(y))} for f, C, w in readings]
    # The choice: the best mean of the two stages, as a stream's head must be good early and late.
    best = max(table, key=lambda r: r["after_feedback"] + r[f"after_{EARLY_ITEMS}_items"])
    check = {**_whole_head_check(root, defaults, rows, y, best), "same_reading_by_blend": best["after_feedback_seed0"]}
    result = {"command": "python -m bench.domain_memory_features", "detector": detector.name,
              "model": {k: meta.get(k) for k in ("backbone", "preprocessing")}, "row_width": int(rows.shape[1]),
              "data": f"feedback half ({len(y)} photos), 4 folds x {SEEDS} seeds; 'early': {EARLY_ITEMS} of the taught folds' items",
              "as_is": float(np.mean(as_is.argmax(1) == y)),
              "without_memory": {"after_feedback": _without_memory(no_memory, rows, y)},
              "rows": table, "best": best, "chosen_by": f"the highest mean of after_feedback and after_{EARLY_ITEMS}_items",
              "whole_head_check": check}
    path = write_result("domain_memory_features", result)
    plot(result)
    print(f"as-is {result['as_is']:.3f}; best: {best}; whole head {check}; wrote {path}")


def _without_memory(no_memory, rows: np.ndarray, y: np.ndarray) -> float:
    right = 0
    for seed in range(SEEDS):
        for taught, held in StratifiedKFold(4, shuffle=True, random_state=seed).split(rows, y):
            head = teach(copy.deepcopy(no_memory), rows[taught], y[taught], DOMAIN)
            right += int(np.sum(predict_proba(head, rows[held], DOMAIN).argmax(1) == y[held]))
    return right / (SEEDS * len(y))


def _whole_head_check(root, defaults: OnlineSettings, rows: np.ndarray, y: np.ndarray, best: dict) -> dict:
    """The chosen reading through the feedback head itself (the service's path), seed 0."""
    settings = defaults.model_copy(update={"update_domain_memory": best["weight"], "update_domain_memory_features": best["features"],
                                           "update_domain_memory_c": best["C"]})
    proba = np.zeros((len(y), 7))
    for taught, held in StratifiedKFold(4, shuffle=True, random_state=0).split(rows, y):
        head = teach(configure_online(copy.deepcopy(root), settings), rows[taught], y[taught], DOMAIN)
        proba[held] = predict_proba(head, rows[held], DOMAIN)
    return {"seed": 0, "accuracy": float(np.mean(proba.argmax(1) == y))}


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, stage in zip(axes, ("after_feedback", f"after_{EARLY_ITEMS}_items")):
        for features, style in zip(FEATURES, ("--", "-")):
            for weight in WEIGHTS:
                rows = [r for r in result["rows"] if r["features"] == features and r["weight"] == weight]
                ax.plot([r["C"] for r in rows], [r[stage] for r in rows], style, marker="o", ms=3, label=f"{features}, weight {weight:g}")
        ax.axhline(result["as_is"], color="grey", ls=":", label="shipped model as it is")
        ax.set_xscale("log")
        ax.set_xlabel("C (inverse L2 strength, standardised features)")
        ax.set_title("taught 3 folds" if stage == "after_feedback" else f"taught {EARLY_ITEMS} items")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("infant accuracy, feedback half (cross-validated)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("What the domain memory reads (feedback half only)")
    fig.tight_layout()
    fig.savefig(RESULTS / "domain_memory_features.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
