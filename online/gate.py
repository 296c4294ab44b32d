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
    candidate must not lose more than it wins (or, with ``worse_alpha`` below 0.5, must not lose
    significantly more: a loss of 10 to 8 is a coin's toss). A tie is not evidence, nor are fewer than
    ``min_items`` items (a t-test on three items says little about the next hundred);
    using every item (instead of a held-out fifth) is what gives the test its power.

(c) **A bound on promotions without a gain over the champion.** Every candidate is judged
    against the root, so once the champion has learned something (say, a consistent mislabel
    that agrees with itself), each later candidate passes (b) again on the same grounds and is
    promoted, with nothing new learned. So the candidate is also compared with the lineage's last
    *proven* version (the champion, unless its own promotion was unproven; online/updater.py,
    PROVEN_TAG) on the items that version was never taught (held out from it, cross-fitted for
    the candidate), by the same test. A promotion without such a gain is "unproven"; after
    ``max_unproven`` of them in a row the gate refuses until a candidate shows one. Against the last
    proven version the evidence grows with each unproven promotion (32 items, 64, 96...), so a
    chain that really learns proves it; against the champion alone each test saw one batch.

(d) **A gain over a champion that learned the same items another way.** A backbone adaptation
    (adaptation/backbone.py) is a candidate taught the same feedback as the online head it would
    replace; both cross-fitted on the same folds, (b)'s test must find a gain over the champion's
    answers too. Against the root alone, a fine-tune replaced an online head with a domain
    classifier twice on the infant benchmark (2026-12-06): cross-fitted 57.5% and 60.1% against
    the root's 51.9% (and 60.1% against the champion's own 59.2%, won 14 lost 12: no evidence),
    it read the test half at 51.1% where the head it replaced read 56.7% and 55.8%.

``evaluate_gate`` is a pure function of the numbers; ``online.updater`` and ``adaptation.backbone`` produce them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binomtest, ttest_1samp

_FLOOR = 1e-6  # probabilities are floored before the log: one 0 must not decide


# Why a candidate was refused, machine-readable (one per reason, in the order of ``reasons``):
# a short fixed list, so metrics can be labelled by it.
VALIDATION_DROP, TOO_LITTLE_EVIDENCE, NO_EVIDENCE, ANSWERS_WORSE = "validation_drop", "too_little_evidence", "no_evidence", "answers_worse"
NO_GAIN_OVER_CHAMPION, NOT_BETTER_THAN_CHAMPION = "no_gain_over_champion", "not_better_than_champion"
REASON_CODES = (VALIDATION_DROP, TOO_LITTLE_EVIDENCE, NO_EVIDENCE, ANSWERS_WORSE, NO_GAIN_OVER_CHAMPION, NOT_BETTER_THAN_CHAMPION)


@dataclass
class GateVerdict:
    passed: bool
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    codes: list[str] = field(default_factory=list)  # REASON_CODES, one per entry of ``reasons``

    unproven_promotions: int = 0  # promotions in a row without a gain over the champion, this one included when it passes

    @property
    def summary(self) -> str:
        return ("passed" if self.passed else "rejected") + (": " + "; ".join(self.reasons) if self.reasons else "")


@dataclass
class PairedEvidence:
    """Two models' answers on the same items: is the first one better?"""

    n: int
    won: int  # items the first gets right and the second wrong
    lost: int
    mean_gain: float  # mean log-probability gain on the true label (nan without items)
    p_value: float  # one-sided paired t-test of "no better"
    p_worse: float  # exact one-sided test (McNemar's, on the items where one is right and the other wrong) of "no worse"
    accuracy_first: float
    accuracy_second: float

    def shows_gain(self, alpha: float) -> bool:
        return self.p_value <= alpha and self.won >= self.lost


def paired_evidence(first_proba: np.ndarray, second_proba: np.ndarray, labels: np.ndarray) -> PairedEvidence:
    labels = np.asarray(labels, int)
    n = len(labels)
    if n == 0:
        return PairedEvidence(0, 0, 0, float("nan"), 1.0, 1.0, float("nan"), float("nan"))
    first_proba, second_proba = np.asarray(first_proba), np.asarray(second_proba)
    rows = np.arange(n)
    first_right, second_right = first_proba.argmax(1) == labels, second_proba.argmax(1) == labels
    gain = np.log(np.maximum(first_proba[rows, labels], _FLOOR)) - np.log(np.maximum(second_proba[rows, labels], _FLOOR))
    p = float(ttest_1samp(gain, 0.0, alternative="greater").pvalue) if n >= 2 and np.std(gain) > 0 else 1.0
    won, lost = int(np.sum(first_right & ~second_right)), int(np.sum(second_right & ~first_right))
    p_worse = float(binomtest(lost, won + lost, 0.5, alternative="greater").pvalue) if won + lost else 1.0
    return PairedEvidence(n, won, lost, float(gain.mean()), p, p_worse, float(first_right.mean()), float(second_right.mean()))


