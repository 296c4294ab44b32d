"""Which crop framing lets the online loop learn infants best? Measured on the feedback half only.

    .venv/bin/python -m bench.framing_for_learning        # ~3 min on 2 CPU cores

bench/face_framing.py chooses the detector and margin by how well the shipped model reads the
infant photos *as it is*; within a few photos many margins tie there (-0.15 to +0.05). What the
loop makes of the feedback depends on the framing much more: for each margin, the default
detector's largest face in each photo of the feedback half is cropped, embedded by the shipped
backbone, and the service's domain memory (heads/domain.py, at the deployment's defaults) is
taught three folds and scored on the fourth, over 5 seeds of the 4-fold split. The as-is accuracy
is reported beside it. The test half is never read.
Writes bench/results/framing_for_learning.json and .png.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from backbones.inference import embed_images
from bench.common import DOMAIN, RESULTS, write_result
from bench.face_framing import detected_feedback_half, framed
from heads import domain_memory
from heads.feedback import memory_input
from infantino import EMBEDDING_DIM
from infantino.images import Preprocessing
from infantino.settings import OnlineSettings
from registry.shipped import shipped_backbone, shipped_head, shipped_meta

MARGINS = (-0.3, -0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1)
SEEDS = 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the committed results")
    if ap.parse_args().plot_only:
        return plot(json.loads((RESULTS / "framing_for_learning.json").read_text()))
    images, faces, y, detector = detected_feedback_half()
    meta = shipped_meta()
    model, head = shipped_backbone(), shipped_head()
    base = Preprocessing.from_dict(meta["preprocessing"])
    online = OnlineSettings()
    memory = domain_memory(online)
    rows = {}
    for margin in MARGINS:
        prep = Preprocessing(base.input_size, base.grayscale, base.mean, base.std, face_margin=margin)
        x = framed(images, faces, prep)
        served = embed_images(model, x, prep, stage_features=True)  # served rows: the embedding, then the stage features
        read = memory_input(served, EMBEDDING_DIM, online.update_domain_memory_features)  # what the memory reads
        as_is = head.predict_proba(served)
        learned = []
        for seed in range(SEEDS):
            proba = np.zeros_like(as_is)
            for taught, held in StratifiedKFold(4, shuffle=True, random_state=seed).split(read, y):
                proba[held] = memory.fit(read[taught], y[taught], DOMAIN).blend(as_is[held], read[held], DOMAIN)
            learned.append(float(np.mean(proba.argmax(1) == y)))
        rows[f"{margin:g}"] = {"as_is": float(np.mean(as_is.argmax(1) == y)), "after_feedback": learned,
                               "after_feedback_mean": float(np.mean(learned))}
        tqdm.write(f"margin {margin:+.2f}: as-is {rows[f'{margin:g}']['as_is']:.3f}, after the domain memory learns "
                   f"{np.mean(learned):.3f} ({min(learned):.3f}-{max(learned):.3f} over {SEEDS} fold seeds)")
    best = max(rows, key=lambda m: rows[m]["after_feedback_mean"])
    result = {"command": "python -m bench.framing_for_learning", "detector": detector.name,
              "model": {k: meta.get(k) for k in ("backbone", "preprocessing")},
              "memory": {"weight": memory.weight, "kind": memory.kind, "C": memory.C, "reads": online.update_domain_memory_features}, "data": "feedback half (233 photos), 4 folds x 5 seeds",
              "rows": rows, "best_margin_after_feedback": float(best)}
    path = write_result("framing_for_learning", result)
    plot(result)
    print(f"best margin for learning: {best}; wrote {path}")


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    margins = [float(m) for m in result["rows"]]
    rows = list(result["rows"].values())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(margins, [r["as_is"] for r in rows], "s--", color="grey", label="shipped model as it is")
    ax.plot(margins, [r["after_feedback_mean"] for r in rows], "o-", label="after the domain memory learns 3 folds (mean of 5 seeds)")
    ax.fill_between(margins, [min(r["after_feedback"]) for r in rows], [max(r["after_feedback"]) for r in rows], alpha=0.2)
    ax.axvline(result["best_margin_after_feedback"], color="tab:blue", ls=":", lw=1)
    ax.set_xlabel("crop margin (fraction of the face box, each side; negative cuts into it)")
    ax.set_ylabel("infant accuracy, feedback half (cross-validated)")
    ax.set_title(f"Framing for learning ({result['detector']}, feedback half only)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "framing_for_learning.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
