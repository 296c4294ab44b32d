"""The evaluation gate: may a candidate head replace the champion?

(a) On the training validation embeddings it may lose at most ``max_val_drop`` accuracy
    against the lineage's root (the head trained offline, before any online update), so a
    chain of updates cannot drift further than one allowance; this is also what catches
    poisoned feedback: learning wrong labels costs validation accuracy;
(b) on held-out feedback (items never trained on) it must not be worse than the champion.
    "Worse" is judged on the items where the two disagree (a paired, McNemar-style count):
    it is rejected when it loses more of them than it wins by over ``z`` standard errors.
    With a few dozen held-out items, one unlucky item no longer decides; ``z=0`` is the
    literal rule (any net loss rejects).
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


def evaluate_gate(champion, candidate, val_x, val_y, held_x, held_y, max_val_drop: float, z: float = 1.0,
                  root=None) -> GateVerdict:
    """``root`` is the lineage's offline-trained head (default: the champion itself)."""
    m = {
        "val_accuracy_champion": _accuracy(champion, val_x, val_y),
        "val_accuracy_candidate": _accuracy(candidate, val_x, val_y),
        "heldout_accuracy_champion": _accuracy(champion, held_x, held_y),
        "heldout_accuracy_candidate": _accuracy(candidate, held_x, held_y),
        "heldout_items": float(len(held_y)),
    }
    m["val_accuracy_root"] = m["val_accuracy_champion"] if root is None else _accuracy(root, val_x, val_y)
    reasons = []
    drop = m["val_accuracy_root"] - m["val_accuracy_candidate"]
    if drop > max_val_drop + 1e-9:  # float noise must not turn "exactly the allowance" into a rejection
        reasons.append(f"validation accuracy fell {drop * 100:.2f} points below the offline-trained head's (allowed {max_val_drop * 100:.2f})")
    if len(held_y):
        champ_right = champion.predict(held_x) == held_y
        cand_right = candidate.predict(held_x) == held_y
        lost, won = int(np.sum(champ_right & ~cand_right)), int(np.sum(cand_right & ~champ_right))
        m.update(heldout_lost=float(lost), heldout_won=float(won))
        if lost - won > z * np.sqrt(lost + won):
            reasons.append(
                f"held-out feedback accuracy {m['heldout_accuracy_candidate']:.3f} < champion's {m['heldout_accuracy_champion']:.3f}"
                f" (lost {lost}, won {won} of {len(held_y)} items)"
            )
    return GateVerdict(not reasons, reasons, m)
