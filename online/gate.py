"""The evaluation gate: may a candidate head replace the champion?

(a) On the training validation embeddings it may lose at most ``max_val_drop`` accuracy
    (this is what catches poisoned feedback: learning wrong labels costs validation accuracy);
(b) on held-out feedback (items never trained on) it must not be worse than the champion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GateVerdict:
    passed: bool
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return ("passed" if self.passed else "rejected") + (": " + "; ".join(self.reasons) if self.reasons else "")


def _accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x) == y)) if len(y) else float("nan")


def evaluate_gate(champion, candidate, val_x, val_y, held_x, held_y, max_val_drop: float) -> GateVerdict:
    m = {
        "val_accuracy_champion": _accuracy(champion, val_x, val_y),
        "val_accuracy_candidate": _accuracy(candidate, val_x, val_y),
        "heldout_accuracy_champion": _accuracy(champion, held_x, held_y),
        "heldout_accuracy_candidate": _accuracy(candidate, held_x, held_y),
        "heldout_items": float(len(held_y)),
    }
    reasons = []
    drop = m["val_accuracy_champion"] - m["val_accuracy_candidate"]
    if drop > max_val_drop:
        reasons.append(f"validation accuracy fell {drop * 100:.2f} points (allowed {max_val_drop * 100:.2f})")
    if len(held_y) and m["heldout_accuracy_candidate"] < m["heldout_accuracy_champion"]:
        reasons.append(
            f"held-out feedback accuracy {m['heldout_accuracy_candidate']:.3f} < champion's {m['heldout_accuracy_champion']:.3f}"
        )
    return GateVerdict(not reasons, reasons, m)