def evaluate_gate(
    val_accuracy_root: float, val_accuracy_candidate: float, candidate_proba: np.ndarray, root_proba: np.ndarray,
    labels: np.ndarray, max_val_drop: float = 0.01, alpha: float = 0.05, min_items: int = 20,
    over_champion: PairedEvidence | None = None, unproven_before: int = 0, max_unproven: int | None = None,
    worse_alpha: float = 0.5, champion_proba: np.ndarray | None = None,
) -> GateVerdict:
    """``candidate_proba``/``root_proba``: (N, classes) probabilities of the cross-fitted candidate
    and of the root for the N feedback items; ``labels``: their class indices.
    ``over_champion``: the candidate against the last proven version on the items it was not taught
    (None when the champion is the root: then (b) is that comparison); ``unproven_before``: the
    champion's count of promotions in a row without such a gain; ``max_unproven``: the bound (None: none);
    ``worse_alpha``: the candidate is refused as answering worse when the exact test on the items
    where exactly one of the two is right finds it worse at this level (0.5: whenever it loses
    more of those items than it wins, however few); ``champion_proba``: the champion's own cross-fitted
    answers for the same items, where the candidate would replace a champion that learned them another
    way (a backbone adaptation replacing the online head, adaptation/backbone.py): refused unless the
    test of (b) finds a gain over those answers too."""
    ev = paired_evidence(candidate_proba, root_proba, labels)
    n = ev.n
    m = {
        "val_accuracy_root": val_accuracy_root, "val_accuracy_candidate": val_accuracy_candidate,
        "feedback_items": float(n), "feedback_won": float(ev.won), "feedback_lost": float(ev.lost),
        "feedback_log_likelihood_gain": ev.mean_gain, "feedback_p_value": ev.p_value,
        "feedback_accuracy_root": ev.accuracy_second, "feedback_accuracy_candidate": ev.accuracy_first,
    }
    reasons, codes = [], []
    drop = val_accuracy_root - val_accuracy_candidate
    if drop > max_val_drop + 1e-9:  # float noise must not turn "exactly the allowance" into a rejection
        reasons.append(f"validation accuracy fell {drop * 100:.2f} points below the offline-trained head's (allowed {max_val_drop * 100:.2f})")
        codes.append(VALIDATION_DROP)
    if n < min_items:
        reasons.append(f"too little evidence: {n} feedback items, the gate judges from {min_items}")
        codes.append(TOO_LITTLE_EVIDENCE)
    elif ev.p_value > alpha:
        reasons.append(f"no evidence of a gain on feedback: cross-fitted over {n} items, mean log-likelihood gain "
                       f"{ev.mean_gain:+.3f} against the offline-trained head (one-sided t-test p={ev.p_value:.3f}; needs p<={alpha:g})")
        codes.append(NO_EVIDENCE)
    m["feedback_p_worse"] = ev.p_worse
    if ev.lost > ev.won and ev.p_worse <= worse_alpha + 1e-9:  # at 0.5 exactly: every net loss (float noise aside)
        reasons.append(f"it answers worse than the offline-trained head on feedback: cross-fitted, won {ev.won} and lost {ev.lost} of {n} items "
                       f"(exact test p={ev.p_worse:.3f}; refused at p<={worse_alpha:g})")
        codes.append(ANSWERS_WORSE)
    if champion_proba is not None:
        ch = paired_evidence(candidate_proba, champion_proba, labels)
        m.update({"feedback_accuracy_champion": ch.accuracy_second, "champion_won": float(ch.won), "champion_lost": float(ch.lost),
                  "champion_log_likelihood_gain": ch.mean_gain, "champion_p_value": ch.p_value})
        if not ch.shows_gain(alpha):
            reasons.append(f"no evidence of a gain over the champion's own learning of the same feedback: both cross-fitted over {ch.n} "
                           f"items, mean log-likelihood gain {ch.mean_gain:+.3f} (p={ch.p_value:.3f}; needs p<={alpha:g}), "
                           f"won {ch.won}, lost {ch.lost}")
            codes.append(NOT_BETTER_THAN_CHAMPION)
    proven = over_champion is None or over_champion.shows_gain(alpha)
    unproven = 0 if proven else unproven_before + 1
    if over_champion is not None:
        m.update({"champion_unseen_items": float(over_champion.n), "champion_gain_p_value": over_champion.p_value,
                  "champion_log_likelihood_gain": over_champion.mean_gain, "unproven_promotions": float(unproven)})
        if not proven and max_unproven is not None and unproven > max_unproven:
            reasons.append(f"no gain over the last proven version on the {over_champion.n} items it was not taught (p={over_champion.p_value:.3f}, "
                           f"won {over_champion.won}, lost {over_champion.lost}), and {unproven_before} promotion(s) in a row "
                           f"already had none (allowed {max_unproven})")
            codes.append(NO_GAIN_OVER_CHAMPION)
    return GateVerdict(not reasons, reasons, m, codes, unproven)
