"""Metrics for a classifier's probabilities, and the confusion-matrix picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by bin size."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(conf[in_bin].mean() - correct[in_bin].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, y: np.ndarray, classes: list[str], prefix: str = "") -> dict[str, float]:
    """accuracy, macro_f1, ece and recall_<class> (prefixed, flat: ready for mlflow.log_metrics)."""
    labels = np.arange(len(classes))
    pred = probs.argmax(1)
    out = {
        "accuracy": accuracy_score(y, pred),
        "macro_f1": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
        "ece": expected_calibration_error(probs, y),
    }
    for name, r in zip(classes, recall_score(y, pred, labels=labels, average=None, zero_division=0)):
        out[f"recall_{name}"] = r
    return {f"{prefix}{k}": float(v) for k, v in out.items()}


def save_confusion_matrix(probs: np.ndarray, y: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion_matrix(y, probs.argmax(1), labels=np.arange(len(classes)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or f"confusion matrix (n={len(y)}, accuracy={np.mean(probs.argmax(1) == y):.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
