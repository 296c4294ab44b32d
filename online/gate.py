"""The evaluation gate: may a candidate head replace the champion?

A candidate is the lineage's root (the head trained offline) taught every feedback item so far.
It is promoted only when both hold:

(a) **No forgetting.** On the training validation embeddings it loses at most ``max_val_drop``
    accuracy against the root, so no chain of updates can drift further than one allowance.
(b) **Real evidence of a gain.** Every feedback item is evidence, cross-fitted: the item is
    scored by a candidate taught all *other* feedback (k folds), and by the root, which was
    taught none. The score is the log-probability each gives the item's label (a proper
    scoring rule: it rewards being right *and* being sure only when right). A one-sided paired
    t-test must find the candidate's mean gain unlikely under "no better than the root":
    p <= ``alpha``; and on the items where their top answers disagree (McNemar's pairs) the
    candidate must not lose more than it wins. A tie is not evidence, nor are fewer than
    ``min_items`` items (a t-test on three items says little about the next hundred);
    using every item (instead of a held-out fifth) is what gives the test its power.

``evaluate_gate`` is a pure function of the numbers; ``online.updater`` produces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import ttest_1samp

_FLOOR = 1e-6  # probabilities are floored before the log: one 0 must not decide


# Why a candidate was refused, machine-readable (one per reason, in the order of ``reasons``):
# a short fixed list, so metrics can be labelled by it.
VALIDATION_DROP, TOO_LITTLE_EVIDENCE, NO_EVIDENCE, ANSWERS_WORSE = "validation_drop", "too_little_evidence", "no_evidence", "answers_worse"
REASON_CODES = (VALIDATION_DROP, TOO_LITTLE_EVIDENCE, NO_EVIDENCE, ANSWERS_WORSE)


@dataclass
class GateVerdict:
    passed: bool
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    codes: list[str] = field(default_factory=list)  # REASON_CODES, one per entry of ``reasons``

    @property
    def summary(self) -> str:
        return ("passed" if self.passed else "rejected") + (": " + "; ".join(self.reasons) if self.reasons else "")


def evaluate_gate(
    val_accuracy_root: float, val_accuracy_candidate: float, candidate_proba: np.ndarray, root_proba: np.ndarray,
    labels: np.ndarray, max_val_drop: float = 0.01, alpha: float = 0.05, min_items: int = 20,
) -> GateVerdict:
    """``candidate_proba``/``root_proba``: (N, classes) probabilities of the cross-fitted candidate
    and of the root for the N feedback items; ``labels``: their class indices."""
    labels = np.asarray(labels, int)
    n = len(labels)
    rows = np.arange(n)
    cand_right = np.asarray(candidate_proba).argmax(1) == labels if n else np.zeros(0, bool)
    root_right = np.asarray(root_proba).argmax(1) == labels if n else np.zeros(0, bool)
    won, lost = int(np.sum(cand_right & ~root_right)), int(np.sum(root_right & ~cand_right))
    gain = (np.log(np.maximum(np.asarray(candidate_proba)[rows, labels], _FLOOR))
            - np.log(np.maximum(np.asarray(root_proba)[rows, labels], _FLOOR))) if n else np.zeros(0)
    p = float(ttest_1samp(gain, 0.0, alternative="greater").pvalue) if n >= 2 and np.std(gain) > 0 else 1.0
    m = {
        "val_accuracy_root": val_accuracy_root, "val_accuracy_candidate": val_accuracy_candidate,
        "feedback_items": float(n), "feedback_won": float(won), "feedback_lost": float(lost),
        "feedback_log_likelihood_gain": float(gain.mean()) if n else float("nan"), "feedback_p_value": p,
        "feedback_accuracy_root": float(root_right.mean()) if n else float("nan"),
        "feedback_accuracy_candidate": float(cand_right.mean()) if n else float("nan"),
    }
    reasons, codes = [], []
    drop = val_accuracy_root - val_accuracy_candidate
    if drop > max_val_drop + 1e-9:  # float noise must not turn "exactly the allowance" into a rejection
        reasons.append(f"validation accuracy fell {drop * 100:.2f} points below the offline-trained head's (allowed {max_val_drop * 100:.2f})")
        codes.append(VALIDATION_DROP)
    if n < min_items:
        reasons.append(f"too little evidence: {n} feedback items, the gate judges from {min_items}")
        codes.append(TOO_LITTLE_EVIDENCE)
    elif p > alpha:
        reasons.append(f"no evidence of a gain on feedback: cross-fitted over {n} items, mean log-likelihood gain "
                       f"{m['feedback_log_likelihood_gain']:+.3f} against the offline-trained head (one-sided t-test p={p:.3f}; needs p<={alpha:g})")
        codes.append(NO_EVIDENCE)
    if lost > won:
        reasons.append(f"it answers worse than the offline-trained head on feedback: cross-fitted, won {won} and lost {lost} of {n} items")
        codes.append(ANSWERS_WORSE)
    return GateVerdict(not reasons, reasons, m, codes)
